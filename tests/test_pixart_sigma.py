"""The PixArt-Σ adapter on a tiny real PixArtSigmaPipeline: the adapter is PixArt-α's with Σ's
pipeline and 300 tokens; the ε path = the scheduler's table, the conversion, rollout = stock
pipeline, LoRA through the transformer's PEFT mixin (scale 0 = base), the model-fit checks and a
short `accelerate launch` run."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import (ROOT, accelerate_launch, check_full_student_becomes_the_transformer,
                      expect_success, loaded_backbone, stock_pipeline, teacher_and_lora_student,
                      tiny_flags)
from tdm.lora import save_lora
from tdm.method import TDM, TDMConfig
from tdm.trajectory import StepGrid

PROMPTS = ["a red cat on a mat", "a blue boat at sea"]
LATENT = (4, 16, 16)


@pytest.fixture(scope="session")
def tiny_pixart_sigma(tmp_path_factory):
    from tdm.tiny.pixart_sigma import build_tiny_pixart_sigma

    return build_tiny_pixart_sigma(str(tmp_path_factory.mktemp("models") / "tiny-pixart-sigma"))


@pytest.fixture(scope="session")
def sigma(tiny_pixart_sigma):
    return loaded_backbone(tiny_pixart_sigma)


@pytest.fixture(scope="session")
def stock(tiny_pixart_sigma):
    return stock_pipeline(tiny_pixart_sigma)


def test_tiny_pipeline_loads_and_selects_the_sigma_adapter(stock, sigma):
    from diffusers import PixArtTransformer2DModel

    from tdm.backbones.pixart import PixArtBackbone

    assert isinstance(stock.transformer, PixArtTransformer2DModel)
    assert stock.transformer.config.out_channels == 2 * stock.transformer.config.in_channels
    assert stock.vae.config.scaling_factor == 0.13025 and stock.tokenizer.model_max_length == 300
    assert type(sigma).__name__ == "PixArtSigmaBackbone" and isinstance(sigma, PixArtBackbone)
    assert sigma.prediction_type == "epsilon" and sigma.max_sequence_length == 300
    assert sigma.latent_shape(32) == LATENT


def test_condition_is_the_pipelines_300_token_encoding(stock, sigma):
    cond = sigma.encode_prompts(PROMPTS)
    embeds, mask, _, _ = stock.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                             clean_caption=False)   # Σ's default: 300 tokens
    assert cond["encoder_hidden_states"].shape[:2] == (2, 300)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond["encoder_attention_mask"], mask, atol=0, rtol=0)
    assert sigma.pipeline_kwargs()["max_sequence_length"] == 300


def test_path_is_the_schedulers_table_and_epsilon_converts_round_trip(stock, sigma):
    """α_t² = ᾱ_t of the teacher's scheduler (linear betas, docs/method.md §1); ε̂ is the first
    half of the learned-σ output and α x̂0 + σ ε̂ = x_t."""
    torch.testing.assert_close(sigma.path.alpha.double() ** 2, stock.scheduler.alphas_cumprod.double(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(sigma.path.alpha ** 2 + sigma.path.sigma ** 2, torch.ones(1000))
    net = sigma.load_denoiser()
    cond = sigma.encode_prompts(PROMPTS)
    torch.manual_seed(0)
    x_t, t = torch.randn(2, *LATENT), torch.tensor([899, 300])
    raw = net(x_t, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
              **cond).sample
    x0, eps = sigma.denoiser(net)(x_t, t, cond)
    alpha, sig = sigma.path.alpha_sigma(t, 4)
    torch.testing.assert_close(eps, raw[:, :4])
    torch.testing.assert_close(alpha * x0 + sig * eps, x_t, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("timesteps", [[899, 674, 449, 224], [999, 856, 665, 399]])
def test_stock_pipeline_reproduces_the_training_rollout(tiny_pixart_sigma, sigma, timesteps):
    """DPM-Solver++(1) on the grid in the stock PixArtSigmaPipeline == the TDM rollout."""
    from infer_tdm import sample_student, student_pipeline

    pipe, _ = student_pipeline(tiny_pixart_sigma, None, 1.0, torch.float32, "cpu")
    assert type(pipe).__name__ == "PixArtSigmaPipeline"
    torch.manual_seed(1)
    z = torch.randn(2, *LATENT)
    out = sample_student(pipe, sigma, PROMPTS, timesteps, latents=z.clone(), height=32, width=32,
                         output_type="latent").images
    traj = TDM(sigma.path, StepGrid(timesteps), TDMConfig()).rollout(
        sigma.denoiser(pipe.transformer), z, sigma.encode_prompts(PROMPTS))
    torch.testing.assert_close(out.float(), traj.sample, atol=1e-4, rtol=1e-4)
    assert out.abs().max() > 0.1


def test_lora_export_loads_into_the_stock_pipeline(stock, sigma, tmp_path):
    """PixArtSigmaPipeline has no LoRA loader (diffusers 0.42): the transformer with diffusers'
    PEFT mixin takes it (load_lora_adapter + set_adapters), as for PixArt-α; scale 1 = the
    trained network, scale 0 = the base, a 4-step sample decodes."""
    from tdm.sampling import resolve_weights

    _, student_net = teacher_and_lora_student(sigma)
    save_lora(student_net, str(tmp_path), sigma.lora_prefix)
    weights = resolve_weights(str(tmp_path))
    pipe = sigma.load_pipeline(torch.float32, weights, lora_scale=1.0)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "PixArtSigmaPipeline"
    x, t, cond = torch.randn(1, *LATENT), torch.tensor([500]), sigma.encode_prompts(PROMPTS[:1])
    torch.testing.assert_close(sigma.model_output(pipe.transformer, x, t, cond),
                               sigma.model_output(student_net, x, t, cond), atol=1e-5, rtol=1e-5)

    def sample(p, output_type="latent"):
        return p(PROMPTS[0], num_inference_steps=4, guidance_scale=1.0, height=32, width=32,
                 output_type=output_type, generator=torch.manual_seed(0),
                 **sigma.pipeline_kwargs()).images

    base = sample(stock)
    assert (sample(pipe) - base).abs().max() > 1e-3
    pipe.transformer.set_adapters(["tdm"], weights=[0.0])
    torch.testing.assert_close(sample(pipe), base, atol=1e-6, rtol=0)
    pipe.transformer.set_adapters(["tdm"], weights=[1.0])
    assert sample(pipe, "np").shape == (1, 32, 32, 3)


def test_full_student_folder_becomes_the_pipeline_transformer(sigma, tmp_path):
    check_full_student_becomes_the_transformer(sigma, LATENT, tmp_path)


def test_model_fit_checks_name_value_limit_and_fix(sigma):
    args = lambda **kw: SimpleNamespace(**{"resolution": 32, "max_sequence_length": None,  # noqa: E731
                                           "num_frames": None, "lora_rank": 4, "train_mode": "lora", **kw})
    sigma.check_fit(args())
    sigma.check_fit(args(max_sequence_length=300))
    with pytest.raises(ValueError, match=r"--max_sequence_length 301: .* 300"):   # tokenizer's limit
        sigma.check_fit(args(max_sequence_length=301))
    with pytest.raises(ValueError, match="--resolution 30 must be a multiple of 4"):
        sigma.check_fit(args(resolution=30))
    sigma.denoiser_config["kv_compress_config"] = {"sampling": "conv", "scale_factor": 2}
    try:
        with pytest.raises(ValueError, match="kv_compress_config: KV-compressed attention"):
            sigma.check_fit(args())
    finally:
        del sigma.denoiser_config["kv_compress_config"]


@pytest.mark.slow
def test_accelerate_training_exports_a_student_the_stock_pipeline_samples(tiny_pixart_sigma, tmp_path):
    from PIL import Image
    from safetensors.torch import load_file

    out = tmp_path / "run"
    expect_success(accelerate_launch(tiny_flags(
        tiny_pixart_sigma, out, 2, "--train_mode", "lora", "--lora_rank", "4", "--learning_rate",
        "1e-3", "--use_huber", "--use_separate", "--train_batch_size", "2", "--validation_steps",
        "2")))
    assert (out / "samples" / "step-000002.png").is_file()
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(".attn2.to_k.lora_A" in k for k in lora) and all(k.startswith("transformer.") for k in lora)
    image = tmp_path / "sample.png"
    import infer_tdm   # its main in this process: the imports are already paid for

    assert infer_tdm.main(["--weights", str(out), "--prompt", "a red cat", "--output", str(image)]) == 0
    assert np.asarray(Image.open(image)).shape == (32, 32, 3)


def test_shipped_config_fits_the_released_models_geometry(tmp_path):
    """configs/pixart_sigma_1024.yaml against PixArt-Sigma-XL-2-1024-MS's own configs (written
    here without weights): 128 x 128 latents, 300 tokens, the grid on α's DDPM table."""
    import json

    from tdm.backbones import load_backbone
    from tdm.config import parse_args
    from tdm.tiny.pixart import PIXART_SCHEDULER_CONFIG

    files = {
        "model_index.json": {"_class_name": "PixArtSigmaPipeline",
                             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
                             "text_encoder": ["transformers", "T5EncoderModel"],
                             "tokenizer": ["transformers", "T5Tokenizer"],
                             "transformer": ["diffusers", "PixArtTransformer2DModel"],
                             "vae": ["diffusers", "AutoencoderKL"]},
        "scheduler/scheduler_config.json": {"_class_name": "DPMSolverMultistepScheduler",
                                            **PIXART_SCHEDULER_CONFIG},
        "transformer/config.json": {"_class_name": "PixArtTransformer2DModel", "in_channels": 4,
                                    "out_channels": 8, "num_attention_heads": 16,
                                    "attention_head_dim": 72, "num_layers": 28, "patch_size": 2,
                                    "sample_size": 128, "caption_channels": 4096,
                                    "cross_attention_dim": 1152, "use_additional_conditions": False},
        "vae/config.json": {"_class_name": "AutoencoderKL", "latent_channels": 4,
                            "block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.13025},
        "text_encoder/config.json": {"model_type": "t5", "architectures": ["T5EncoderModel"],
                                     "d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64},
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    args = parse_args(["--config", os.path.join(ROOT, "configs", "pixart_sigma_1024.yaml"),
                       "--pretrained_model_name_or_path", str(tmp_path)])
    backbone = load_backbone(str(tmp_path), args.backbone, options=args.backbone_options)
    assert type(backbone).__name__ == "PixArtSigmaBackbone"
    backbone.check_fit(args)
    assert backbone.latent_shape(args.resolution) == (4, 128, 128)
    assert args.max_sequence_length == 300
    assert StepGrid.uniform(args.num_steps, args.total_steps).timesteps == [899, 674, 449, 224]
    # no tokenizer limit in these files: Σ's own 300-token limit refuses
    with pytest.raises(ValueError, match=r"--max_sequence_length 512: PixArt-Σ .* 300 or less"):
        backbone.check_fit(args.replace(max_sequence_length=512))


def test_training_refuses_a_text_length_that_does_not_fit_before_writing(tiny_pixart_sigma, tmp_path):
    import train_tdm
    from harness import reset_accelerate, train_args
    from tdm.config import UsageError

    reset_accelerate()
    args = train_args(tiny_pixart_sigma, str(tmp_path), ["--max_sequence_length", "400"], "pixart_sigma")
    with pytest.raises(UsageError, match="--max_sequence_length 400: .* 300"):
        train_tdm.build(args)
    assert not os.path.exists(args.output_dir) or not os.listdir(args.output_dir)


def test_the_documented_snippet_samples_the_training_rollout(tiny_pixart_sigma, sigma, tmp_path):
    """docs/families.md's PixArt-Σ snippet (hub id → the tiny folder, fp16/cuda → fp32/cpu) gives the
    image of infer_tdm's grid sampler."""
    from infer_tdm import sample_student

    _, student_net = teacher_and_lora_student(sigma)
    lora = save_lora(student_net, str(tmp_path), sigma.lora_prefix)
    code = open(os.path.join(ROOT, "docs", "families.md")).read().split("\n## PixArt-Σ\n")[1]
    code = code.split("```python\n")[1].split("```")[0]
    for old, new in (("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", tiny_pixart_sigma),
                     ('"tdm-pixart-sigma/pytorch_lora_weights.safetensors"', repr(lora)),
                     ("torch.float16", "torch.float32"), ('.to("cuda")', "")):
        assert old in code
        code = code.replace(old, new)
    namespace = {}
    exec(code, namespace)
    pipe = sigma.load_pipeline(torch.float32, ("lora", lora))
    pipe.set_progress_bar_config(disable=True)
    ours = sample_student(pipe, sigma, ["a red fox in fresh snow"], [899, 674, 449, 224],
                          torch.manual_seed(0), height=32, width=32).images[0]
    assert np.abs(np.asarray(namespace["image"], dtype=int) - np.asarray(ours, dtype=int)).max() <= 1
