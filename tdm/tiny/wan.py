"""Build a tiny but real Wan2.1 text-to-video diffusers pipeline for fast CPU tests.

All components are the real diffusers / transformers classes with very small configurations;
the folder written by :func:`build_tiny_wan` loads with ``WanPipeline.from_pretrained(path)``.
Videos are 5 frames of 32x32 pixels; the latent is [16 channels, 2 frames, 4, 4] (the VAE's
spatial factor 8 and temporal factor 4, as Wan2.1's), i.e. 2 x 2 x 2 = 8 tokens with patch (1, 2, 2).
"""

from __future__ import annotations

import os

import torch

from .common import build_t5_tokenizer, reinit_zero_weights

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json: UniPC on flow sigmas with
# flow_shift 3.0 (diffusers' Wan docs: "3.0 for 480P, 5.0 for 720P").
WAN21_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    solver_order=2,
    prediction_type="flow_prediction",
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    predict_x0=True,
    solver_type="bh2",
    lower_order_final=True,
    disable_corrector=[],
    solver_p=None,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    use_flow_sigmas=True,
    flow_shift=3.0,
    timestep_spacing="linspace",
    steps_offset=0,
    final_sigmas_type="zero",
    rescale_betas_zero_snr=False,
)

MAX_SEQUENCE_LENGTH = 512   # Wan2.1's UMT5 text length (WanPipeline's default max_sequence_length)
TINY_NUM_FRAMES = 5         # 4k + 1 frames → 2 latent frames
TINY_SIZE = 32              # pixels; latent 4 x 4
TEXT_DIM = 32               # d_model of the tiny UMT5 encoder = the transformer's text_dim


def _tiny_umt5(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval()


def _tiny_vae():
    from diffusers import AutoencoderKLWan

    # Four levels (three spatial downsamplings: factor 8), the last two also halving time
    # (factor 4), as Wan2.1's VAE; 16 latent channels with its own latents_mean/std (defaults).
    return AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], scale_factor_temporal=4,
                            scale_factor_spatial=8).eval()


def _tiny_transformer():
    from diffusers import WanTransformer3DModel

    # head dim 12: rotary splits it 4 (frames) + 4 (height) + 4 (width)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
        out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    reinit_zero_weights(transformer)
    return transformer.eval()


def build_tiny_wan(path: str, seed: int = 0) -> str:
    """Build a tiny real ``WanPipeline`` (Wan2.1 text-to-video) with fixed random weights and save
    it to ``path``.

    Components: T5/UMT5 tokenizer (``common.build_t5_tokenizer``, 512 tokens), 2-layer
    ``UMT5EncoderModel`` (d_model 32), 4-level causal ``AutoencoderKLWan`` (16 latent channels,
    spatial factor 8, temporal factor 4), 2-layer ``WanTransformer3DModel`` (patch (1, 2, 2),
    rotary positions) and ``UniPCMultistepScheduler`` with Wan2.1-T2V-1.3B's config (flow sigmas,
    flow_shift 3.0). Returns ``path``.
    """
    from diffusers import UniPCMultistepScheduler, WanPipeline

    tokenizer = build_t5_tokenizer(model_max_length=MAX_SEQUENCE_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _tiny_umt5(len(tokenizer))
        torch.manual_seed(seed + 1)
        vae = _tiny_vae()
        torch.manual_seed(seed + 2)
        transformer = _tiny_transformer()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       transformer=transformer,
                       scheduler=UniPCMultistepScheduler(**WAN21_SCHEDULER_CONFIG))
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path)
    return path
