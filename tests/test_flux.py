"""The FLUX.1 adapter on tiny real FluxPipelines (FLUX.1-dev layout: guidance embedding and
dynamic shift; FLUX.1-schnell layout: neither): the path fixed at the training resolution, the
flow conversion through packed latents, rollout = stock pipeline, the guidance-embedded teacher
target (docs/method.md §5.1), the model-fit checks, LoRA loading with the stock pipeline's lines
and a short `accelerate launch` run."""
import math

import pytest
import torch

from conftest import accelerate_launch, check_full_student_becomes_the_transformer, loaded_backbone
from flow_family import (PROMPTS, assert_same_network, check_flow_conversion, check_lora_scales,
                         check_rollout_equals_pipeline, exported_lora_student, tiny_pipeline)
from tdm.method import TDM, TDMConfig
from tdm.trajectory import StepGrid

LATENT = (16, 16, 16)          # unpacked: 16 channels, 32 px / VAE factor 2
MAX_LENGTH = 32                # T5 tokens in these tests (the model takes up to 512)


tiny_dev = tiny_pipeline("flux", "tiny-flux-dev")
tiny_schnell = tiny_pipeline("flux", "tiny-flux-schnell", guidance_embeds=False)


def _backbone(path):
    bb = loaded_backbone(path, resolution=32)
    bb.max_sequence_length = MAX_LENGTH
    return bb


@pytest.fixture(scope="session")
def flux(tiny_dev):
    return _backbone(tiny_dev)


@pytest.fixture(scope="session")
def schnell(tiny_schnell):
    return _backbone(tiny_schnell)


def pack(z):
    from diffusers import FluxPipeline

    return FluxPipeline._pack_latents(z, z.shape[0], *z.shape[1:])


def unpack(z):
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(z, 32, 32, 2)


def test_tiny_pipelines_load_and_select_the_flux_adapter(tiny_dev, flux, schnell):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = FluxPipeline.from_pretrained(tiny_dev)
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert pipe.transformer.config.guidance_embeds and pipe.scheduler.config.use_dynamic_shifting
    assert type(flux).__name__ == "FluxBackbone" and flux.prediction_type == "flow"
    assert flux.latent_shape(32) == LATENT
    assert flux.guidance_embedding and not schnell.guidance_embedding
    cond = flux.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, MAX_LENGTH, 32)     # T5, batch-first
    assert cond["pooled_prompt_embeds"].shape == (2, 16)          # CLIP pooled
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds"}  # ids are rebuilt per call


def test_path_is_the_schedulers_sigmas_at_the_training_resolution(flux, schnell, tiny_dev):
    """dev: μ of FluxPipeline for 8·8 = 64 packed tokens, σ = e^μ u / (e^μ u + 1 − u) at
    u = (t + 1)/1000; schnell: shift 1, σ = u. docs/method.md §1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tdm.backbones import load_backbone

    mu = 0.5 + (64 - 256) * (1.15 - 0.5) / (4096 - 256)
    assert flux.mu == pytest.approx(mu, abs=1e-12)
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    s = math.exp(mu)
    torch.testing.assert_close(flux.path.sigma.double(), s * u / (1 + (s - 1) * u), atol=3e-7, rtol=0)
    torch.testing.assert_close(flux.path.alpha, 1 - flux.path.sigma)
    assert flux.path.sigma[999] == 1 and bool((flux.path.sigma.diff() > 0).all())
    fixed = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    torch.testing.assert_close(schnell.path.sigma, fixed.sigmas.flip(0), atol=1e-7, rtol=0)
    t = torch.tensor([899, 674, 449, 224])
    torch.testing.assert_close(flux.timestep(t), flux.path.sigma[t])   # σ·1000/1000
    # the path follows the training resolution: 64 px → 256 tokens → μ = base_shift 0.5
    wider = load_backbone(tiny_dev, resolution=64)
    assert wider.mu == pytest.approx(0.5) and (wider.path.sigma[:999] > flux.path.sigma[:999]).all()


def test_flow_conversion_round_trips_with_the_real_model(flux):
    torch.manual_seed(0)
    x_t = torch.randn(2, *LATENT)
    net, cond, t, v = check_flow_conversion(flux, x_t)
    # the packed call by hand, as FluxPipeline makes it
    from diffusers import FluxPipeline

    by_hand = net(hidden_states=pack(x_t), timestep=flux.path.sigma[t], guidance=torch.ones(2),
                  pooled_projections=cond["pooled_prompt_embeds"],
                  encoder_hidden_states=cond["prompt_embeds"], txt_ids=torch.zeros(MAX_LENGTH, 3),
                  img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
                  return_dict=False)[0]
    torch.testing.assert_close(v, unpack(by_hand))


@pytest.mark.parametrize("variant,timesteps,guidance", [
    ("dev", [899, 674, 449, 224], 1.0), ("dev", [999, 749, 499, 249], 3.5),
    ("schnell", [999, 500], 1.0)])
def test_stock_pipeline_reproduces_the_training_rollout(tiny_dev, tiny_schnell, flux, schnell,
                                                        variant, timesteps, guidance):
    """FlowMatch Euler on u = (τ + 1)/1000, shifted by the pipeline's own μ (stock scheduler,
    stock pipeline, guidance_scale = the student's guidance) == the TDM rollout."""
    folder, bb = (tiny_dev, flux) if variant == "dev" else (tiny_schnell, schnell)
    torch.manual_seed(1)
    z = torch.randn(2, *LATENT)
    before = bb.student_guidance
    bb.student_guidance = guidance
    try:
        check_rollout_equals_pipeline(folder, bb, timesteps, z, pack=pack, unpack=unpack,
                                      guidance_scale=guidance)
    finally:
        bb.student_guidance = before


