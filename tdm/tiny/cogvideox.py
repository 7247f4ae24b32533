"""Build a tiny but real CogVideoX diffusers pipeline for fast CPU tests.

All components are the real diffusers / transformers classes with very small configurations;
the folder written by :func:`build_tiny_cogvideox` loads with
``CogVideoXPipeline.from_pretrained(path)``. Videos are 9 frames of 32x32 pixels; the latent is
[3 frames, 4 channels, 8, 8] (VAE: spatial factor 4, temporal factor 4).
"""

from __future__ import annotations

import os

import torch

from .common import build_t5_tokenizer, reinit_zero_weights

# THUDM/CogVideoX-2b scheduler/scheduler_config.json (diffusers' convert_cogvideox_to_diffusers.py
# with --snr_shift_scale 3.0 for 2B; 5B uses 1.0).
COGVIDEOX_2B_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    clip_sample=False,
    clip_sample_range=1.0,
    sample_max_value=1.0,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    rescale_betas_zero_snr=True,
    snr_shift_scale=3.0,
)

MAX_SEQUENCE_LENGTH = 226   # CogVideoX's T5 token budget (transformer max_text_seq_length)
TINY_NUM_FRAMES = 9         # 4k + 1 frames → 3 latent frames
TINY_SIZE = 32              # pixels; latent 8 x 8


def _tiny_t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, initializer_factor=1.0)
    return T5EncoderModel(config).eval()


def _tiny_vae():
    from diffusers import AutoencoderKLCogVideoX

    # Three blocks: spatial factor 2**2 = 4, the first two downsamplings also compress time (x4).
    # sample_height/width set the tile size of enable_tiling(): at twice the video size tiling
    # stays off (diffusers' tiled decode of a tiny tile returns frames of the wrong size).
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4, sample_height=2 * TINY_SIZE, sample_width=2 * TINY_SIZE,
        scaling_factor=1.15258426).eval()


def _tiny_transformer(rotary: bool, text_tokens: int = MAX_SEQUENCE_LENGTH):
    from diffusers import CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=8, text_embed_dim=32, num_layers=2, sample_width=TINY_SIZE // 4,
        sample_height=TINY_SIZE // 4, sample_frames=TINY_NUM_FRAMES, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=text_tokens,
        use_rotary_positional_embeddings=rotary)
    reinit_zero_weights(transformer)
    return transformer.eval()


def build_tiny_cogvideox(path: str, seed: int = 0, rotary: bool = False,
                         text_tokens: int = MAX_SEQUENCE_LENGTH) -> str:
    """Build a tiny real ``CogVideoXPipeline`` with fixed random weights and save it to ``path``.

    Components: T5 tokenizer (``common.build_t5_tokenizer``, 226 tokens), 2-layer
    ``T5EncoderModel`` (d_model 32), 3-block ``AutoencoderKLCogVideoX`` (4 latent channels),
    2-layer ``CogVideoXTransformer3DModel`` (sincos positions as CogVideoX-2B, or rotary
    embeddings as CogVideoX-5B with ``rotary=True``) and ``CogVideoXDDIMScheduler`` with the
    CogVideoX-2B config. ``text_tokens``: the transformer's text capacity (a smaller model than
    the shipped config expects, for the model-fit tests). Returns ``path``.
    """
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    tokenizer = build_t5_tokenizer(model_max_length=MAX_SEQUENCE_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _tiny_t5(len(tokenizer))
        torch.manual_seed(seed + 1)
        vae = _tiny_vae()
        torch.manual_seed(seed + 2)
        transformer = _tiny_transformer(rotary, text_tokens)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                             transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler(**COGVIDEOX_2B_SCHEDULER_CONFIG))
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path)
    return path
