#!/usr/bin/env python
"""Precompute the text embeddings of a whole prompt set for `train_tdm.py --cache_text_embeddings`.

    python scripts/cache_text_embeddings.py --pretrained_model_name_or_path PixArt-alpha/PixArt-XL-2-512x512 \
        --prompts assets/prompts.txt --text_embeddings_dir embeddings/pixart --dtype fp16

Then train with --cache_text_embeddings --text_embeddings_dir embeddings/pixart: the text encoder
is not needed on the accelerator at all.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tdm.backbones import load_backbone  # noqa: E402
from tdm.config import UsageError, yaml_mapping  # noqa: E402
from tdm.data import load_prompts  # noqa: E402
from tdm.embedding_cache import EmbeddingCache  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--backbone", default="auto")
    p.add_argument("--backbone_options", type=yaml_mapping, default=None)
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None)
    p.add_argument("--prompts", required=True)
    p.add_argument("--caption_column", default=None)
    p.add_argument("--text_embeddings_dir", required=True)
    p.add_argument("--max_sequence_length", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16",
                   help="Storage and encoder dtype; match train_tdm.py's --mixed_precision.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        prompts = load_prompts(args.prompts, args.caption_column)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    backbone = load_backbone(args.pretrained_model_name_or_path, args.backbone, args.revision,
                             args.variant, args.backbone_options)
    if args.max_sequence_length:
        backbone.max_sequence_length = args.max_sequence_length
    dtype = DTYPES[args.dtype] if args.device != "cpu" else torch.float32
    backbone.load_text_encoders(args.device, dtype)
    cache = EmbeddingCache(args.text_embeddings_dir, backbone)
    done = cache.precompute(prompts + [""], batch_size=args.batch_size, dtype=DTYPES[args.dtype])
    print(f"encoded {done} new prompt(s); {len(set(prompts))} cached in {args.text_embeddings_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
