"""Cached prompt conditions equal freshly encoded ones; the cache key includes the encoder."""
import os

import pytest
import torch

from conftest import accelerate_launch
from tdm.embedding_cache import EmbeddingCache

PROMPTS = ["a red cat on a mat", "a blue boat at sea", "a red cat on a mat"]


def test_cache_equals_the_encoder_and_is_keyed_by_it(backbone, tmp_path):
    cache = EmbeddingCache(str(tmp_path), backbone)
    assert cache.precompute(PROMPTS, show_progress=False) == 2        # duplicates encoded once
    assert cache.precompute(PROMPTS, show_progress=False) == 0        # and never again
    cached, fresh = cache.encode(PROMPTS), backbone.encode_prompts(PROMPTS)
    assert cached.keys() == fresh.keys()
    for key in fresh:
        assert cached[key].dtype == fresh[key].dtype
        torch.testing.assert_close(cached[key], fresh[key])
    original = backbone.max_sequence_length
    try:
        backbone.max_sequence_length = 60
        other = EmbeddingCache(str(tmp_path), backbone)
        assert other.path(PROMPTS[0]) != cache.path(PROMPTS[0])
        assert other.missing(PROMPTS) == sorted(set(PROMPTS))
    finally:
        backbone.max_sequence_length = original


@pytest.mark.slow
def test_training_with_cached_embeddings(tiny_pixart, tmp_path):
    out = tmp_path / "run"
    proc = accelerate_launch(["--pretrained_model_name_or_path", tiny_pixart, "--output_dir", str(out),
                              "--resolution", "32", "--max_train_steps", "2", "--validation_steps", "2",
                              "--checkpointing_steps", "0", "--cache_text_embeddings", "--lora_rank", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [f for _, _, fs in os.walk(out / "text_embeddings") for f in fs]
    assert len(files) >= 32     # every training prompt (assets/prompts.txt) and validation prompt
    assert (out / "pytorch_lora_weights.safetensors").is_file()
