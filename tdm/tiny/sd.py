"""Tiny real Stable Diffusion 1.5 and SDXL pipelines for fast CPU tests.

Real diffusers / transformers classes with very small configurations; the folders written by
:func:`build_tiny_sd15` and :func:`build_tiny_sdxl` load with ``DiffusionPipeline.from_pretrained``.
Images are 32x32 pixels, latents 4 x 16 x 16 (VAE scale factor 2). The schedulers carry the real
models' configs: SD1.5 PNDM and SDXL Euler, both scaled_linear betas 0.00085 → 0.012.
"""

from __future__ import annotations

import os

import torch

from .clip import build_clip_tokenizer
from .common import reinit_zero_weights

_SCALED_LINEAR = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", trained_betas=None, prediction_type="epsilon",
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
# stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDMScheduler; from_config skips the
# keys another scheduler class reads, as loading the real file does)
SD15_SCHEDULER_CONFIG = dict(_SCALED_LINEAR, clip_sample=False)
# stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (EulerDiscreteScheduler)
SDXL_SCHEDULER_CONFIG = dict(_SCALED_LINEAR, clip_sample=False, interpolation_type="linear",
                             sample_max_value=1.0, timestep_spacing="leading",
                             use_karras_sigmas=False)

TIME_EMBED_DIM = 8   # SDXL addition_time_embed_dim (256 in the real model)


def _text_encoder(tokenizer, seed: int, with_projection: bool = False):
    """A 2-layer CLIP text model; eos id = the tokenizer's, so pooling picks the real end token."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                            max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu")
    torch.manual_seed(seed)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def _vae(seed: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                         norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor).eval()


def _unet(seed: int, **config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, **config)
    reinit_zero_weights(unet)
    return unet.eval()


def _save(pipe, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path)
    return path


def build_tiny_sd15(path: str, seed: int = 0) -> str:
    """A tiny ``StableDiffusionPipeline``: CLIP tokenizer trained locally, 2-layer CLIPTextModel
    (width 32), 2-block UNet2DConditionModel (cross-attention in the outer block, as SD1.5's
    layout), 2-block AutoencoderKL, PNDMScheduler with the SD1.5 config. Returns ``path``."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        text_encoder = _text_encoder(tokenizer, seed)
        vae = _vae(seed + 1, scaling_factor=0.18215)
        unet = _unet(seed + 2, cross_attention_dim=32, attention_head_dim=4,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return _save(pipe, path)


def build_tiny_sdxl(path: str, seed: int = 0) -> str:
    """A tiny ``StableDiffusionXLPipeline``: two CLIP text encoders (the second with projection,
    whose pooled output feeds the UNet), a UNet with SDXL's text_time added conditioning and
    linear projections, AutoencoderKL, EulerDiscreteScheduler with the SDXL config."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        text_encoder = _text_encoder(tokenizer, seed)
        text_encoder_2 = _text_encoder(tokenizer, seed + 3, with_projection=True)
        vae = _vae(seed + 1, scaling_factor=0.13025)
        pooled_dim = text_encoder_2.config.projection_dim
        unet = _unet(seed + 2, cross_attention_dim=text_encoder.config.hidden_size
                     + text_encoder_2.config.hidden_size, attention_head_dim=(2, 4),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                     use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=TIME_EMBED_DIM, transformer_layers_per_block=(1, 1),
                     projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + pooled_dim)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
                                     add_watermarker=False)
    return _save(pipe, path)