def test_guidance_embedded_teacher_target_is_one_call_with_cfg_as_guidance(flux):
    """docs/method.md §5.1: x0_real = x0_φ(x_t, t, c; g = cfg), one teacher call; the student and
    the fake score see g = student_guidance. Forced off, it is CFG of two calls at that g."""
    net = flux.load_denoiser()
    cond, uncond = flux.encode_prompts(PROMPTS), flux.encode_prompts(["", ""])
    calls = []
    teacher = flux.denoiser(net)
    counted = lambda x, t, c: calls.append(x.shape[0]) or teacher(x, t, c)  # noqa: E731
    torch.manual_seed(2)
    x_t, t = torch.randn(2, *LATENT), torch.tensor([700, 250])
    target = TDM(flux.path, StepGrid([999, 499]), TDMConfig(cfg=3.5), guidance_embedding=True).teacher_x0(
        counted, x_t, t, cond, uncond)
    assert calls == [2]                                    # once, no unconditional branch
    sigma = flux.path.sigma[t].reshape(2, 1, 1, 1)
    v = flux.model_output(net, x_t, t, {**cond, "guidance": torch.full((2,), 3.5)})
    torch.testing.assert_close(target, x_t - sigma * v)    # x̂0 = x_t − σ v at g = 3.5
    student_view = teacher(x_t, t, cond)[0]                # g = student_guidance = 1
    assert (target - student_view).abs().max() > 1e-3
    forced = TDM(flux.path, StepGrid([999, 499]), TDMConfig(cfg=3.5), guidance_embedding=False)
    x0_c, x0_u = teacher(x_t, t, cond)[0], teacher(x_t, t, uncond)[0]
    torch.testing.assert_close(forced.teacher_x0(teacher, x_t, t, cond, uncond),
                               x0_u + 3.5 * (x0_c - x0_u), atol=1e-5, rtol=1e-5)


def test_model_fit_checks_name_value_limit_and_fix(tiny_dev, tiny_schnell, flux, schnell):
    from tdm.config import parse_args

    def fit(bb, *flags):
        args = parse_args(["--pretrained_model_name_or_path", "x", "--resolution", "32",
                           "--lora_rank", "4", *flags])
        bb.check_fit(args)
        return bb.set_guidance(args.guidance_embedding, args.student_guidance)

    with pytest.raises(ValueError, match=r"--resolution 30 must be a multiple of 4 .*use 32"):
        fit(flux, "--resolution", "30")
    with pytest.raises(ValueError, match=r"--max_sequence_length 600\b.* 512\b"):
        fit(flux, "--max_sequence_length", "600")
    with pytest.raises(ValueError, match=r"--lora_rank 64\b.* 16\b"):   # FLUX's targets: width 16
        fit(flux, "--lora_rank", "64")
    with pytest.raises(ValueError, match=r"--guidance_embedding on needs a guidance-distilled"):
        fit(schnell, "--guidance_embedding", "on")
    with pytest.raises(ValueError, match=r"--student_guidance 3.5 needs a guidance-embedded"):
        fit(schnell, "--student_guidance", "3.5")
    fit(schnell, "--max_sequence_length", "512")
    from tdm.backbones import load_backbone

    dev = load_backbone(tiny_dev, resolution=32)
    assert fit(dev, "--guidance_embedding", "off", "--student_guidance", "2") is False
    assert dev.guidance_embedding is False and dev.student_guidance == 2.0
    with pytest.raises(ValueError, match=r"--student_guidance 1 needs"):
        fit(schnell, "--student_guidance", "1")


def test_train_script_refuses_a_misfit_before_loading_weights(tiny_dev, tmp_path):
    """train_tdm.build turns the check into its one-line usage error; nothing is written."""
    import train_tdm
    from harness import reset_accelerate
    from tdm.config import UsageError, parse_args

    reset_accelerate()
    out = tmp_path / "run"
    args = parse_args(["--pretrained_model_name_or_path", tiny_dev, "--output_dir", str(out),
                       "--resolution", "32", "--max_sequence_length", "600", "--lora_rank", "4",
                       "--report_to", "none"])
    with pytest.raises(UsageError, match=r"^--max_sequence_length 600\b.* 512\b"):
        train_tdm.build(args)
    assert not any(out.rglob("*"))


