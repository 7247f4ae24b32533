#!/usr/bin/env python
"""Tiny local models for eval_tdm.py without network: a CLIP, an Inception-shaped FID network and a tiny PixArt-α pipeline.

    python scripts/tiny_eval_models.py outputs/tiny   # writes outputs/tiny/clip, outputs/tiny/pixart
    python eval_tdm.py ... --clip_model outputs/tiny/clip \
        --fid_feature_extractor scripts.tiny_eval_models:TinyInception

The CLIP is a real transformers CLIPModel + CLIPProcessor with a tokenizer trained locally, the
FID network a small convolution with fixed random weights, the pipeline tdm.tiny's: random
weights all, so the numbers they give exercise the evaluation (docs/evaluation.md, offline
recipe) and the tests (tests/test_eval.py), not image quality.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyInception(torch.nn.Module):
    """Inception-shaped FID features: uint8 images [N, 3, H, W] → [N, 8], fixed random weights
    (`--fid_feature_extractor scripts.tiny_eval_models:TinyInception`)."""

    num_features = 8

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, images):
        x = images.float() / 127.5 - 1
        return self.fc(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


def build_tiny_clip(path: str, seed: int = 3) -> str:
    """A tiny real CLIPModel + CLIPProcessor (32 px images, 77 text tokens) saved to `path`."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor   # without torchvision
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    from tdm.tiny.clip import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    processor = CLIPProcessor(image_processor=ImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def main(argv=None) -> int:
    from tdm.checks import Parser, UsageError, check_writable_folder
    from tdm.tiny import build_tiny_pixart

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="Where clip/ and pixart/ are written.")
    try:
        args = parser.parse_args(argv)
        check_writable_folder("output_dir", args.output_dir)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()        # no "Writing model shards" bars
    transformers_logging.disable_progress_bar()
    clip = build_tiny_clip(os.path.join(args.output_dir, "clip"))
    pixart = build_tiny_pixart(os.path.join(args.output_dir, "pixart"))
    print(f"wrote {clip} (CLIP) and {pixart} (PixArt-α pipeline); FID features: "
          "--fid_feature_extractor scripts.tiny_eval_models:TinyInception")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
