"""The SD1.5 adapter and the kohya export on a tiny real StableDiffusionPipeline: condition, the
stock pipeline on the training grid, the upstream snippet's LoRA lines, kohya round trip,
training end to end (the checks shared with SDXL are in tests/sd_family.py)."""
import json
import shutil

import pytest
import torch

from sd_family import (PROMPTS, check_kohya_round_trip, check_rollout_equals_pipeline,
                       check_train_export_sample, check_upstream_lines_and_scale, probe_input,
                       save_student, tiny_family, unet_output)

tiny_sd15 = tiny_family("sd15")


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
    check_rollout_equals_pipeline(tiny_sd15)


def test_upstream_snippet_lines_load_the_lora_and_honour_the_scale(tiny_sd15, tmp_path):
    check_upstream_lines_and_scale(tiny_sd15, save_student(tiny_sd15[1], tmp_path))


@pytest.mark.slow
def test_kohya_export_loads_back_through_load_lora_weights(tiny_sd15, tmp_path):
    check_kohya_round_trip(tiny_sd15, tmp_path)


def test_load_pipeline_takes_lora_and_full_students(tiny_sd15, tmp_path):
    _, sd15 = tiny_sd15
    lora_path, student = save_student(sd15, tmp_path / "lora")
    probe = probe_input(sd15)
    pipe = sd15.load_pipeline(torch.float32, ("lora", lora_path), lora_scale=1.0)
    torch.testing.assert_close(unet_output(sd15, pipe.unet, probe), unet_output(sd15, student, probe),
                               atol=1e-5, rtol=1e-5)
    full = sd15.load_denoiser()
    with torch.no_grad():
        full.conv_out.bias.add_(0.5)
    full.save_pretrained(str(tmp_path / "unet"))
    pipe = sd15.load_pipeline(torch.float32, ("full", str(tmp_path / "unet")))
    torch.testing.assert_close(unet_output(sd15, pipe.unet, probe), unet_output(sd15, full, probe))


@pytest.mark.slow
def test_train_export_and_sample_in_the_stock_pipeline(tiny_sd15, tmp_path):
    check_train_export_sample(tiny_sd15[0], tmp_path, "StableDiffusionPipeline")


def test_tiny_clip_tokenizer_is_the_same_on_every_build():
    """Every tiny CLIP pipeline's tokenizer: built, not trained (a trained BPE broke ties
    differently in each process, so each test session ran on other token ids)."""
    from tdm.tiny.clip import build_clip_tokenizer

    a, b = build_clip_tokenizer(), build_clip_tokenizer()
    assert a.get_vocab() == b.get_vocab() and len(a) > 512
    ids = a("a red cat sitting on a chair.").input_ids
    assert ids == b("a red cat sitting on a chair.").input_ids
    assert a.convert_ids_to_tokens(ids)[1:3] == ["a</w>", "red</w>"]
