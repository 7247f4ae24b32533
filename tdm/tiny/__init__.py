"""Tiny real pipelines (real diffusers/transformers classes, small configs, tokenizers trained
locally) for tests and demos without network: `build_tiny_<family>(path)` saves one and
returns the folder, which loads with the pipeline's own `from_pretrained`."""
from .cogvideox import build_tiny_cogvideox
from .common import TINY_PROMPTS
from .pixart import build_tiny_pixart
from .sd import build_tiny_sd15, build_tiny_sdxl
from .sd3 import build_tiny_sd3

__all__ = ["TINY_PROMPTS", "build_tiny_cogvideox", "build_tiny_pixart", "build_tiny_sd15",
           "build_tiny_sdxl", "build_tiny_sd3"]
