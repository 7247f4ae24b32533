"""The CogVideoX adapter on tiny real pipelines: the zero-terminal-SNR path, the rollout in the
stock pipeline, the upstream LoRA snippet, and training + inference through the scripts."""
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, accelerate_launch, loaded_backbone, run_script, teacher_and_lora_student
from harness import card_snippet
from tdm.lora import save_lora
from tdm.method import TDM, TDMConfig
from tdm.trajectory import StepGrid

PROMPTS = ["a red cat on a mat", "a blue boat at sea"]
GRID = [999, 856, 665, 399]
FRAMES = 9          # tiny: 3 latent frames
SIZE = 32
HAS_VIDEO_ENCODER = any(importlib.util.find_spec(m) for m in ("imageio", "cv2"))


def _build(tmp_path_factory, name, rotary):
    from tdm.tiny.cogvideox import build_tiny_cogvideox

    return build_tiny_cogvideox(str(tmp_path_factory.mktemp("models") / name), rotary=rotary)


@pytest.fixture(scope="session")
def tiny_cogvideox(tmp_path_factory):
    """CogVideoX-2B-like: sincos positions, CogVideoXDDIMScheduler with the 2B config."""
    return _build(tmp_path_factory, "tiny-cogvideox", rotary=False)


@pytest.fixture(scope="session")
def tiny_cogvideox_rotary(tmp_path_factory):
    """CogVideoX-5B-like: rotary position embeddings."""
    return _build(tmp_path_factory, "tiny-cogvideox-rotary", rotary=True)


def _backbone(path, options=None):
    return loaded_backbone(path, options)


@pytest.fixture(scope="session")
def cog(tiny_cogvideox):
    return _backbone(tiny_cogvideox)


def _noise(backbone, batch=2, seed=1):
    return torch.randn(batch, *backbone.latent_shape(SIZE, FRAMES), generator=torch.manual_seed(seed))


def test_adapter_shapes_condition_and_resolution(tiny_cogvideox, cog):
    from diffusers import CogVideoXPipeline

    from tdm.backbones import backbone_class

    assert backbone_class("auto", tiny_cogvideox).name == "cogvideox"
    pipe = CogVideoXPipeline.from_pretrained(tiny_cogvideox)
    cond = cog.encode_prompts(PROMPTS)
    expected, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device="cpu")
    torch.testing.assert_close(cond["encoder_hidden_states"], expected)
    assert cond["encoder_hidden_states"].shape[:2] == (2, 226)
    assert cog.is_video and cog.prediction_type == "v_prediction"
    assert cog.latent_shape(SIZE, FRAMES) == (3, 4, 8, 8)     # [F, C, h, w] as the pipeline's
    assert cog.pipeline_kwargs(FRAMES)["num_frames"] == FRAMES
    with pytest.raises(ValueError, match="multiples of 8"):
        cog.check_resolution(36)
    wide = _backbone(tiny_cogvideox, {"height": 32, "width": 64})
    assert wide.latent_shape(SIZE, 13) == (4, 4, 8, 16)
    preview = cog.decode(_noise(cog))
    assert preview.shape == (2, 3, SIZE, SIZE) and 0 <= preview.min() and preview.max() <= 1


def test_path_is_the_cogvideox_table_with_pure_noise_at_999(cog):
    """ᾱ with the SNR shift (snr_shift_scale 3) and zero terminal SNR (docs/method.md §1)."""
    from diffusers import DDPMScheduler

    ac = cog.scheduler.alphas_cumprod.float()
    torch.testing.assert_close(cog.path.alpha**2, ac, atol=1e-6, rtol=1e-5)
    assert cog.path.alpha[999] == 0 and cog.path.sigma[999] == 1
    unshifted = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              rescale_betas_zero_snr=True).alphas_cumprod
    assert (ac[500] - unshifted[500]).abs() > 0.05            # the shift is in the table
    x_t, v = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 3, 4, 8, 8)
    x0, eps = cog.path.x0_eps(v, x_t, torch.tensor([999, 999]), "v_prediction")
    torch.testing.assert_close(x0, -v)                         # x̂0 = α x − σ v with α = 0
    torch.testing.assert_close(eps, x_t)


