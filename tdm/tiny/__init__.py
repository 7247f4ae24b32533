"""Tiny real pipelines (real diffusers/transformers classes, small configs, tokenizers trained
locally) for tests and demos without network: `build_tiny_<family>(path)` saves one and
returns the folder, which loads with the pipeline's own `from_pretrained`."""
from .common import TINY_PROMPTS
from .pixart import build_tiny_pixart

__all__ = ["TINY_PROMPTS", "build_tiny_pixart"]
