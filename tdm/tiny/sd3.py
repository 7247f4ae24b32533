"""Build a tiny but real Stable Diffusion 3 diffusers pipeline for fast CPU tests.

All components are the real diffusers / transformers classes with very small configurations; the
folder written by :func:`build_tiny_sd3` loads with ``StableDiffusion3Pipeline.from_pretrained``.
Images are 32x32 pixels; the latent is 16 x 16 x 16 (SD3's 16 channels, VAE scale factor 2).
"""

from __future__ import annotations

import os

import torch

from .clip import build_clip_tokenizer, clip_text_encoder
from .common import build_t5_tokenizer, latent16_vae, reinit_zero_weights, t5_text_encoder

# stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json.
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
# SD3's VAE latent normalisation (vae/config.json of SD3-Medium).
SD3_VAE_SCALING_FACTOR = 1.5305
SD3_VAE_SHIFT_FACTOR = 0.0609
T5_MAX_LENGTH = 256   # StableDiffusion3Pipeline's default max_sequence_length


def _transformer(joint_attention_dim: int, pooled_projection_dim: int):
    from diffusers import SD3Transformer2DModel

    heads, head_dim = 2, 8
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=joint_attention_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_projection_dim,
        out_channels=16, pos_embed_max_size=32)
    reinit_zero_weights(transformer)
    return transformer.eval()


def build_tiny_sd3(path: str, seed: int = 0) -> str:
    """Build a tiny real ``StableDiffusion3Pipeline`` with fixed random weights, save it to ``path``.

    Components: two CLIP tokenizers (BPE trained on ``common.TINY_PROMPTS``) with two 2-layer
    ``CLIPTextModelWithProjection`` (hidden 16, projection 16: pooled 32), a T5 tokenizer and a
    2-layer ``T5EncoderModel`` (d_model 32 = the two CLIP widths side by side, as in SD3), a
    2-block ``AutoencoderKL`` with 16 latent channels and SD3's scaling/shift factors, a 2-layer
    ``SD3Transformer2DModel`` (sample_size 16, patch 2) and ``FlowMatchEulerDiscreteScheduler``
    with SD3-Medium's config (shift 3.0, 1000 training timesteps). Returns ``path``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    clip_hidden, clip_projection = 16, 16
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer()
    tokenizer_3 = build_t5_tokenizer(model_max_length=T5_MAX_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = clip_text_encoder(tokenizer, clip_hidden, clip_projection)
        torch.manual_seed(seed + 1)
        text_encoder_2 = clip_text_encoder(tokenizer_2, clip_hidden, clip_projection)
        torch.manual_seed(seed + 2)
        text_encoder_3 = t5_text_encoder(tokenizer_3, 2 * clip_hidden)
        torch.manual_seed(seed + 3)
        vae = latent16_vae(SD3_VAE_SCALING_FACTOR, SD3_VAE_SHIFT_FACTOR)
        torch.manual_seed(seed + 4)
        transformer = _transformer(2 * clip_hidden, 2 * clip_projection)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path)
    return path
