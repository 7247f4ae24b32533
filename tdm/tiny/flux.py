"""Build a tiny but real FLUX.1 diffusers pipeline for fast CPU tests.

All components are the real diffusers / transformers classes with very small configurations; the
folder written by :func:`build_tiny_flux` loads with ``FluxPipeline.from_pretrained``. Images are
32x32 pixels; the latent is 16 x 16 x 16 (FLUX's 16 channels, VAE scale factor 2), which the
pipeline packs into 8 x 8 = 64 tokens of 2x2x16 = 64 channels.
"""

from __future__ import annotations

import os

import torch

from .clip import build_clip_tokenizer, clip_text_encoder
from .common import build_t5_tokenizer, latent16_vae, reinit_zero_weights, t5_text_encoder

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json: resolution-dependent (dynamic)
# shift, mu interpolated between base_shift at 256 image tokens and max_shift at 4096.
FLUX_DEV_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                 base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                 max_image_seq_len=4096)
# black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json: a fixed shift of 1 (no shift).
FLUX_SCHNELL_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
                                     base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                     max_image_seq_len=4096)
# FLUX's VAE latent normalisation (vae/config.json of FLUX.1-dev and -schnell).
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159
T5_MAX_LENGTH = 512   # the T5 tokenizer's model_max_length in the FLUX.1 repositories


def _transformer(joint_attention_dim: int, pooled_projection_dim: int, guidance_embeds: bool):
    """One double-stream and one single-stream block, 2 heads of 8 (rotary axes 2 + 2 + 4 = 8,
    FLUX's (16, 56, 56) scaled down), 64 packed input channels as in FLUX."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4))
    reinit_zero_weights(transformer)
    return transformer.eval()


def build_tiny_flux(path: str, guidance_embeds: bool = True, seed: int = 0) -> str:
    """Build a tiny real ``FluxPipeline`` with fixed random weights, save it to ``path``.

    ``guidance_embeds=True`` is the FLUX.1-dev layout (guidance-distilled: the transformer embeds
    the guidance scale; dynamic-shift scheduler of FLUX.1-dev), ``False`` FLUX.1-schnell's (no
    guidance embedding, fixed shift 1). Components: a CLIP tokenizer (BPE trained on
    ``common.TINY_PROMPTS``) with a 2-layer ``CLIPTextModel`` (hidden 16: the pooled projection),
    a T5 tokenizer (model_max_length 512) with a 2-layer ``T5EncoderModel`` (d_model 32), a
    2-block ``AutoencoderKL`` with 16 latent channels and FLUX's scaling/shift factors, a
    ``FluxTransformer2DModel`` (1 + 1 blocks, 64 packed channels) and
    ``FlowMatchEulerDiscreteScheduler``. Returns ``path``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    clip_hidden, t5_width = 16, 32
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer(model_max_length=T5_MAX_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = clip_text_encoder(tokenizer, clip_hidden)
        torch.manual_seed(seed + 1)
        text_encoder_2 = t5_text_encoder(tokenizer_2, t5_width)
        torch.manual_seed(seed + 2)
        vae = latent16_vae(FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR)
        torch.manual_seed(seed + 3)
        transformer = _transformer(t5_width, clip_hidden, guidance_embeds)

    config = FLUX_DEV_SCHEDULER_CONFIG if guidance_embeds else FLUX_SCHNELL_SCHEDULER_CONFIG
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**config), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        transformer=transformer)
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path)
    return path
