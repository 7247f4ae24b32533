"""Checks shared by the Stable Diffusion family tests (tests/test_sd15.py, tests/test_sdxl.py):
tiny pipelines as session fixtures, a LoRA student, the stock pipeline on the training grid, the
upstream snippet's LoRA lines, the kohya round trip, training end to end."""
import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, accelerate_launch, loaded_backbone, run_script

PROMPTS = ["a red cat on a mat", "a blue boat at sea"]
GRID = [899, 674, 449, 224]


def tiny_family(family):
    """A session fixture: (tiny pipeline folder built by tdm.tiny.sd, its loaded backbone)."""
    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory):
        from tdm.tiny import sd

        build = getattr(sd, f"build_tiny_{family}")
        model = build(str(tmp_path_factory.mktemp("models") / f"tiny-{family}"))
        return model, sd_backbone(model)

    return fixture


def sd_backbone(model):
    return loaded_backbone(model, resolution=32)


def lora_student(backbone, rank=4, alpha=8.0):
    """A LoRA student that differs from the teacher (alpha ≠ rank, so the scale is checked)."""
    from tdm.lora import attach_lora

    net = backbone.load_denoiser()
    attach_lora(net, rank, alpha, backbone.lora_target_modules)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return net


def probe_input(backbone):
    """A fixed (x_t, t, condition) to compare networks on."""
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    return x, torch.tensor([500]), backbone.encode_prompts(PROMPTS[:1])


def unet_output(backbone, unet, probe):
    return backbone.model_output(unet, *probe)


def check_rollout_equals_pipeline(family):
    """The stock pipeline with the training-grid scheduler (latents=z, guidance 1) returns the
    training rollout's sample (docs/method.md §7)."""
    model, backbone = family
    from infer_tdm import sample_student, student_pipeline
    from tdm.method import TDM, TDMConfig
    from tdm.trajectory import StepGrid

    pipe, _ = student_pipeline(model, None, 1.0, torch.float32, "cpu")
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    out = sample_student(pipe, backbone, PROMPTS, GRID, latents=z.clone(), height=32, width=32,
                         output_type="latent").images
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.init_noise_sigma == 1.0
    assert pipe.scheduler.timesteps.tolist() == GRID
    torch.testing.assert_close(torch.as_tensor(pipe.scheduler.alphas_cumprod),
                               backbone.scheduler.alphas_cumprod, atol=0, rtol=0)
    traj = TDM(backbone.path, StepGrid(GRID), TDMConfig()).rollout(
        backbone.denoiser(pipe.unet), z, backbone.encode_prompts(PROMPTS))
    torch.testing.assert_close(out.float(), traj.sample, atol=1e-4, rtol=1e-4)
    assert out.abs().max() > 0.1


