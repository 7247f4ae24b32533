"""The SANA adapter on a tiny real SanaPipeline (Gemma-2 text encoder, DC-AE, linear-attention
DiT): the flow path of the scheduler's shift, the flow conversion, prompts through the pipeline's
own encode_prompt (instruction preamble), rollout = stock pipeline, LoRA through the pipeline's
load_lora_weights / set_adapters, the model-fit checks and a short `accelerate launch` run."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import (ROOT, accelerate_launch, check_full_student_becomes_the_transformer,
                      expect_success, loaded_backbone, stock_pipeline, tiny_flags)
from flow_family import (PROMPTS, assert_same_network, check_flow_conversion,
                         check_rollout_equals_pipeline, exported_lora_student, tiny_pipeline)
from tdm.trajectory import StepGrid

LATENT = (32, 8, 8)   # SANA's 32 latent channels; the tiny DC-AE has factor 4


tiny_sana = tiny_pipeline("sana")


@pytest.fixture(scope="session")
def sana(tiny_sana):
    return loaded_backbone(tiny_sana)


@pytest.fixture(scope="session")
def stock(tiny_sana):
    return stock_pipeline(tiny_sana)


@pytest.fixture(scope="session")
def student_lora(sana, tmp_path_factory):
    return exported_lora_student(sana, tmp_path_factory.mktemp("lora"))


def test_tiny_pipeline_loads_and_selects_the_sana_adapter(stock, sana):
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Model, GemmaTokenizer

    assert isinstance(stock.transformer, SanaTransformer2DModel)
    assert isinstance(stock.vae, AutoencoderDC) and isinstance(stock.text_encoder, Gemma2Model)
    assert isinstance(stock.tokenizer, GemmaTokenizer)
    assert stock.scheduler.config.use_flow_sigmas and stock.scheduler.config.flow_shift == 3.0
    assert type(sana).__name__ == "SanaBackbone" and sana.prediction_type == "flow"
    assert sana.vae_scale_factor == stock.vae_scale_factor == 4
    assert sana.latent_shape(32) == LATENT


def test_prompts_go_through_the_pipelines_encode_prompt_with_its_instruction(stock, sana):
    """Training's condition = what SanaPipeline feeds the transformer: prompts behind the complex
    human instruction, the empty prompt as the pipeline's negative prompt (no instruction)."""
    from tdm.backbones.sana import pipeline_instruction

    cond = sana.encode_prompts(PROMPTS + [""])
    embeds, mask, negative, negative_mask = stock.encode_prompt(
        PROMPTS, do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=300,
        complex_human_instruction=pipeline_instruction())
    assert cond["encoder_hidden_states"].shape == (3, 300, 32)
    torch.testing.assert_close(cond["encoder_hidden_states"][:2], embeds, atol=0, rtol=0)
    torch.testing.assert_close(cond["encoder_attention_mask"][:2], mask, atol=0, rtol=0)
    torch.testing.assert_close(cond["encoder_hidden_states"][2], negative[0], atol=0, rtol=0)
    torch.testing.assert_close(cond["encoder_attention_mask"][2], negative_mask[0], atol=0, rtol=0)
    plain, _, _, _ = stock.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                         complex_human_instruction=None)
    assert (plain - embeds).abs().max() > 1e-3   # the instruction changes the embedding


def test_the_instruction_can_be_switched_off(tiny_sana, stock):
    """--backbone_options '{"complex_human_instruction": false}': prompts without the preamble, at
    training and in the pipeline call."""
    bare = loaded_backbone(tiny_sana, options={"complex_human_instruction": False})
    plain, mask, _, _ = stock.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                            complex_human_instruction=None)
    cond = bare.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond["encoder_hidden_states"], plain, atol=0, rtol=0)
    torch.testing.assert_close(cond["encoder_attention_mask"], mask, atol=0, rtol=0)
    assert bare.pipeline_kwargs()["complex_human_instruction"] is None
    assert "instruction=False" in bare.condition_key()   # its own embedding-cache entries


def test_path_is_the_schedulers_shifted_flow_sigmas(stock, sana):
    """σ_t = shift-3 sigma of u = (t + 1)/1000 (docs/method.md §1); the network reads σ·1000, as
    SanaPipeline feeds it the scheduler's timesteps (SANA's DPM-Solver feeds 1000·σ rounded down
    to an integer)."""
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    torch.testing.assert_close(sana.path.sigma.double(), 3 * u / (1 + 2 * u), atol=3e-7, rtol=0)
    torch.testing.assert_close(sana.path.alpha, 1 - sana.path.sigma)
    assert sana.path.sigma[999] == 1 and bool((sana.path.sigma.diff() > 0).all())
    t = torch.tensor([999, 674, 449, 224])
    torch.testing.assert_close(sana.timestep(t), 1000 * sana.path.sigma[t])
    stock.scheduler.set_timesteps(4)
    gap = 1000 * stock.scheduler.sigmas[:-1].double() - stock.scheduler.timesteps.double()
    assert bool(((gap >= 0) & (gap < 1)).all())


