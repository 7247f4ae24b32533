"""Build a tiny but real SANA diffusers pipeline for fast CPU tests.

All components are the real diffusers / transformers classes with very small configurations; the
folder written by :func:`build_tiny_sana` loads with ``SanaPipeline.from_pretrained``. Images are
32x32 pixels; the DC-AE has 3 stages (spatial factor 4, the real one 32 with 6 stages), so the
latent is 32 x 8 x 8 (SANA's 32 latent channels), one token per latent pixel (patch size 1, as
SANA's).
"""
from __future__ import annotations

import json
import os

import torch

from .common import TINY_PROMPTS, reinit_zero_weights

# Efficient-Large-Model/Sana_1600M_1024px_diffusers scheduler/scheduler_config.json: DPM-Solver++
# (order 2) on flow sigmas with shift 3, flow prediction, final sigma 0. The same file the
# upstream TDM-SD3 snippet downloads (tdm/backbones/sd3.py, UPSTREAM_DPM_SOLVER_CONFIG).
from ..backbones.sd3 import UPSTREAM_DPM_SOLVER_CONFIG as SANA_SCHEDULER_CONFIG

# Gemma's special tokens at Gemma's ids (pad 0, eos 1, bos 2, unk 3, mask 4), then the 256 byte
# tokens of its byte fallback, so no character is unknown.
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
GEMMA_MAX_POSITIONS = 8192     # gemma-2-2b-it max_position_embeddings (SANA's text encoder)
DC_AE_SCALING_FACTOR = 0.41407  # mit-han-lab dc-ae-f32c32-sana-1.0 vae/config.json


def complex_human_instruction() -> list:
    """The instruction prefix SanaPipeline puts before every prompt (its __call__ default)."""
    import inspect

    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


def build_gemma_tokenizer(vocab_size: int = 1000):
    """transformers' GemmaTokenizer with a byte-fallback BPE trained on TINY_PROMPTS and SANA's
    instruction prefix, with Gemma's normaliser (spaces → ▁), pre-tokeniser and special ids; it
    prepends <bos> as Gemma's does. Handed over as vocab + merges, so save/load round-trips."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GEMMA_SPECIALS + byte_tokens,
                                  show_progress=False)
    tok.train_from_iterator((TINY_PROMPTS + complex_human_instruction()) * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)


def _gemma2(vocab_size: int, hidden_size: int):
    """A 2-layer Gemma2Model (SANA reads its last hidden state), Gemma-2's layer pattern."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, max_position_embeddings=GEMMA_MAX_POSITIONS, pad_token_id=0,
                          eos_token_id=1, bos_token_id=2, sliding_window=64)
    return Gemma2Model(config).eval()


def _dc_ae():
    """AutoencoderDC: ResBlock stages then an EfficientViT (linear-attention) stage, pixel
    (un)shuffle resampling, 32 latent channels, as dc-ae-f32c32-sana-1.0 but 3 stages."""
    from diffusers import AutoencoderDC

    return AutoencoderDC(
        in_channels=3, latent_channels=32, attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=DC_AE_SCALING_FACTOR).eval()


def _transformer(caption_channels: int):
    from diffusers import SanaTransformer2DModel

    transformer = SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
        caption_channels=caption_channels, mlp_ratio=2.5, sample_size=8, patch_size=1,
        norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None)
    reinit_zero_weights(transformer)
    return transformer.eval()


def build_tiny_sana(path: str, seed: int = 0) -> str:
    """Build a tiny real ``SanaPipeline`` with fixed random weights and save it to ``path``.

    Components: ``GemmaTokenizer`` (byte-fallback BPE trained locally), 2-layer ``Gemma2Model``
    (hidden 32), 3-stage ``AutoencoderDC`` (factor 4, 32 latent channels), 2-layer
    ``SanaTransformer2DModel`` (linear self-attention, GLUMBConv feed-forward, patch 1) and
    ``DPMSolverMultistepScheduler`` with SANA-1600M-1024px's config (flow sigmas, shift 3).
    Returns ``path``.
    """
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    tokenizer = build_gemma_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _gemma2(len(tokenizer), hidden_size=32)
        torch.manual_seed(seed + 1)
        vae = _dc_ae()
        torch.manual_seed(seed + 2)
        transformer = _transformer(text_encoder.config.hidden_size)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler(**SANA_SCHEDULER_CONFIG))
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path)
    return path
