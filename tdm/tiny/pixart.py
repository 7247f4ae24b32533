"""Build a tiny but real PixArt-alpha diffusers pipeline for fast CPU tests.

All components are the real diffusers / transformers classes with very small
configurations; the folder written by :func:`build_tiny_pixart` loads with
``PixArtAlphaPipeline.from_pretrained(path)``. Images are 32x32 pixels; the
latent is 4 x 16 x 16 (VAE scale factor 2).
"""

from __future__ import annotations

import contextlib
import os

import torch

from .common import build_t5_tokenizer, reinit_zero_weights, save_configs

# Real PixArt-alpha (PixArt-XL-2-512x512) scheduler_config.json values.
PIXART_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    solver_order=2,
    prediction_type="epsilon",
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    use_karras_sigmas=False,
    use_lu_lambdas=False,
    lambda_min_clipped=-float("inf"),
    variance_type=None,
    timestep_spacing="linspace",
    steps_offset=0,
)


# Sizes for benchmarks: "medium" is PixArt-shaped with ~60 M transformer parameters (CPU-able);
# "deep" has PixArt-XL's 28 blocks but 2 heads × 32 wide, to count the device operations of an
# iteration on a CPU (they depend on depth, not width); "full" is the PixArt-XL-2-512x512 transformer architecture (610 M) with a T5 of width 4096,
# random weights, for GPU benchmarks. Text encoder and VAE stay small in every size.
SIZES = {
    "tiny": dict(transformer=dict(num_layers=2, num_attention_heads=2, attention_head_dim=8,
                                  cross_attention_dim=16, sample_size=16),
                 t5_d_model=32, vae_channels=(8, 16)),
    "medium": dict(transformer=dict(num_layers=14, num_attention_heads=8, attention_head_dim=64,
                                    cross_attention_dim=512, sample_size=32),
                   t5_d_model=32, vae_channels=(8, 16)),
    "deep": dict(transformer=dict(num_layers=28, num_attention_heads=2, attention_head_dim=32,
                                  cross_attention_dim=64, sample_size=16),
                 t5_d_model=32, vae_channels=(8, 16)),
    "full": dict(transformer=dict(num_layers=28, num_attention_heads=16, attention_head_dim=72,
                                  cross_attention_dim=1152, sample_size=64),
                 t5_d_model=4096, vae_channels=(8, 16, 32, 32)),
}


def build_tiny_pixart(path: str, seed: int = 0, size: str = "tiny", weights: bool = True) -> str:
    """Build a tiny real ``PixArtAlphaPipeline`` with fixed random weights and save it to ``path``.

    Components: T5 tokenizer (Unigram trained on ``common.TINY_PROMPTS``), 2-layer ``T5EncoderModel``
    (d_model 32), 2-block ``AutoencoderKL`` (scale factor 2, 4 latent channels), 2-layer
    ``PixArtTransformer2DModel`` (sample_size 16, learned sigma: out_channels 8) and a
    ``DPMSolverMultistepScheduler`` with the PixArt-alpha 512 config. Returns ``path``.
    ``weights=False`` writes the configs only (the architecture for tdm/plan.py, no weight files).
    """
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_t5_tokenizer()

    with torch.random.fork_rng(devices=[]), \
            contextlib.nullcontext() if weights else torch.device("meta"):
        torch.manual_seed(seed)
        t5_config = T5Config(
            vocab_size=len(tokenizer),
            d_model=SIZES[size]["t5_d_model"],
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",  # t5-v1_1 style
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            initializer_factor=1.0,
        )
        text_encoder = T5EncoderModel(t5_config).eval()

        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(SIZES[size]["vae_channels"]),
            up_block_types=("UpDecoderBlock2D",) * len(SIZES[size]["vae_channels"]),
            block_out_channels=SIZES[size]["vae_channels"],
            layers_per_block=1,
            act_fn="silu",
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=0.18215,
        ).eval()

        torch.manual_seed(seed + 2)
        transformer = PixArtTransformer2DModel(
            **SIZES[size]["transformer"],
            in_channels=4,
            out_channels=8,
            dropout=0.0,
            norm_num_groups=32,
            attention_bias=True,
            patch_size=2,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            upcast_attention=False,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            interpolation_scale=None,
            use_additional_conditions=None,
            caption_channels=t5_config.d_model,
            attention_type="default",
        )
        if weights:
            reinit_zero_weights(transformer)
        transformer.eval()

    scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG)

    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    os.makedirs(path, exist_ok=True)
    if not weights:
        return save_configs(pipe, path)
    pipe.save_pretrained(path)
    return path