def test_flow_conversion_round_trips_with_the_real_model(sana):
    torch.manual_seed(0)
    check_flow_conversion(sana, torch.randn(2, *LATENT))


@pytest.mark.parametrize("timesteps", [[999, 749, 499, 249], [899, 674, 449, 224]])
def test_stock_pipeline_reproduces_the_training_rollout(tiny_sana, sana, timesteps):
    """FlowMatch Euler on the grid's sigmas in the stock SanaPipeline == the TDM rollout."""
    torch.manual_seed(1)
    check_rollout_equals_pipeline(tiny_sana, sana, timesteps, torch.randn(2, *LATENT))


def _latents(pipe, **kwargs):
    return pipe(PROMPTS[0], num_inference_steps=4, guidance_scale=1.0, height=32, width=32,
                output_type="latent", use_resolution_binning=False,
                generator=torch.manual_seed(0), **kwargs).images


def test_lora_loads_with_the_stock_pipelines_lines_and_honours_its_scale(stock, sana, student_lora):
    """SanaPipeline.load_lora_weights + set_adapters: scale 1 is the trained network (rank,
    alpha and keys survived), scale 0 is the base, 4-step DPM-Solver samples decode to images."""
    net, folder = student_lora
    base = _latents(stock)
    stock.load_lora_weights(folder, adapter_name="tdm")
    try:
        stock.set_adapters(["tdm"], [1.0])
        assert_same_network(sana, stock.transformer, net, LATENT)
        full = _latents(stock)
        stock.set_adapters(["tdm"], [0.0])
        torch.testing.assert_close(_latents(stock), base, atol=1e-6, rtol=0)
        assert (full - base).abs().max() > 1e-3
        stock.set_adapters(["tdm"], [1.0])
        image = stock(PROMPTS[0], num_inference_steps=4, guidance_scale=1.0, height=32, width=32,
                      output_type="np", use_resolution_binning=False).images
        assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    finally:
        stock.unload_lora_weights()


def test_adapter_loader_and_upstream_sampler(sana, student_lora):
    """infer_tdm's loader (LoRA from resolve_weights, --lora_scale) and `--sampler upstream`
    (SANA's own DPM-Solver++ with --flow_shift) in 4 steps."""
    from infer_tdm import sample_student
    from tdm.sampling import resolve_weights

    net, folder = student_lora
    weights = resolve_weights(folder)
    assert weights == ("lora", os.path.join(folder, "pytorch_lora_weights.safetensors"))
    pipe = sana.load_pipeline(torch.float32, weights, lora_scale=1.0)
    assert_same_network(sana, pipe.transformer, net, LATENT, t=400)
    pipe.set_progress_bar_config(disable=True)
    out = sample_student(pipe, sana, PROMPTS[:1], [999, 749, 499, 249], torch.manual_seed(0),
                         height=32, width=32, output_type="np", sampler="upstream", flow_shift=6)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.flow_shift == 6 and len(pipe.scheduler.timesteps) == 4
    assert out.images.shape == (1, 32, 32, 3)


def test_full_student_folder_becomes_the_pipeline_transformer(sana, tmp_path):
    check_full_student_becomes_the_transformer(sana, LATENT, tmp_path)


def test_model_fit_checks_name_value_limit_and_fix(sana):
    args = lambda **kw: SimpleNamespace(**{"resolution": 32, "max_sequence_length": None,  # noqa: E731
                                           "num_frames": None, "lora_rank": 4, "train_mode": "lora", **kw})
    sana.check_fit(args())
    with pytest.raises(ValueError, match="--resolution 48 must be a multiple of 32"):
        sana.check_fit(args(resolution=48))
    with pytest.raises(ValueError, match="--resolution 30 must be a multiple of 4"):
        sana.check_fit(args(resolution=30))
    with pytest.raises(ValueError, match=r"--max_sequence_length 9000: .* 8192 positions.*or less"):
        sana.check_fit(args(max_sequence_length=9000))


@pytest.mark.slow
def test_accelerate_training_exports_a_lora_the_stock_pipeline_samples(tiny_sana, stock, tmp_path):
    from safetensors.torch import load_file
    from PIL import Image

    out = tmp_path / "run"
    expect_success(accelerate_launch(tiny_flags(
        tiny_sana, out, 2, "--train_mode", "lora", "--lora_rank", "4", "--learning_rate", "1e-3",
        "--total_steps", "1000", "--cfg", "4.5", "--use_separate", "--train_batch_size", "2",
        "--validation_steps", "2", "--max_sequence_length", "32")))
    assert (out / "samples" / "step-000002.png").is_file()
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(".attn1.to_q.lora_A" in k for k in lora) and all(k.startswith("transformer.") for k in lora)

    base = _latents(stock, max_sequence_length=32)
    stock.load_lora_weights(str(out), adapter_name="tdm")
    try:
        stock.set_adapters(["tdm"], [1.0])
        assert (_latents(stock, max_sequence_length=32) - base).abs().max() > 0   # the LoRA trained
    finally:
        stock.unload_lora_weights()
    image = tmp_path / "sample.png"
    import infer_tdm   # its main in this process: the imports are already paid for

    assert infer_tdm.main(["--weights", str(out), "--prompt", "a red cat", "--output", str(image)]) == 0
    assert np.asarray(Image.open(image)).shape == (32, 32, 3)


