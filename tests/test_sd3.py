"""The SD3 adapter on a tiny real StableDiffusion3Pipeline: the shifted-sigma flow path, the flow
conversion, rollout = stock pipeline, the upstream snippet's LoRA and DPM-Solver lines, and a
short `accelerate launch` run."""
import os
import sys

import numpy as np
import pytest
import torch

from conftest import (ROOT, accelerate_launch, check_full_student_becomes_the_transformer,
                      loaded_backbone, run_script)
from flow_family import (PROMPTS, assert_same_network, check_flow_conversion, check_lora_scales,
                         check_rollout_equals_pipeline, exported_lora_student, tiny_pipeline)
from tdm.lora import attach_lora
from tdm.method import TDM, TDMConfig
from tdm.trajectory import StepGrid

SNIPPET_PROMPT = "A cute panda holding a sign says TDM SOTA!"
LATENT = (16, 16, 16)


tiny_sd3 = tiny_pipeline("sd3")


@pytest.fixture(scope="session")
def sd3(tiny_sd3):
    return loaded_backbone(tiny_sd3)


@pytest.fixture(scope="session")
def sana_scheduler_repo(tmp_path_factory):
    """A local stand-in for the hub repo the upstream snippet loads its DPM-Solver config from."""
    from diffusers import DPMSolverMultistepScheduler

    from tdm.backbones.sd3 import UPSTREAM_DPM_SOLVER_CONFIG

    folder = tmp_path_factory.mktemp("hub") / "Sana_1600M_1024px_BF16_diffusers"
    DPMSolverMultistepScheduler(**UPSTREAM_DPM_SOLVER_CONFIG).save_pretrained(str(folder / "scheduler"))
    return str(folder)


@pytest.fixture(scope="session")
def student_lora(sd3, tmp_path_factory):
    return exported_lora_student(sd3, tmp_path_factory.mktemp("lora"))


def test_tiny_pipeline_loads_and_selects_the_sd3_adapter(tiny_sd3, sd3):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert pipe.vae.config.latent_channels == 16 and pipe.scheduler.config.shift == 3.0
    assert type(sd3).__name__ == "SD3Backbone" and sd3.prediction_type == "flow"
    assert sd3.latent_shape(32) == LATENT
    with pytest.raises(ValueError, match="multiple of 4"):
        sd3.check_resolution(30)


def test_condition_holds_three_encoders_and_pooled_projections(sd3):
    cond = sd3.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, 77 + 256, 32)
    assert cond["pooled_projections"].shape == (2, 32)
    uncond = sd3.encode_prompts([""])
    assert not torch.allclose(uncond["pooled_projections"], cond["pooled_projections"][:1])


def test_path_is_the_schedulers_shifted_sigmas(sd3):
    """σ_t = shift-3 sigma of timestep t + 1 (docs/method.md §1): the table read backwards, σ_999 = 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    torch.testing.assert_close(sd3.path.sigma, scheduler.sigmas.flip(0), atol=0, rtol=0)
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    torch.testing.assert_close(sd3.path.sigma.double(), 3 * u / (1 + 2 * u), atol=3e-7, rtol=0)
    torch.testing.assert_close(sd3.path.alpha, 1 - sd3.path.sigma)
    assert sd3.path.sigma[999] == 1 and sd3.path.sigma[0] > 0
    assert bool((sd3.path.sigma.diff() > 0).all())          # a high index is more noise
    t = torch.tensor([899, 674, 449, 224])
    torch.testing.assert_close(sd3.timestep(t), 1000 * sd3.path.sigma[t])


def test_flow_conversion_round_trips_with_the_real_model(sd3):
    torch.manual_seed(0)
    check_flow_conversion(sd3, torch.randn(2, *LATENT))


@pytest.mark.parametrize("timesteps", [[899, 674, 449, 224], [999, 749, 499, 249], [999, 500]])
def test_stock_pipeline_reproduces_the_training_rollout(tiny_sd3, sd3, timesteps):
    """Euler on the grid's sigmas (stock scheduler, stock pipeline) == the TDM rollout."""
    torch.manual_seed(1)
    check_rollout_equals_pipeline(tiny_sd3, sd3, timesteps, torch.randn(2, *LATENT))


def test_training_losses_reach_only_their_network(sd3):
    teacher_net, student_net, fake_net = (sd3.load_denoiser() for _ in range(3))
    for net in (student_net, fake_net):
        attach_lora(net, 4, 4, sd3.lora_target_modules)
    cond, uncond = sd3.encode_prompts(PROMPTS), sd3.encode_prompts([""])
    teacher, student, fake = (sd3.denoiser(n) for n in (teacher_net, student_net, fake_net))
    tdm = TDM(sd3.path, StepGrid.uniform(4, 1000), TDMConfig(cfg=7.0, use_separate=True))
    iteration = tdm.start(student, cond, uncond, LATENT, "cpu")
    tdm.fake_score_loss(iteration, fake).backward()
    assert all(p.grad is None for p in student_net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake_net.parameters())
    loss = tdm.student_loss(iteration, student, teacher, fake)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student_net.parameters())


