"""Image grids for validation samples and teacher/student comparisons."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """[B, 3, H, W] in [0, 1] → PIL images."""
    array = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
    return [Image.fromarray(a.astype(np.uint8)) for a in array]


def image_grid(images: Sequence[Image.Image], rows: int,
               row_labels: Optional[Sequence[str]] = None) -> Image.Image:
    """Rows × cols grid; optional labels in a band on the left of each row."""
    cols = (len(images) + rows - 1) // rows
    w, h = images[0].size
    band = 0
    if row_labels:
        band = max(60, 7 * max(len(label) for label in row_labels) + 10)
    grid = Image.new("RGB", (band + cols * w, rows * h), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        grid.paste(image, (band + (i % cols) * w, (i // cols) * h))
    for r, label in enumerate(row_labels or []):
        draw.text((5, r * h + h // 2 - 5), label, fill="black")
    return grid
