"""Build a tiny but real Stable Diffusion 3 diffusers pipeline for fast CPU tests.

All components are the real diffusers / transformers classes with very small configurations; the
folder written by :func:`build_tiny_sd3` loads with ``StableDiffusion3Pipeline.from_pretrained``.
Images are 32x32 pixels; the latent is 16 x 16 x 16 (SD3's 16 channels, VAE scale factor 2).
"""

from __future__ import annotations

import os

import torch

from .clip import build_clip_tokenizer
from .common import build_t5_tokenizer, reinit_zero_weights

# stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json.
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
# SD3's VAE latent normalisation (vae/config.json of SD3-Medium).
SD3_VAE_SCALING_FACTOR = 1.5305
SD3_VAE_SHIFT_FACTOR = 0.0609
T5_MAX_LENGTH = 256   # StableDiffusion3Pipeline's default max_sequence_length


def _clip_text_encoder(tokenizer, hidden_size: int, projection_dim: int):
    """A 2-layer CLIPTextModelWithProjection (SD3 reads its penultimate hidden state and the
    projected pooled output)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        projection_dim=projection_dim, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config).eval()


def _t5_text_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2,
        num_decoder_layers=2, num_heads=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, act_fn="silu", latent_channels=16,
        norm_num_groups=4, sample_size=32, scaling_factor=SD3_VAE_SCALING_FACTOR,
        shift_factor=SD3_VAE_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False).eval()


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
        text_encoder = _clip_text_encoder(tokenizer, clip_hidden, clip_projection)
        torch.manual_seed(seed + 1)
        text_encoder_2 = _clip_text_encoder(tokenizer_2, clip_hidden, clip_projection)
        torch.manual_seed(seed + 2)
        text_encoder_3 = _t5_text_encoder(tokenizer_3, 2 * clip_hidden)
        torch.manual_seed(seed + 3)
        vae = _vae()
        torch.manual_seed(seed + 4)
        transformer = _transformer(2 * clip_hidden, 2 * clip_projection)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path)
    return path
