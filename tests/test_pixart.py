"""The PixArt-α adapter on a tiny real pipeline: rollout, losses, LoRA export, stock-pipeline sampling."""
import numpy as np
import pytest
import torch

from conftest import teacher_and_lora_student
from tdm.lora import attach_lora, save_lora
from tdm.method import TDM, TDMConfig
from tdm.trajectory import StepGrid

PROMPTS = ["a red cat on a mat", "a blue boat at sea"]


def test_tiny_pipeline_loads_through_from_pretrained(tiny_pixart):
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    pipe = PixArtAlphaPipeline.from_pretrained(tiny_pixart)
    assert isinstance(pipe.transformer, PixArtTransformer2DModel)
    assert pipe.transformer.config.out_channels == 2 * pipe.transformer.config.in_channels


def test_condition_and_latents(backbone):
    cond = backbone.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].shape[:2] == (2, 120)
    assert cond["encoder_attention_mask"].sum(1).tolist()[0] < 120       # padded, masked
    assert backbone.latent_shape(32) == (4, 16, 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        backbone.check_resolution(30)


def test_rollout_equals_step_by_step_hand_computation(backbone):
    net = backbone.load_denoiser()
    cond = backbone.encode_prompts(PROMPTS)
    torch.manual_seed(0)
    z = torch.randn(2, 4, 16, 16)
    grid = StepGrid([899, 674, 449, 224])
    traj = TDM(backbone.path, grid, TDMConfig()).rollout(backbone.denoiser(net), z, cond)

    ac = backbone.scheduler.alphas_cumprod.double()
    x = z.double()
    with torch.no_grad():
        for i, t in enumerate(grid.timesteps):
            out = net(x.float(), timestep=torch.tensor([t, t]), added_cond_kwargs={"resolution": None,
                      "aspect_ratio": None}, **cond).sample
            eps = out[:, :4].double()
            x0 = (x - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
            if i + 1 < len(grid.timesteps):
                t_next = grid.timesteps[i + 1]
                x = ac[t_next].sqrt() * x0 + (1 - ac[t_next]).sqrt() * eps
    torch.testing.assert_close(traj.sample.double(), x0, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("loss", ["mse", "huber", "huber_norm"])
def test_student_gradient_is_zero_when_fake_score_is_teacher_and_cfg_is_one(backbone, loss):
    teacher_net, student_net = teacher_and_lora_student(backbone)
    cond = backbone.encode_prompts(PROMPTS)
    teacher, student = backbone.denoiser(teacher_net), backbone.denoiser(student_net)
    grads = {}
    for cfg in (1.0, 4.5):
        torch.manual_seed(0)
        tdm = TDM(backbone.path, StepGrid.uniform(4, 900), TDMConfig(cfg=cfg, loss=loss))
        iteration = tdm.start(student, cond, backbone.encode_prompts([""]), (4, 16, 16), "cpu")
        student_net.zero_grad()
        tdm.student_loss(iteration, student, teacher, teacher).backward()
        grads[cfg] = torch.cat([p.grad.flatten() for p in student_net.parameters() if p.requires_grad])
    assert torch.count_nonzero(grads[1.0]) == 0
    assert torch.count_nonzero(grads[4.5]) > 0   # the check above can fail


def test_fake_score_loss_trains_only_the_fake_score(backbone):
    teacher_net, student_net = teacher_and_lora_student(backbone)
    fake_net = backbone.load_denoiser()
    attach_lora(fake_net, 4, 4, backbone.lora_target_modules)
    cond = backbone.encode_prompts(PROMPTS)
    tdm = TDM(backbone.path, StepGrid.uniform(4, 900), TDMConfig(use_separate=True))
    iteration = tdm.start(backbone.denoiser(student_net), cond, backbone.encode_prompts([""]),
                          (4, 16, 16), "cpu")
    loss = tdm.fake_score_loss(iteration, backbone.denoiser(fake_net))
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is None for p in student_net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake_net.parameters())


def test_stock_pipeline_reproduces_the_training_rollout(tiny_pixart, backbone):
    """infer_tdm's 4-step DPM-Solver++(1) sampling equals the training rollout for the same noise."""
    from infer_tdm import sample_student, student_pipeline

    pipe, _ = student_pipeline(tiny_pixart, None, 1.0, torch.float32, "cpu")
    grid = StepGrid([899, 674, 449, 224])
    torch.manual_seed(1)
    z = torch.randn(2, 4, 16, 16)
    out = sample_student(pipe, backbone, PROMPTS, grid.timesteps, latents=z.clone(),
                         height=32, width=32, output_type="latent").images
    traj = TDM(backbone.path, grid, TDMConfig()).rollout(backbone.denoiser(pipe.transformer), z,
                                                          backbone.encode_prompts(PROMPTS))
    torch.testing.assert_close(out.float(), traj.sample, atol=1e-4, rtol=1e-4)
    assert out.abs().max() > 0.1


def test_upstream_sampler_runs_in_four_steps(tiny_pixart, backbone):
    from infer_tdm import sample_student, student_pipeline

    pipe, _ = student_pipeline(tiny_pixart, None, 1.0, torch.float32, "cpu")
    out = sample_student(pipe, backbone, PROMPTS[:1], [899, 674, 449, 224], torch.manual_seed(0),
                         height=32, width=32, output_type="np", sampler="upstream")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.solver_order == 2 and len(pipe.scheduler.timesteps) == 4
    assert out.images.shape == (1, 32, 32, 3)


def test_lora_export_loads_into_the_stock_pipeline(tiny_pixart, backbone, tmp_path):
    from tdm.sampling import resolve_weights

    _, student_net = teacher_and_lora_student(backbone)
    save_lora(student_net, str(tmp_path), backbone.lora_prefix)
    weights = resolve_weights(str(tmp_path))
    assert weights == ("lora", str(tmp_path / "pytorch_lora_weights.safetensors"))
    base = backbone.load_pipeline(torch.float32)
    pipe = backbone.load_pipeline(torch.float32, weights, lora_scale=1.0)

    def sample(p):
        return p(PROMPTS[0], num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
                 output_type="np", generator=torch.manual_seed(0), **backbone.pipeline_kwargs()).images

    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500])
    cond = backbone.encode_prompts(PROMPTS[:1])
    expected = backbone.model_output(student_net, x, t, cond)
    loaded = backbone.model_output(pipe.transformer, x, t, cond)
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)   # alpha/rank survived
    lora_image = sample(pipe)
    assert np.abs(lora_image - sample(base)).max() > 1e-3
    pipe.transformer.set_adapters(["tdm"], weights=[0.0])
    np.testing.assert_allclose(sample(pipe), sample(base), atol=1e-6)
    pipe.transformer.set_adapters(["tdm"], weights=[0.5])
    half = backbone.model_output(pipe.transformer, x, t, cond)
    base_out = backbone.model_output(base.transformer, x, t, cond)
    assert 0 < (half - base_out).abs().max() < (expected - base_out).abs().max()