def test_shipped_config_fits_the_released_models_geometry(tmp_path):
    """configs/sana_1024.yaml against Sana_1600M_1024px_diffusers' own configs (written here
    without weights; the tokenizer is the tiny one): 32 x 32 latents of 32 channels, shift 3."""
    import json

    from tdm.backbones import load_backbone
    from tdm.config import parse_args
    from tdm.tiny.sana import SANA_SCHEDULER_CONFIG, build_gemma_tokenizer

    files = {
        "model_index.json": {"_class_name": "SanaPipeline",
                             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
                             "text_encoder": ["transformers", "Gemma2Model"],
                             "tokenizer": ["transformers", "GemmaTokenizer"],
                             "transformer": ["diffusers", "SanaTransformer2DModel"],
                             "vae": ["diffusers", "AutoencoderDC"]},
        "scheduler/scheduler_config.json": {"_class_name": "DPMSolverMultistepScheduler",
                                            **SANA_SCHEDULER_CONFIG},
        "transformer/config.json": {"_class_name": "SanaTransformer2DModel", "in_channels": 32,
                                    "out_channels": 32, "num_attention_heads": 70,
                                    "attention_head_dim": 32, "num_layers": 20,
                                    "num_cross_attention_heads": 20, "cross_attention_head_dim": 112,
                                    "cross_attention_dim": 2240, "caption_channels": 2304,
                                    "mlp_ratio": 2.5, "sample_size": 32, "patch_size": 1},
        "vae/config.json": {"_class_name": "AutoencoderDC", "latent_channels": 32,
                            "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
                            "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
                            "scaling_factor": 0.41407},
        "text_encoder/config.json": {"model_type": "gemma2", "architectures": ["Gemma2Model"],
                                     "hidden_size": 2304, "max_position_embeddings": 8192},
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    build_gemma_tokenizer().save_pretrained(str(tmp_path / "tokenizer"))
    args = parse_args(["--config", os.path.join(ROOT, "configs", "sana_1024.yaml"),
                       "--pretrained_model_name_or_path", str(tmp_path)])
    backbone = load_backbone(str(tmp_path), args.backbone, options=args.backbone_options)
    assert type(backbone).__name__ == "SanaBackbone"
    backbone.check_fit(args)
    assert backbone.latent_shape(args.resolution) == (32, 32, 32)
    grid = StepGrid.uniform(args.num_steps, args.total_steps).timesteps
    assert grid == [999, 749, 499, 249]
    torch.testing.assert_close(backbone.path.sigma[grid], torch.tensor([1.0, 0.9, 0.75, 0.5]))
    with pytest.raises(ValueError, match="--resolution 1000 must be a multiple of 32"):
        backbone.check_fit(args.replace(resolution=1000))


def test_training_refuses_a_size_that_does_not_fit_before_writing(tiny_sana, tmp_path):
    import train_tdm
    from harness import reset_accelerate, train_args
    from tdm.config import UsageError

    reset_accelerate()
    args = train_args(tiny_sana, str(tmp_path), ["--resolution", "48"], "sana")
    with pytest.raises(UsageError, match="--resolution 48 must be a multiple of 32"):
        train_tdm.build(args)
    assert not os.path.exists(args.output_dir) or not os.listdir(args.output_dir)


def test_the_documented_snippet_samples_the_training_rollout(tiny_sana, sana, student_lora):
    """docs/families.md's SANA snippet (hub id → the tiny folder, bf16/cuda → fp32/cpu, 32 px) gives
    the image of infer_tdm's grid sampler."""
    from infer_tdm import sample_student

    _, folder = student_lora
    code = open(os.path.join(ROOT, "docs", "families.md")).read().split("\n## SANA\n")[1]
    code = code.split("```python\n")[1].split("```")[0]
    for old, new in (("Efficient-Large-Model/Sana_1600M_1024px_diffusers", tiny_sana),
                     ('"tdm-sana"', repr(folder)), ("torch.bfloat16", "torch.float32"),
                     ('.to("cuda")', ""), ("height=1024, width=1024", "height=32, width=32")):
        assert old in code
        code = code.replace(old, new)
    namespace = {}
    exec(code, namespace)
    pipe = sana.load_pipeline(torch.float32, ("lora", os.path.join(folder, "pytorch_lora_weights.safetensors")))
    pipe.set_progress_bar_config(disable=True)
    ours = sample_student(pipe, sana, ["a red fox in fresh snow"], [999, 749, 499, 249],
                          torch.manual_seed(0), height=32, width=32).images[0]
    assert np.abs(np.asarray(namespace["image"], dtype=int) - np.asarray(ours, dtype=int)).max() <= 1