def check_upstream_lines_and_scale(family, lora_file):
    """The upstream snippet's lines, but for the path: DiffusionPipeline.from_pretrained,
    load_lora_weights (named 'tdm' and plain), set_adapters, a 4-step DPM-Solver++ sample with
    guidance 1. The LoRA gives the trained student's output; scale 0 is the base, 0.5 between."""
    model, backbone = family
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    student, probe = lora_file[1], probe_input(backbone)
    base_pipe = DiffusionPipeline.from_pretrained(model)
    base = unet_output(backbone, base_pipe.unet, probe)
    expected = unet_output(backbone, student, probe)
    assert (expected - base).abs().max() > 1e-3

    plain = DiffusionPipeline.from_pretrained(model)
    plain.load_lora_weights(lora_file[0])
    torch.testing.assert_close(unet_output(backbone, plain.unet, probe), expected, atol=1e-5, rtol=1e-5)

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(lora_file[0], adapter_name="tdm")
    pipe.set_adapters(["tdm"], [1.0])
    torch.testing.assert_close(unet_output(backbone, pipe.unet, probe), expected, atol=1e-5, rtol=1e-5)
    pipe.set_adapters(["tdm"], [0.0])
    torch.testing.assert_close(unet_output(backbone, pipe.unet, probe), base, atol=1e-6, rtol=1e-6)
    pipe.set_adapters(["tdm"], [0.5])
    half = unet_output(backbone, pipe.unet, probe)
    assert 1e-4 < (half - base).abs().max() < (expected - base).abs().max()
    assert (half - expected).abs().max() > 1e-4

    pipe.set_adapters(["tdm"], [1.0])
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    image = pipe(prompt=PROMPTS[0], negative_prompt="", num_inference_steps=4, num_images_per_prompt=1,
                 generator=torch.manual_seed(317), guidance_scale=1.0, height=32, width=32,
                 output_type="np").images
    base_pipe.scheduler = DPMSolverMultistepScheduler.from_config(base_pipe.scheduler.config)
    teacher = base_pipe(prompt=PROMPTS[0], num_inference_steps=4, generator=torch.manual_seed(317),
                        guidance_scale=1.0, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert np.abs(image - teacher).max() > 1e-3


def save_student(backbone, folder):
    from tdm.lora import save_lora

    student = lora_student(backbone)
    return save_lora(student, str(folder), backbone.lora_prefix), student


def check_kohya_round_trip(family, folder):
    """save_kohya_lora and the CLI write the same kohya file; diffusers' load_lora_weights reads it
    back to the peft student's output (alpha/rank honoured)."""
    model, backbone = family
    from diffusers import DiffusionPipeline

    from tdm.kohya import KOHYA_WEIGHT_NAME, save_kohya_lora

    path, student = save_student(backbone, folder)
    kohya_file = save_kohya_lora(student, str(folder / "student_kohya.safetensors"))
    state = load_file(kohya_file)
    assert all(k.startswith("lora_unet_") for k in state)
    name = next(k[:-len(".alpha")] for k in state if k.endswith("attn1_to_q.alpha"))
    assert "_attentions_0_transformer_blocks_0_attn1_to_q" in name
    assert state[name + ".alpha"].item() == 8.0 and state[name + ".lora_down.weight"].shape[0] == 4

    proc = run_script([sys.executable, "-m", "tdm.kohya", str(folder)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted = load_file(str(folder / KOHYA_WEIGHT_NAME))
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)

    probe = probe_input(backbone)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(kohya_file)
    torch.testing.assert_close(unet_output(backbone, pipe.unet, probe),
                               unet_output(backbone, student, probe), atol=1e-5, rtol=1e-5)


def check_train_export_sample(model, tmp_path, pipeline_class):
    """A few LoRA steps through accelerate launch, the export in the stock pipeline with the
    upstream lines, a 4-step sample, infer_tdm.py, and the kohya CLI on the output folder."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    proc = accelerate_launch(["--pretrained_model_name_or_path", model, "--output_dir", str(out),
                              "--resolution", "32", "--max_train_steps", "2", "--seed", "0",
                              "--prompts", os.path.join(ROOT, "assets", "prompts.txt"),
                              "--lora_rank", "4", "--learning_rate", "1e-3", "--cfg", "3.5",
                              "--checkpointing_steps", "0", "--validation_steps", "2",
                              "--report_to", "none", "--export_format", "kohya"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    lora = out / "pytorch_lora_weights.safetensors"
    keys = load_file(str(lora))
    assert keys and all(k.startswith("unet.") and "lora_" in k for k in keys)
    assert any(v.abs().sum() > 0 for k, v in keys.items() if "lora_B" in k)   # it trained
    assert (out / "samples" / "step-000002.png").is_file()

    pipe = DiffusionPipeline.from_pretrained(model)
    assert type(pipe).__name__ == pipeline_class
    pipe.load_lora_weights(str(lora), adapter_name="tdm")
    pipe.set_adapters(["tdm"], [1.0])
    image = pipe(prompt="a red cat", negative_prompt="", num_inference_steps=4, guidance_scale=1.0,
                 height=32, width=32, generator=torch.manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()

    grid = tmp_path / "grid.png"
    proc = run_script([sys.executable, os.path.join(ROOT, "infer_tdm.py"), "--weights", str(out),
                       "--prompt", "a red cat", "--teacher_steps", "2", "--output", str(grid)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script([sys.executable, "-m", "tdm.kohya", str(out)])
    assert proc.returncode == 0 and os.path.isfile(proc.stdout.strip()), proc.stderr[-3000:]
