"""The Wan2.1 adapter on a tiny real WanPipeline: the shifted flow path against the shipped UniPC
scheduler, the flow conversion, the stock pipeline reproducing the training rollout, LoRA export
loaded with WanPipeline's own lines, the model-fit checks, and training + inference through the
scripts."""
import importlib.util
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (ROOT, accelerate_launch, expect_success, loaded_backbone, stock_pipeline,
                      tiny_flags)
from flow_family import (PROMPTS, check_flow_conversion, check_rollout_equals_pipeline,
                         exported_lora_student, tiny_pipeline)
from harness import card_snippet

FRAMES = 5          # tiny: 2 latent frames
SIZE = 32
LATENT = (16, 2, 4, 4)   # [C, F, h, w] per video, as WanPipeline.prepare_latents
HAS_VIDEO_ENCODER = any(importlib.util.find_spec(m) for m in ("imageio", "cv2"))


tiny_wan = tiny_pipeline("wan")


@pytest.fixture(scope="session")
def wan(tiny_wan):
    return loaded_backbone(tiny_wan)


@pytest.fixture(scope="session")
def pipe(tiny_wan):
    return stock_pipeline(tiny_wan)


@pytest.fixture(scope="session")
def student_lora(wan, tmp_path_factory):
    return exported_lora_student(wan, tmp_path_factory.mktemp("lora"))


def _noise(batch=2, seed=1):
    return torch.randn(batch, *LATENT, generator=torch.manual_seed(seed))


def test_pipeline_loads_and_selects_the_adapter_with_the_pipelines_shapes(tiny_wan, wan, pipe):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from tdm.backbones import backbone_class

    assert backbone_class("auto", tiny_wan).name == "wan" and type(wan).__name__ == "WanBackbone"
    assert isinstance(pipe.transformer, WanTransformer3DModel) and isinstance(pipe.vae, AutoencoderKLWan)
    assert isinstance(pipe.text_encoder, UMT5EncoderModel)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler) and pipe.scheduler.config.flow_shift == 3.0
    assert wan.is_video and wan.prediction_type == "flow" and wan.flow_shift == 3.0
    assert wan.latent_shape(SIZE, FRAMES) == LATENT
    made = pipe.prepare_latents(1, 16, SIZE, SIZE, FRAMES, torch.float32, "cpu", torch.manual_seed(0))
    assert tuple(made.shape[1:]) == LATENT
    assert wan.latent_shape(SIZE, 81)[1] == 21                        # 81 frames → 21 latent frames
    wide = loaded_backbone(tiny_wan, {"height": 32, "width": 64})     # 480×832 in the config
    assert wide.latent_shape(SIZE, 9) == (16, 3, 4, 8)
    assert wan.pipeline_kwargs(FRAMES) == {"num_frames": FRAMES, "max_sequence_length": 512}
    preview = wan.decode(_noise())
    assert preview.shape == (2, 3, SIZE, SIZE) and 0 <= preview.min() and preview.max() <= 1


def test_condition_is_the_pipelines_encode_prompt(wan, pipe):
    cond = wan.encode_prompts(PROMPTS)
    expected, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device="cpu",
                                     max_sequence_length=512)
    torch.testing.assert_close(cond["encoder_hidden_states"], expected)
    assert cond["encoder_hidden_states"].shape == (2, 512, 32)
    assert cond["encoder_hidden_states"][:, 20:].abs().max() == 0      # zero beyond the tokens
    uncond = wan.encode_prompts([""])["encoder_hidden_states"]
    assert not torch.allclose(uncond[0], cond["encoder_hidden_states"][0])


