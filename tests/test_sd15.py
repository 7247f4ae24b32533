"""The SD1.5 adapter and the kohya export on a tiny real StableDiffusionPipeline: condition, the
stock pipeline on the training grid, the upstream snippet's LoRA lines, kohya round trip,
training end to end. The helpers (underscore names) serve tests/test_sdxl.py too."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, accelerate_launch, loaded_backbone, run_script

PROMPTS = ["a red cat on a mat", "a blue boat at sea"]
GRID = [899, 674, 449, 224]


# -- helpers shared with test_sdxl.py ---------------------------------------------------------
def _tiny_family(family):
    """A session fixture: (tiny pipeline folder built by tdm.tiny.sd, its loaded backbone)."""
    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory):
        from tdm.tiny import sd

        build = getattr(sd, f"build_tiny_{family}")
        model = build(str(tmp_path_factory.mktemp("models") / f"tiny-{family}"))
        return model, _loaded_backbone(model)

    return fixture


def _loaded_backbone(model):
    return loaded_backbone(model, resolution=32)


def _student(backbone, rank=4, alpha=8.0):
    """A LoRA student that differs from the teacher (alpha ≠ rank, so the scale is checked)."""
    from tdm.lora import attach_lora

    net = backbone.load_denoiser()
    attach_lora(net, rank, alpha, backbone.lora_target_modules)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return net


def _probe(backbone):
    """A fixed (x_t, t, condition) to compare networks on."""
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    return x, torch.tensor([500]), backbone.encode_prompts(PROMPTS[:1])


def _unet_output(backbone, unet, probe):
    return backbone.model_output(unet, *probe)


def _check_rollout_equals_pipeline(family):
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


def _check_upstream_lines_and_scale(family, lora_file):
    """The upstream snippet's lines, but for the path: DiffusionPipeline.from_pretrained,
    load_lora_weights (named 'tdm' and plain), set_adapters, a 4-step DPM-Solver++ sample with
    guidance 1. The LoRA gives the trained student's output; scale 0 is the base, 0.5 between."""
    model, backbone = family
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    student, probe = lora_file[1], _probe(backbone)
    base_pipe = DiffusionPipeline.from_pretrained(model)
    base = _unet_output(backbone, base_pipe.unet, probe)
    expected = _unet_output(backbone, student, probe)
    assert (expected - base).abs().max() > 1e-3

    plain = DiffusionPipeline.from_pretrained(model)
    plain.load_lora_weights(lora_file[0])
    torch.testing.assert_close(_unet_output(backbone, plain.unet, probe), expected, atol=1e-5, rtol=1e-5)

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(lora_file[0], adapter_name="tdm")
    pipe.set_adapters(["tdm"], [1.0])
    torch.testing.assert_close(_unet_output(backbone, pipe.unet, probe), expected, atol=1e-5, rtol=1e-5)
    pipe.set_adapters(["tdm"], [0.0])
    torch.testing.assert_close(_unet_output(backbone, pipe.unet, probe), base, atol=1e-6, rtol=1e-6)
    pipe.set_adapters(["tdm"], [0.5])
    half = _unet_output(backbone, pipe.unet, probe)
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


def _save_student(backbone, folder):
    from tdm.lora import save_lora

    student = _student(backbone)
    return save_lora(student, str(folder), backbone.lora_prefix), student


def _check_kohya_round_trip(family, folder):
    """save_kohya_lora and the CLI write the same kohya file; diffusers' load_lora_weights reads it
    back to the peft student's output (alpha/rank honoured)."""
    model, backbone = family
    from diffusers import DiffusionPipeline

    from tdm.kohya import KOHYA_WEIGHT_NAME, save_kohya_lora

    path, student = _save_student(backbone, folder)
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

    probe = _probe(backbone)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(kohya_file)
    torch.testing.assert_close(_unet_output(backbone, pipe.unet, probe),
                               _unet_output(backbone, student, probe), atol=1e-5, rtol=1e-5)


def _check_train_export_sample(model, tmp_path, pipeline_class):
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


# -- SD1.5 ---------------------------------------------------------------------------------
tiny_sd15 = _tiny_family("sd15")


def test_adapter_is_picked_and_embeds_the_empty_prompt(tiny_sd15):
    from tdm.backbones.sd15 import StableDiffusionBackbone

    _, sd15 = tiny_sd15

    assert type(sd15) is StableDiffusionBackbone
    assert sd15.prediction_type == "epsilon" and sd15.lora_prefix == "unet"
    cond = sd15.encode_prompts(PROMPTS)
    assert set(cond) == {"encoder_hidden_states"}
    assert cond["encoder_hidden_states"].shape == (2, 77, 32)
    uncond = sd15.encode_prompts([""])["encoder_hidden_states"]
    assert uncond.abs().sum() > 0 and not torch.allclose(uncond[0], cond["encoder_hidden_states"][0])
    assert sd15.latent_shape(32) == (4, 16, 16)
    with pytest.raises(ValueError, match="multiple of 2"):
        sd15.check_resolution(31)
    torch.testing.assert_close(sd15.path.alpha[-1] ** 2,
                               sd15.scheduler.alphas_cumprod[-1].float())   # scaled_linear table


def test_prediction_type_is_read_from_the_scheduler_config(tiny_sd15, tmp_path):
    from tdm.backbones import load_backbone

    model = shutil.copytree(tiny_sd15[0], tmp_path / "v-model")
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, prediction_type="v_prediction")))
    bb = load_backbone(str(model))
    assert bb.prediction_type == "v_prediction"
    v, x_t, t = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor([300])
    alpha, sigma = bb.path.alpha_sigma(t, 4)
    x0, _ = bb.path.x0_eps(v, x_t, t, bb.prediction_type)
    torch.testing.assert_close(x0, alpha * x_t - sigma * v)


def test_stock_pipeline_reproduces_the_training_rollout(tiny_sd15):
    _check_rollout_equals_pipeline(tiny_sd15)


def test_upstream_snippet_lines_load_the_lora_and_honour_the_scale(tiny_sd15, tmp_path):
    _check_upstream_lines_and_scale(tiny_sd15, _save_student(tiny_sd15[1], tmp_path))


def test_kohya_export_loads_back_through_load_lora_weights(tiny_sd15, tmp_path):
    _check_kohya_round_trip(tiny_sd15, tmp_path)


def test_load_pipeline_takes_lora_and_full_students(tiny_sd15, tmp_path):
    _, sd15 = tiny_sd15
    lora_path, student = _save_student(sd15, tmp_path / "lora")
    probe = _probe(sd15)
    pipe = sd15.load_pipeline(torch.float32, ("lora", lora_path), lora_scale=1.0)
    torch.testing.assert_close(_unet_output(sd15, pipe.unet, probe), _unet_output(sd15, student, probe),
                               atol=1e-5, rtol=1e-5)
    full = sd15.load_denoiser()
    with torch.no_grad():
        full.conv_out.bias.add_(0.5)
    full.save_pretrained(str(tmp_path / "unet"))
    pipe = sd15.load_pipeline(torch.float32, ("full", str(tmp_path / "unet")))
    torch.testing.assert_close(_unet_output(sd15, pipe.unet, probe), _unet_output(sd15, full, probe))


@pytest.mark.slow
def test_train_export_and_sample_in_the_stock_pipeline(tiny_sd15, tmp_path):
    _check_train_export_sample(tiny_sd15[0], tmp_path, "StableDiffusionPipeline")