def _upstream_snippet_pipe(model, lora, sana_repo, scale=0.125):
    """The upstream TDM-SD3 lines with local paths (hub repos → folders, fp16/cuda → fp32/cpu;
    the optional AutoencoderTiny swap is left out)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.load_lora_weights(lora, adapter_name='tdm')
    pipe.set_adapters(["tdm"], [scale])
    pipe.scheduler = DPMSolverMultistepScheduler.from_pretrained(sana_repo, subfolder="scheduler")
    pipe.scheduler.config['flow_shift'] = 6
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _snippet_sample(pipe, output_type="pil"):
    return pipe(prompt=SNIPPET_PROMPT, negative_prompt="", num_inference_steps=4, height=32,
                width=32, num_images_per_prompt=1, guidance_scale=1., output_type=output_type,
                generator=torch.manual_seed(8888)).images


def test_upstream_snippet_loads_the_lora_and_honours_its_scale(tiny_sd3, sd3, student_lora,
                                                               sana_scheduler_repo):
    net, folder = student_lora
    pipe = _upstream_snippet_pipe(tiny_sd3, folder, sana_scheduler_repo)
    assert _snippet_sample(pipe)[0].size == (32, 32)
    assert pipe.scheduler.config.flow_shift == 6 and pipe.scheduler.config.use_flow_sigmas

    # The adapter's upstream sampler is the snippet's scheduler.
    from diffusers import DPMSolverMultistepScheduler

    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    reference = public(DPMSolverMultistepScheduler.from_config(pipe.scheduler.config).config)
    assert sd3.use_upstream_sampler(pipe, 4) == {"num_inference_steps": 4}
    assert public(pipe.scheduler.config) == reference

    # Scale 1 reproduces the trained network (rank, alpha and keys survived the export).
    pipe.set_adapters(["tdm"], [1.0])
    assert_same_network(sd3, pipe.transformer, net, LATENT)
    check_lora_scales(pipe, lambda p: _snippet_sample(p, "latent"), scales=(0.125, 1.0))


def test_adapter_load_pipeline_equals_the_snippet(tiny_sd3, sd3, student_lora, sana_scheduler_repo):
    """infer_tdm's loader (LoRA file from resolve_weights, --lora_scale) = the snippet's lines."""
    from tdm.sampling import resolve_weights

    _, folder = student_lora
    weights = resolve_weights(folder)
    assert weights == ("lora", os.path.join(folder, "pytorch_lora_weights.safetensors"))
    ours = sd3.load_pipeline(torch.float32, weights, lora_scale=0.125)
    sd3.use_upstream_sampler(ours, 4, flow_shift=6)
    ours.set_progress_bar_config(disable=True)
    snippet = _upstream_snippet_pipe(tiny_sd3, folder, sana_scheduler_repo)
    torch.testing.assert_close(_snippet_sample(ours, "latent"), _snippet_sample(snippet, "latent"))


def test_full_student_folder_becomes_the_pipeline_transformer(sd3, tmp_path):
    check_full_student_becomes_the_transformer(sd3, LATENT, tmp_path)


@pytest.mark.slow
def test_accelerate_training_exports_a_lora_the_snippet_samples(tiny_sd3, sd3, sana_scheduler_repo,
                                                                 tmp_path):
    from safetensors.torch import load_file
    from PIL import Image

    from conftest import expect_success, tiny_flags

    out = tmp_path / "run"
    expect_success(accelerate_launch(tiny_flags(
        tiny_sd3, out, 2, "--train_mode", "lora", "--lora_rank", "4", "--learning_rate", "1e-3",
        "--total_steps", "1000", "--cfg", "7.0", "--use_huber", "--use_separate",
        "--train_batch_size", "2", "--checkpointing_steps", "2", "--validation_steps", "2",
        "--max_sequence_length", "32")))
    assert any((out / "checkpoint-2").glob("*.safetensors"))
    assert (out / "samples" / "step-000002.png").is_file()
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(".attn.add_q_proj.lora_A" in k for k in lora)
    assert all(k.startswith("transformer.") for k in lora)

    pipe = _upstream_snippet_pipe(tiny_sd3, str(out), sana_scheduler_repo)
    trained = _snippet_sample(pipe, "latent")
    pipe.set_adapters(["tdm"], [0.])
    assert (trained - _snippet_sample(pipe, "latent")).abs().max() > 0   # the LoRA trained

    image = tmp_path / "compare.png"
    expect_success(run_script([sys.executable, os.path.join(ROOT, "infer_tdm.py"), "--weights", str(out),
                      "--prompt", "a red cat", "--sampler", "upstream", "--flow_shift", "6",
                      "--lora_scale", "0.125", "--teacher_steps", "2", "--output", str(image)]))
    assert Image.open(image).size[1] == 2 * 32
    grid = tmp_path / "grid.png"
    expect_success(run_script([sys.executable, os.path.join(ROOT, "infer_tdm.py"), "--weights", str(out),
                      "--prompt", "a red cat", "--output", str(grid)]))
    assert np.asarray(Image.open(grid)).shape == (32, 32, 3)
