"""The SDXL adapter on a tiny real StableDiffusionXLPipeline: pooled embeddings and time ids in
the condition, the stock pipeline on the training grid, the LoRA lines, kohya round trip,
training end to end (checks shared with SD1.5 in tests/sd_family.py)."""
import pytest
import torch

from sd_family import (PROMPTS, check_kohya_round_trip, check_rollout_equals_pipeline,
                       check_train_export_sample, check_upstream_lines_and_scale, probe_input,
                       save_student, tiny_family)

tiny_sdxl = tiny_family("sdxl")


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

    assert load_backbone(tiny_sdxl[0]).resolution == 32   # default: UNet sample size × VAE factor
    bb = load_backbone(tiny_sdxl[0], resolution=64)        # the training --resolution, given once
    assert bb.time_ids(1).tolist() == [[64, 64, 0, 0, 64, 64]]
    bb.load_text_encoders("cpu", torch.float32)
    net = bb.load_denoiser()
    x, t, cond = probe_input(bb)
    at_64 = bb.model_output(net, x, t, cond)
    at_32 = bb.model_output(net, x, t, dict(cond, time_ids=torch.tensor([[32.0, 32, 0, 0, 32, 32]])))
    assert (at_64 - at_32).abs().max() > 1e-4
    no_pool = dict(cond, text_embeds=torch.zeros_like(cond["text_embeds"]))
    assert (bb.model_output(net, x, t, no_pool) - at_64).abs().max() > 1e-4


def test_stock_pipeline_reproduces_the_training_rollout(tiny_sdxl):
    """SDXL ships EulerDiscrete ('leading' spacing, steps_offset 1, init sigma ≈ 14.6): the
    conversion must still give DPM-Solver++(1) on the same ᾱ table and the exact grid."""
    from diffusers import DiffusionPipeline

    assert type(DiffusionPipeline.from_pretrained(tiny_sdxl[0]).scheduler).__name__ == "EulerDiscreteScheduler"
    check_rollout_equals_pipeline(tiny_sdxl)


def test_lora_lines_load_the_lora_and_honour_the_scale(tiny_sdxl, tmp_path):
    check_upstream_lines_and_scale(tiny_sdxl, save_student(tiny_sdxl[1], tmp_path))


@pytest.mark.slow
def test_kohya_export_loads_back_through_load_lora_weights(tiny_sdxl, tmp_path):
    check_kohya_round_trip(tiny_sdxl, tmp_path)


@pytest.mark.slow
def test_train_export_and_sample_in_the_stock_pipeline(tiny_sdxl, tmp_path):
    check_train_export_sample(tiny_sdxl[0], tmp_path, "StableDiffusionXLPipeline")