def test_path_is_flow_matching_on_the_shipped_schedulers_shifted_sigmas(tiny_wan, wan, pipe):
    """σ_t = s·u/(1 + (s − 1)u), u = (t + 1)/1000, s = flow_shift 3 (docs/method.md §1): what the
    shipped UniPC scheduler gives those u, and σ_999 = 1."""
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    torch.testing.assert_close(wan.path.sigma.double(), 3 * u / (1 + 2 * u), atol=3e-7, rtol=0)
    torch.testing.assert_close(wan.path.alpha, 1 - wan.path.sigma)
    assert wan.path.sigma[999] == 1 and bool((wan.path.sigma.diff() > 0).all())
    grid = [999, 856, 665, 399, 120]
    unipc = type(pipe.scheduler).from_config(pipe.scheduler.config)
    unipc.set_timesteps(sigmas=np.array([(t + 1) / 1000 for t in grid]))
    torch.testing.assert_close(unipc.sigmas[:-1].float(), wan.path.sigma[grid], atol=3e-6, rtol=0)
    t = torch.tensor(grid)
    torch.testing.assert_close(wan.timestep(t), 1000 * wan.path.sigma[t])
    shifted = loaded_backbone(tiny_wan, {"flow_shift": 5.0})           # 720p: --backbone_options
    torch.testing.assert_close(shifted.path.sigma[499], torch.tensor(2.5 / 3.0))


def test_the_shift_is_read_from_either_kind_of_flow_scheduler():
    """UniPC/DPM-Solver on flow sigmas (`flow_shift`, Wan2.1 as shipped) or FlowMatch Euler
    (`shift`, as diffusers' own Wan tests build it); a DDPM-sigma UniPC is not a flow model."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from tdm.backbones.wan import flow_shift_of
    from tdm.tiny.wan import WAN21_SCHEDULER_CONFIG

    assert flow_shift_of(UniPCMultistepScheduler(**WAN21_SCHEDULER_CONFIG).config) == 3.0
    assert flow_shift_of(FlowMatchEulerDiscreteScheduler(shift=7.0).config) == 7.0
    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        flow_shift_of(UniPCMultistepScheduler().config)
    with pytest.raises(ValueError, match="fixed shift"):
        flow_shift_of(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)


def test_flow_conversion_round_trips_with_the_real_model(wan):
    _, _, _, v = check_flow_conversion(wan, _noise())
    assert (v[0] - v[1]).abs().max() > 1e-3


@pytest.mark.parametrize("timesteps", [[999, 749, 499, 249], [999, 856, 665, 399], [899, 449]])
def test_stock_pipeline_reproduces_the_training_rollout(tiny_wan, wan, timesteps):
    """Euler of the stock FlowMatchEulerDiscreteScheduler on the grid's sigmas, in the stock
    WanPipeline, == the TDM rollout (docs/method.md §2, §7)."""
    check_rollout_equals_pipeline(tiny_wan, wan, timesteps, _noise(), sigma_atol=1e-7,
                                  num_frames=FRAMES)


def test_upstream_sampler_is_the_shipped_unipc_with_flow_shift(tiny_wan, wan):
    from diffusers import UniPCMultistepScheduler

    from infer_tdm import sample_student, student_pipeline

    student, _ = student_pipeline(tiny_wan, None, 1.0, torch.float32, "cpu")
    out = sample_student(student, wan, PROMPTS[:1], [999, 749, 499, 249], torch.manual_seed(0),
                         height=SIZE, width=SIZE, output_type="np", sampler="upstream",
                         flow_shift=5.0, num_frames=FRAMES)
    assert type(student.scheduler) is UniPCMultistepScheduler
    assert student.scheduler.config.flow_shift == 5.0 and len(student.scheduler.timesteps) == 4
    assert out.frames.shape == (1, FRAMES, SIZE, SIZE, 3)


def test_lora_export_loads_with_load_lora_weights_and_set_adapters(tiny_wan, wan, student_lora):
    """WanPipeline's own lines; the loaded student is the trained one, and scale 0 the teacher."""
    from diffusers import WanPipeline

    net, folder = student_lora
    pipe = WanPipeline.from_pretrained(tiny_wan, dtype=torch.float32)
    pipe.load_lora_weights(folder, adapter_name="tdm")
    pipe.set_adapters(["tdm"], [1.0])
    x, t, cond = _noise(), torch.tensor([999, 500]), wan.encode_prompts(PROMPTS)
    with torch.no_grad():
        full = wan.model_output(pipe.transformer, x, t, cond)
        torch.testing.assert_close(full, wan.model_output(net, x, t, cond), atol=1e-5, rtol=1e-5)
        base = wan.model_output(wan.load_denoiser(), x, t, cond)
        assert (full - base).abs().max() > 1e-3
        pipe.set_adapters(["tdm"], [0.5])
        half = wan.model_output(pipe.transformer, x, t, cond)
        assert 0 < (half - base).abs().max() < (full - base).abs().max()
        pipe.set_adapters(["tdm"], [0.0])
        torch.testing.assert_close(wan.model_output(pipe.transformer, x, t, cond), base)
    pipe.set_adapters(["tdm"], [1.0])
    video = pipe(PROMPTS[0], height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=4,
                 guidance_scale=1.0, generator=torch.manual_seed(0)).frames[0]
    assert video.shape == (FRAMES, SIZE, SIZE, 3)