def test_training_losses_stay_finite_on_the_999_grid(cog):
    """No division by α_999: t_e ≤ τ_{K−1}+1 (or < t_g − 20 with randmid) and t ≤ T − 10."""
    grid = StepGrid(GRID)
    for separate in (True, False):
        config = TDMConfig(use_separate=separate, use_randmid=True)
        for draw in TDM(cog.path, grid, config).draw(4, 4096, "cpu"):
            assert draw.t_e.max() < 999 and draw.t.max() < 999
    teacher, student = teacher_and_lora_student(cog)
    _, fake = teacher_and_lora_student(cog)
    cond = cog.encode_prompts(PROMPTS)
    tdm = TDM(cog.path, grid, TDMConfig(cfg=6.0, use_randmid=True, loss="huber"))
    iteration = tdm.start(cog.denoiser(student), cond, cog.encode_prompts([""]),
                          _noise(cog).shape[1:], "cpu")
    fake_score_loss = tdm.fake_score_loss(iteration, cog.denoiser(fake))
    student_loss = tdm.student_loss(iteration, cog.denoiser(student), cog.denoiser(teacher),
                                    cog.denoiser(fake))
    student_loss.backward()
    assert torch.isfinite(fake_score_loss) and torch.isfinite(student_loss) and fake_score_loss > 0
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("variant", ["sincos", "rotary"])
def test_stock_pipeline_reproduces_the_training_rollout(request, variant):
    """The stock CogVideoXPipeline with first-order DPM-Solver++ on the CogVideoX ᾱ table
    returns the training rollout's x̂0 for the same noise (rotary tables as the pipeline's)."""
    from infer_tdm import sample_student, student_pipeline

    path = request.getfixturevalue("tiny_cogvideox" if variant == "sincos" else "tiny_cogvideox_rotary")
    backbone = _backbone(path)
    pipe, _ = student_pipeline(path, None, 1.0, torch.float32, "cpu")
    z = _noise(backbone)
    out = sample_student(pipe, backbone, PROMPTS, GRID, latents=z.clone(), height=SIZE, width=SIZE,
                         output_type="latent", num_frames=FRAMES).frames
    traj = TDM(backbone.path, StepGrid(GRID), TDMConfig()).rollout(
        backbone.denoiser(pipe.transformer), z, backbone.encode_prompts(PROMPTS))
    assert pipe.scheduler.timesteps.tolist() == GRID
    torch.testing.assert_close(out.float(), traj.sample, atol=1e-5, rtol=1e-5)
    assert out.abs().max() > 0.1
    if variant == "sincos":   # the base class's scheduler (no SNR shift) would not match
        from tdm.backbones.base import Backbone

        pipe.scheduler = backbone.scheduler
        kwargs = Backbone.use_training_grid(backbone, pipe, GRID)
        unshifted = pipe(prompt=PROMPTS, latents=z.clone(), height=SIZE, width=SIZE, guidance_scale=1,
                         output_type="latent", num_frames=FRAMES, **kwargs).frames
        assert (unshifted.float() - traj.sample).abs().max() > 1e-2


def test_upstream_sampler_is_the_pipeline_scheduler(tiny_cogvideox, cog):
    from diffusers import CogVideoXDDIMScheduler

    from infer_tdm import sample_student, student_pipeline

    pipe, _ = student_pipeline(tiny_cogvideox, None, 1.0, torch.float32, "cpu")
    sample_student(pipe, cog, PROMPTS[:1], GRID, output_type="latent", num_frames=FRAMES)
    out = sample_student(pipe, cog, PROMPTS[:1], GRID, torch.manual_seed(0), output_type="np",
                         sampler="upstream", num_frames=FRAMES)
    assert type(pipe.scheduler) is CogVideoXDDIMScheduler
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]   # trailing spacing
    assert out.frames.shape == (1, FRAMES, SIZE, SIZE, 3)


def test_upstream_lora_snippet_and_adapter_scale(tiny_cogvideox, cog, tmp_path):
    """The authors' CogVideoX snippet, unchanged but for the paths; then the scale is honoured."""
    from diffusers import CogVideoXPipeline
    from diffusers.utils import export_to_video

    save_lora(teacher_and_lora_student(cog)[1], str(tmp_path), cog.lora_prefix)
    lora_path = str(tmp_path / "pytorch_lora_weights.safetensors")

    def snippet(pipe):
        generator = torch.manual_seed(8888)
        return pipe(PROMPTS[0], guidance_scale=1, num_inference_steps=4, num_frames=FRAMES,
                    generator=generator).frames[0]

    pipe = CogVideoXPipeline.from_pretrained(tiny_cogvideox, torch_dtype=torch.float32)
    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling()
    base_frames = snippet(pipe)
    pipe.load_lora_weights(lora_path)
    frames = snippet(pipe)
    assert len(frames) == FRAMES and frames[0].size == (SIZE, SIZE)
    assert np.abs(np.asarray(frames[0], float) - np.asarray(base_frames[0], float)).max() > 0
    try:
        video = export_to_video(frames, str(tmp_path / "output-TDM.mp4"), fps=8)
        with open(video, "rb") as f:
            assert f.read(12)[4:8] == b"ftyp"                 # an MP4 container
    except ImportError:
        assert not HAS_VIDEO_ENCODER                           # neither imageio nor opencv here

    x, t, cond = _noise(cog, 1), torch.tensor([500]), cog.encode_prompts(PROMPTS[:1])
    base = cog.load_pipeline(torch.float32)
    scaled = cog.load_pipeline(torch.float32, ("lora", lora_path), lora_scale=1.0)
    full = cog.model_output(scaled.transformer, x, t, cond)
    base_out = cog.model_output(base.transformer, x, t, cond)
    torch.testing.assert_close(cog.model_output(pipe.transformer, x, t, cond), full)
    assert (full - base_out).abs().max() > 1e-4
    scaled.set_adapters(["tdm"], [0.5])
    half = cog.model_output(scaled.transformer, x, t, cond)
    assert 0 < (half - base_out).abs().max() < (full - base_out).abs().max()
    scaled.set_adapters(["tdm"], [0.0])
    torch.testing.assert_close(cog.model_output(scaled.transformer, x, t, cond), base_out)


