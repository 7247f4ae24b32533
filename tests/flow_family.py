"""Checks shared by the flow-matching family tests (tests/test_sd3.py, test_flux.py, test_sana.py,
test_wan.py): tiny pipelines as session fixtures, a random LoRA student exported as training does,
the flow conversion with the real model, the stock pipeline reproducing the training rollout, the
LoRA through the stock pipeline's lines (scale 1 = the student, scale 0 = the base). Helpers for
every family (stock_pipeline, check_full_student_becomes_the_transformer) are in conftest."""
import importlib

import pytest
import torch

from tdm.lora import attach_lora, save_lora
from tdm.method import TDM, TDMConfig
from tdm.trajectory import StepGrid

PROMPTS = ["a red cat on a mat", "a blue boat at sea"]


def tiny_pipeline(family, folder=None, **build_kwargs):
    """A session fixture: the folder of tdm.tiny.<family>'s build_tiny_<family>(**build_kwargs)."""
    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory):
        build = getattr(importlib.import_module(f"tdm.tiny.{family}"), f"build_tiny_{family}")
        return build(str(tmp_path_factory.mktemp("models") / (folder or f"tiny-{family}")), **build_kwargs)

    return fixture


def exported_lora_student(backbone, folder):
    """(network, folder): a random LoRA student (alpha ≠ rank, so a lost alpha header would show)
    exported to `folder` as training does."""
    net = backbone.load_denoiser()
    attach_lora(net, 4, 8, backbone.lora_target_modules)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_lora(net, str(folder), backbone.lora_prefix)
    return net, str(folder)


def assert_same_network(backbone, loaded, net, latent, t=700):
    """`loaded` (a pipeline's transformer) computes what `net` does on one random input."""
    x, t, cond = torch.randn(1, *latent), torch.tensor([t]), backbone.encode_prompts(PROMPTS[:1])
    torch.testing.assert_close(backbone.model_output(loaded, x, t, cond),
                               backbone.model_output(net, x, t, cond), atol=1e-5, rtol=1e-5)


def check_flow_conversion(backbone, x_t):
    """x̂0, ε̂ of the real model rebuild x_t and differ by its velocity v = ε − x0 (path.x0_eps
    'flow'); at σ = 1 (t = 999) all is noise. Returns (network, condition, t, v)."""
    net = backbone.load_denoiser()
    cond = backbone.encode_prompts(PROMPTS)
    t = torch.tensor([999, 300])
    v = backbone.model_output(net, x_t, t, cond)
    assert v.shape == x_t.shape
    x0, eps = backbone.denoiser(net)(x_t, t, cond)
    alpha, sigma = backbone.path.alpha_sigma(t, x_t.ndim)
    torch.testing.assert_close(alpha * x0 + sigma * eps, x_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps - x0, v, atol=1e-5, rtol=1e-5)   # velocity = ε − x0
    torch.testing.assert_close(eps[0], x_t[0])                      # σ = 1: all noise
    assert v.abs().mean() > 0.1
    return net, cond, t, v


def check_rollout_equals_pipeline(model, backbone, timesteps, z, pack=None, unpack=None,
                                  sigma_atol=0.0, **call):
    """FlowMatch Euler on the grid's sigmas in the stock pipeline (infer_tdm's loader and grid
    sampler) == the TDM rollout from the same noise `z` (docs/method.md §2, §7). `pack`/`unpack`:
    the pipeline's latent layout (FLUX); `call`: more pipeline-call arguments."""
    from infer_tdm import sample_student, student_pipeline

    pack, unpack = pack or (lambda x: x), unpack or (lambda x: x)
    pipe, _ = student_pipeline(model, None, 1.0, torch.float32, "cpu")
    out = sample_student(pipe, backbone, PROMPTS, timesteps, latents=pack(z.clone()), height=32,
                         width=32, output_type="latent", **call)
    out = unpack(out.frames if backbone.is_video else out.images)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    torch.testing.assert_close(pipe.scheduler.sigmas, torch.cat([backbone.path.sigma[timesteps],
                                                                 torch.zeros(1)]),
                               atol=sigma_atol, rtol=0)
    traj = TDM(backbone.path, StepGrid(timesteps), TDMConfig()).rollout(
        backbone.denoiser(pipe.transformer), z, backbone.encode_prompts(PROMPTS))
    torch.testing.assert_close(out.float(), traj.sample, atol=1e-4, rtol=1e-4)
    assert (out - z).abs().max() > 0.1


def check_lora_scales(pipe, sample, scales=(0.5, 1.0)):
    """A LoRA loaded as adapter "tdm": scale 0 samples the base (LoRA disabled), and the sample
    moves away from it as the scale grows. `sample(pipe)`: latents of a fixed call."""
    latents = {}
    for scale in (0.0, *scales):
        pipe.set_adapters(["tdm"], [scale])
        latents[scale] = sample(pipe)
    pipe.disable_lora()
    base = sample(pipe)
    torch.testing.assert_close(latents[0.0], base, atol=1e-6, rtol=0)
    small, large = ((latents[scale] - base).abs().max().item() for scale in scales)
    assert 0 < small < large and large > 1e-3