def test_full_student_folder_loads_into_the_pipeline(wan, tmp_path):
    from tdm.sampling import resolve_weights

    student = wan.load_denoiser()
    with torch.no_grad():
        student.proj_out.weight.add_(0.1)
    student.save_pretrained(str(tmp_path / "transformer"))
    pipe = wan.load_pipeline(torch.float32, resolve_weights(str(tmp_path)))
    torch.testing.assert_close(pipe.transformer.proj_out.weight, student.proj_out.weight)


def test_zero_step_embedding_is_the_stock_model_and_a_trained_one_is_live(wan):
    from tdm.step_condition import NUM_STEPS, STUDENT, attach_step_embeddings

    net = wan.load_denoiser().eval()
    x, t, cond = _noise(), torch.tensor([899, 449]), wan.encode_prompts(PROMPTS)
    with torch.no_grad():
        before = wan.denoiser(net)(x, t, cond)[0]
        holder = attach_step_embeddings(net, wan.step_embedding_site, {STUDENT: {NUM_STEPS: 5}})
        student = wan.denoiser(net, STUDENT)
        assert torch.equal(student(x, t, {**cond, NUM_STEPS: torch.tensor([1, 4])})[0], before)
        torch.nn.init.normal_(holder[STUDENT].tables[NUM_STEPS].weight, std=1.0)
        assert not torch.allclose(student(x, t, {**cond, NUM_STEPS: torch.tensor([1, 4])})[0], before,
                                  atol=1e-4)


def _fit_args(**overrides):
    values = dict(resolution=SIZE, num_frames=FRAMES, max_sequence_length=None, lora_rank=4,
                  train_mode="lora")
    return SimpleNamespace(**{**values, **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({"num_frames": 8}, r"--num_frames 8 must be 4k \+ 1 .* temporal compression 4; use 5 or 9"),
    ({"num_frames": 80}, r"--num_frames 80 must be 4k \+ 1 .*; use 77 or 81"),
    ({"resolution": 40}, r"height 40 must be a multiple of 16 \(VAE factor 8 × patch size 2\); use 32 or 48"),
    ({"resolution": 528}, r"height 528 gives 33 patches, more than the transformer's 32 rotary"),
    ({"lora_rank": 40}, r"--lora_rank 40 exceeds 24"),                   # the base class's check
    ({"max_sequence_length": 600}, r"--max_sequence_length 600 .* 512 UMT5 tokens; use 1 to 512"),
])
def test_model_fit_is_refused_in_one_line(wan, overrides, message):
    wan.check_fit(_fit_args())                                  # the tiny run itself fits
    with pytest.raises(ValueError, match=message) as error:
        wan.check_fit(_fit_args(**overrides))
    assert "\n" not in str(error.value)


def test_model_fit_stops_the_script_before_anything_loads(tiny_wan, tmp_path):
    import train_tdm
    from harness import reset_accelerate, train_args

    from tdm.config import UsageError

    reset_accelerate()
    args = train_args(tiny_wan, str(tmp_path), ["--num_frames", "12"], "wan")
    with pytest.raises(UsageError, match="--num_frames 12 must be 4k"):
        train_tdm.build(args)
    assert not os.path.exists(args.output_dir) or not os.listdir(args.output_dir)