def test_full_student_folder_loads_into_the_pipeline(cog, tmp_path):
    from tdm.sampling import resolve_weights

    student = cog.load_denoiser()
    with torch.no_grad():
        student.proj_out.weight.add_(0.1)
    student.save_pretrained(str(tmp_path / "transformer"))
    pipe = cog.load_pipeline(torch.float32, resolve_weights(str(tmp_path)))
    torch.testing.assert_close(pipe.transformer.proj_out.weight, student.proj_out.weight)


@pytest.mark.slow
def test_train_export_and_infer_video(tiny_cogvideox, tmp_path, monkeypatch):
    out = tmp_path / "run"
    proc = accelerate_launch([
        "--pretrained_model_name_or_path", tiny_cogvideox, "--output_dir", str(out),
        "--resolution", str(SIZE), "--num_frames", str(FRAMES), "--timesteps", "999,856,665,399",
        "--max_train_steps", "2", "--validation_steps", "2", "--train_batch_size", "2",
        "--lora_rank", "4", "--cfg", "6", "--use_huber", "--use_separate", "--seed", "0",
        "--prompts", os.path.join(ROOT, "assets", "prompts.txt")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert Image.open(out / "samples" / "step-000002.png").size[1] == SIZE

    video = tmp_path / "x.mp4"
    proc = run_script([sys.executable, os.path.join(ROOT, "infer_tdm.py"), "--weights", str(out),
                       "--prompt", "a red cat", "--num_frames", str(FRAMES), "--output", str(video)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    if HAS_VIDEO_ENCODER:
        assert video.stat().st_size > 0
    else:   # infer_tdm falls back to GIF without a video encoder
        gif = Image.open(tmp_path / "x.gif")
        assert gif.n_frames == FRAMES and gif.size == (SIZE, SIZE)
    assert "[999, 856, 665, 399]" in proc.stdout

    # the model card's snippet, run as written, samples the frames infer_tdm.py samples (with the
    # exported LoRA moved far from 0, so that the student's frames differ from the teacher's)
    from safetensors.torch import load_file, save_file

    import infer_tdm
    from tdm.model_card import EXAMPLE_PROMPT

    lora_file = str(out / "pytorch_lora_weights.safetensors")
    generator = torch.Generator().manual_seed(0)
    save_file({k: v + 0.3 * torch.randn(v.shape, generator=generator) if "lora_B" in k else v
               for k, v in load_file(lora_file).items()}, lora_file)
    card = (out / "README.md").read_text()
    namespace = {}
    exec(compile(card_snippet(card), "model_card_snippet", "exec"), namespace)
    written = {}
    monkeypatch.setattr(infer_tdm, "save_videos",
                        lambda videos, names, output, fps: written.update(videos=videos) or [output])
    assert infer_tdm.main(["--weights", str(out), "--prompt", EXAMPLE_PROMPT, "--seed", "0",
                           "--output", str(tmp_path / "y.mp4")]) == 0
    snippet_frames, infer_frames = namespace["frames"], written["videos"][0][0]
    assert len(snippet_frames) == len(infer_frames) == FRAMES
    for a, b in zip(snippet_frames, infer_frames):
        assert a.size == b.size == (SIZE, SIZE)
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    snippet = card_snippet(card)   # the same call with the LoRA off: the teacher
    namespace["pipe"].transformer.disable_adapters()
    exec(compile(snippet[snippet.index("frames = pipe("):], "call", "exec"), namespace)
    assert max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()
               for a, b in zip(namespace["frames"], snippet_frames)) > 8
