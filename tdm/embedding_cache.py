"""Prompt conditions cached on disk, so the text encoder (T5-XXL for PixArt: 4.7 B parameters)
runs once per prompt and can leave the accelerator during training."""
from __future__ import annotations

import hashlib
import os
from typing import List

from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .conditions import cat_conditions, condition_to


class EmbeddingCache:
    """One safetensors file per prompt, named by a hash of the prompt and of the backbone's
    condition key (model, revision, sequence length, …), so a cache is never read for another
    encoder."""

    def __init__(self, folder: str, backbone):
        self.folder = folder
        self.backbone = backbone
        self.encoder_key = hashlib.sha1(backbone.condition_key().encode()).hexdigest()[:12]
        os.makedirs(folder, exist_ok=True)

    def path(self, prompt: str) -> str:
        digest = hashlib.sha1(f"{self.encoder_key}\0{prompt}".encode()).hexdigest()
        return os.path.join(self.folder, digest[:2], f"{digest}.safetensors")

    def missing(self, prompts: List[str]) -> List[str]:
        return sorted({p for p in prompts if not os.path.isfile(self.path(p))})

    def precompute(self, prompts: List[str], batch_size: int = 32, dtype=None,
                   show_progress: bool = True) -> int:
        """Encode and store every prompt not cached yet; returns how many were encoded."""
        todo = self.missing(prompts)
        batches = range(0, len(todo), batch_size)
        for start in tqdm(batches, desc="text embeddings", disable=not show_progress or not todo):
            chunk = todo[start:start + batch_size]
            cond = condition_to(self.backbone.encode_prompts(chunk), "cpu", dtype)
            for i, prompt in enumerate(chunk):
                path = self.path(prompt)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.{os.getpid()}.tmp"
                save_file({k: v[i:i + 1].contiguous() for k, v in cond.items()}, tmp)
                os.replace(tmp, path)   # readers never see a half-written file
        return len(todo)

    def encode(self, prompts: List[str], device=None) -> dict:
        """The cached conditions of `prompts`, batched, as encode_prompts would return them."""
        cond = cat_conditions(*(load_file(self.path(p)) for p in prompts))
        return condition_to(cond, device)


def prompt_encoder(args, accelerator, backbone, prompts, weight_dtype):
    """prompts -> condition: the text encoder on every batch, or the on-disk cache
    (--cache_text_embeddings), filled once up front, after which the encoder leaves the device."""
    if not args.cache_text_embeddings:
        return backbone.encode_prompts
    cache = EmbeddingCache(args.text_embeddings_dir or os.path.join(args.output_dir, "text_embeddings"),
                           backbone)
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            cache.precompute(prompts + list(args.validation_prompts), dtype=weight_dtype)
    backbone.offload_text_encoders()
    return lambda batch_prompts: cache.encode(batch_prompts, accelerator.device)