def test_shipped_config_fits_the_released_models_geometry(tmp_path):
    """configs/wan21_t2v_1_3b.yaml against Wan2.1-T2V-1.3B-Diffusers' own configs (written here
    without weights; the VAE config of the first release, without scale_factor_*)."""
    import json

    from tdm.backbones import load_backbone
    from tdm.config import parse_args
    from tdm.tiny.wan import WAN21_SCHEDULER_CONFIG

    files = {
        "model_index.json": {"_class_name": "WanPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                             "transformer": ["diffusers", "WanTransformer3DModel"],
                             "vae": ["diffusers", "AutoencoderKLWan"]},
        "scheduler/scheduler_config.json": {"_class_name": "UniPCMultistepScheduler", **WAN21_SCHEDULER_CONFIG},
        "transformer/config.json": {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2],
                                    "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
                                    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960,
                                    "num_layers": 30, "rope_max_seq_len": 1024},
        "vae/config.json": {"_class_name": "AutoencoderKLWan", "base_dim": 96, "z_dim": 16,
                            "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                            "temperal_downsample": [False, True, True]},
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    args = parse_args(["--config", os.path.join(ROOT, "configs", "wan21_t2v_1_3b.yaml"),
                       "--pretrained_model_name_or_path", str(tmp_path)])
    backbone = load_backbone(str(tmp_path), args.backbone, options=args.backbone_options)
    backbone.check_fit(args)
    assert backbone.latent_shape(args.resolution, args.num_frames) == (16, 21, 60, 104)
    assert args.timesteps == [999, 749, 499, 249] and backbone.flow_shift == 3.0
    torch.testing.assert_close(backbone.path.sigma[args.timesteps], torch.tensor([1.0, 0.9, 0.75, 0.5]))
    with pytest.raises(ValueError, match="use 49 or 53"):
        backbone.check_fit(args.replace(num_frames=50))
    two_experts = {**files["model_index.json"], "transformer_2": ["diffusers", "WanTransformer3DModel"],
                   "boundary_ratio": 0.875}                  # Wan2.2 A14B: refused, not half-distilled
    (tmp_path / "model_index.json").write_text(json.dumps(two_experts))
    with pytest.raises(ValueError, match="two-expert"):
        load_backbone(str(tmp_path), "wan")


@pytest.mark.slow
def test_train_export_and_infer_video(tiny_wan, tmp_path, capsys):
    """A few steps through `accelerate launch train_tdm.py`, then a 4-step video from the export
    with infer_tdm.py's main (in this process: its imports are already paid for)."""
    import infer_tdm

    out = tmp_path / "run"
    expect_success(accelerate_launch(tiny_flags(
        tiny_wan, out, 2, "--num_frames", str(FRAMES), "--total_steps", "1000",
        "--validation_steps", "2", "--train_batch_size", "2", "--lora_rank", "4", "--cfg", "5",
        "--use_huber", "--use_separate")))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert Image.open(out / "samples" / "step-000002.png").size[1] == SIZE
    # the model card's plain-diffusers snippet runs as written and samples on the training grid,
    # with the run's frames (config.yaml)
    card = (out / "README.md").read_text()
    snippet = card_snippet(card)
    assert f"num_frames={FRAMES}," in snippet and "functools.partial" in snippet
    namespace = {}
    exec(snippet, namespace)
    assert namespace["frames"].shape == (FRAMES, SIZE, SIZE, 3)
    assert namespace["pipe"].scheduler.timesteps.tolist() == pytest.approx([1000, 900, 750, 500])

    video = tmp_path / "x.mp4"
    assert infer_tdm.main(["--weights", str(out), "--prompt", "a red cat", "--output", str(video)]) == 0
    if HAS_VIDEO_ENCODER:
        assert video.stat().st_size > 0
    else:   # infer_tdm falls back to GIF without a video encoder
        gif = Image.open(tmp_path / "x.gif")
        assert gif.n_frames == FRAMES and gif.size == (SIZE, SIZE)
    assert "[999, 749, 499, 249]" in capsys.readouterr().out
