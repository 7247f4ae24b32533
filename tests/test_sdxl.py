"""The SDXL adapter on a tiny real StableDiffusionXLPipeline: pooled embeddings and time ids in
the condition, the stock pipeline on the training grid, the LoRA lines, kohya round trip,
training end to end (helpers in tests/test_sd15.py)."""
import pytest
import torch

from test_sd15 import (PROMPTS, _check_kohya_round_trip, _check_rollout_equals_pipeline,
                       _check_train_export_sample, _check_upstream_lines_and_scale, _probe,
                       _save_student, _tiny_family)

tiny_sdxl = _tiny_family("sdxl")


def test_condition_carries_pooled_embeddings_and_time_ids(tiny_sdxl):
    from tdm.backbones.sdxl import StableDiffusionXLBackbone

    _, sdxl = tiny_sdxl
    assert type(sdxl) is StableDiffusionXLBackbone
    cond = sdxl.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)      # both encoders concatenated
    assert cond["text_embeds"].shape == (2, 32)                     # pooled, projected
    assert cond["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    uncond = sdxl.encode_prompts([""])
    assert uncond["text_embeds"].shape == (1, 32) and uncond["text_embeds"].abs().sum() > 0


def test_time_ids_follow_the_resolution_and_reach_the_unet(tiny_sdxl):
    from tdm.backbones import load_backbone

    bb = load_backbone(tiny_sdxl[0])
    assert bb.resolution == 32                      # default: UNet sample size × VAE factor
    bb.check_resolution(64)
    assert bb.time_ids(1).tolist() == [[64, 64, 0, 0, 64, 64]]
    bb.load_text_encoders("cpu", torch.float32)
    net = bb.load_denoiser()
    x, t, cond = _probe(bb)
    at_64 = bb.model_output(net, x, t, cond)
    bb.check_resolution(32)
    at_32 = bb.model_output(net, x, t, bb.encode_prompts(PROMPTS[:1]))
    assert (at_64 - at_32).abs().max() > 1e-4
    no_pool = dict(cond, text_embeds=torch.zeros_like(cond["text_embeds"]))
    assert (bb.model_output(net, x, t, no_pool) - at_64).abs().max() > 1e-4


def test_stock_pipeline_reproduces_the_training_rollout(tiny_sdxl):
    """SDXL ships EulerDiscrete ('leading' spacing, steps_offset 1, init sigma ≈ 14.6): the
    conversion must still give DPM-Solver++(1) on the same ᾱ table and the exact grid."""
    from diffusers import DiffusionPipeline

    assert type(DiffusionPipeline.from_pretrained(tiny_sdxl[0]).scheduler).__name__ == "EulerDiscreteScheduler"
    _check_rollout_equals_pipeline(tiny_sdxl)


def test_lora_lines_load_the_lora_and_honour_the_scale(tiny_sdxl, tmp_path):
    _check_upstream_lines_and_scale(tiny_sdxl, _save_student(tiny_sdxl[1], tmp_path))


def test_kohya_export_loads_back_through_load_lora_weights(tiny_sdxl, tmp_path):
    _check_kohya_round_trip(tiny_sdxl, tmp_path)


@pytest.mark.slow
def test_train_export_and_sample_in_the_stock_pipeline(tiny_sdxl, tmp_path):
    _check_train_export_sample(tiny_sdxl[0], tmp_path, "StableDiffusionXLPipeline")