@pytest.fixture(scope="session")
def student_lora(flux, tmp_path_factory):
    return exported_lora_student(flux, tmp_path_factory.mktemp("lora"))


def _stock_pipe(model, lora, scale=1.0):
    """The stock diffusers lines of docs/families.md (FLUX.1), with local folders."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.load_lora_weights(lora, adapter_name="tdm")
    pipe.set_adapters(["tdm"], [scale])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, output_type="pil"):
    """4 steps on the training grid 999, 749, 499, 249 (u = (τ + 1)/1000), guidance 1."""
    return pipe("a red cat", sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=1.0, height=32,
                width=32, max_sequence_length=MAX_LENGTH, output_type=output_type,
                generator=torch.manual_seed(0)).images


def test_stock_pipeline_loads_the_lora_and_honours_its_scale(tiny_dev, flux, student_lora):
    net, folder = student_lora
    pipe = _stock_pipe(tiny_dev, folder)
    assert _sample(pipe)[0].size == (32, 32)
    # scale 1 reproduces the trained network (rank, alpha and keys survived the export)
    assert_same_network(flux, pipe.transformer, net, LATENT)
    check_lora_scales(pipe, lambda p: _sample(p, "latent"))


def test_full_student_folder_becomes_the_pipeline_transformer(flux, tmp_path):
    check_full_student_becomes_the_transformer(flux, LATENT, tmp_path)


@pytest.mark.slow
def test_accelerate_training_exports_a_lora_the_stock_pipeline_samples(tiny_dev, tmp_path):
    from safetensors.torch import load_file

    from conftest import expect_success, tiny_flags

    out = tmp_path / "run"
    expect_success(accelerate_launch(tiny_flags(
        tiny_dev, out, 2, "--train_mode", "lora", "--lora_rank", "4", "--learning_rate", "1e-3",
        "--total_steps", "1000", "--cfg", "3.5", "--use_huber", "--use_separate",
        "--train_batch_size", "2", "--checkpointing_steps", "2", "--validation_steps", "2",
        "--max_sequence_length", str(MAX_LENGTH), "--student_guidance", "2.5")))
    assert any((out / "checkpoint-2").glob("*.safetensors"))
    assert "guidance_scale=2.5," in (out / "README.md").read_text()   # the card samples as trained
    assert (out / "samples" / "step-000002.png").is_file()
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(".attn.add_q_proj.lora_A" in k for k in lora)
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in lora)
    assert all(k.startswith("transformer.") for k in lora)

    pipe = _stock_pipe(tiny_dev, str(out))
    trained = _sample(pipe, "latent")
    pipe.set_adapters(["tdm"], [0.])
    assert (trained - _sample(pipe, "latent")).abs().max() > 0   # the LoRA trained
    pipe.set_adapters(["tdm"], [1.])
    image = _sample(pipe)[0]
    assert image.size == (32, 32)

    import infer_tdm   # in-process: the grid sampler at the run's resolution and guidance 1
    from PIL import Image

    grid = tmp_path / "compare.png"
    assert infer_tdm.main(["--weights", str(out), "--prompt", "a red cat", "--teacher_steps", "2",
                           "--output", str(grid)]) == 0
    assert Image.open(grid).size[1] == 2 * 32


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_schnell_classifier_free_guidance_matches_the_reference(tiny_schnell, tmp_path, mode):
    """Without a guidance embedding (FLUX.1-schnell) the teacher target is ordinary CFG of two
    branches: the script's iteration equals the plain reference (tests/test_equivalence.py runs
    the guidance-embedded FLUX.1-dev layout in every mode)."""
    from harness import PROMPTS as EQ_PROMPTS
    from harness import RTOL_FP64, Production, assert_records_equal, reference, train_args

    args = train_args(tiny_schnell, str(tmp_path), ["--train_mode", mode, "--use_separate",
                                                    "--max_sequence_length", str(MAX_LENGTH)], "flux")
    production = Production(args, float64=True)
    assert production.run.backbone.guidance_embedding is False and args.cfg != 1.0
    actual = production.iterate([EQ_PROMPTS[:2]])
    assert_records_equal(actual, reference(production, [[EQ_PROMPTS[:2]]]), RTOL_FP64)


def test_inference_samples_with_the_guidance_the_student_was_trained_with(tiny_dev, tiny_schnell):
    """docs/method.md §5.1: a guidance-embedded student is called with its training
    --student_guidance (read from the run's config.yaml by infer_tdm/eval_tdm); others with 1."""
    import infer_tdm

    def guidance(model, student_guidance):
        _, backbone = infer_tdm.student_pipeline(model, None, 1.0, torch.float32, "cpu",
                                                 student_guidance=student_guidance)
        return backbone.sampling_guidance()

    assert guidance(tiny_dev, None) == 1.0 and guidance(tiny_dev, 2.5) == 2.5
    assert guidance(tiny_schnell, None) == 1.0
