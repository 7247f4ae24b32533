"""Build a tiny but real PixArt-Σ diffusers pipeline for fast CPU tests.

PixArt-Σ is PixArt-α's architecture with another pipeline class, 300 text tokens and SDXL's VAE,
so the components are the tiny PixArt-α ones (tdm/tiny/pixart.py) with those differences; the
folder written by :func:`build_tiny_pixart_sigma` loads with ``PixArtSigmaPipeline.from_pretrained``.
Images are 32x32 pixels; the latent is 4 x 16 x 16 (VAE scale factor 2).
"""
from __future__ import annotations

import os
import tempfile

from .pixart import build_tiny_pixart

SIGMA_MAX_LENGTH = 300             # PixArtSigmaPipeline's max_sequence_length
SDXL_VAE_SCALING_FACTOR = 0.13025  # PixArt-Sigma-XL-2-1024-MS vae/config.json (SDXL's VAE)


def build_tiny_pixart_sigma(path: str, seed: int = 0, size: str = "tiny") -> str:
    """Build a tiny real ``PixArtSigmaPipeline`` with fixed random weights and save it to ``path``.

    The tiny PixArt-α pipeline of the same seed and size (T5 tokenizer trained locally, 2-layer
    T5, 2-block AutoencoderKL, 2-layer PixArtTransformer2DModel with learned sigma, DPM-Solver++
    with the PixArt config) under ``PixArtSigmaPipeline``, with a 300-token tokenizer, the VAE's
    scaling factor set to SDXL's and the transformer's micro-conditions off, as in PixArt-Σ's
    configs. Returns ``path``.
    """
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    with tempfile.TemporaryDirectory() as alpha:
        components = PixArtAlphaPipeline.from_pretrained(build_tiny_pixart(alpha, seed, size)).components
    components["tokenizer"].model_max_length = SIGMA_MAX_LENGTH
    components["vae"].register_to_config(scaling_factor=SDXL_VAE_SCALING_FACTOR)
    components["transformer"].register_to_config(use_additional_conditions=False)
    pipe = PixArtSigmaPipeline(**components)
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path)
    return path
