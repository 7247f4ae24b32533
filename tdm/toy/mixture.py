"""The toy's data: a mixture of isotropic Gaussians in 2-D, unconditional or with class labels."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class GaussianMixture:
    """Mixture of isotropic Gaussians in 2-D, one std per component (all equal by default);
    `labels` names the components of a conditional one."""

    means: torch.Tensor            # [M, 2]
    std: torch.Tensor              # [M]
    weights: torch.Tensor          # [M], sums to 1
    labels: Optional[List[str]] = None

    @classmethod
    def from_options(cls, options: dict) -> "GaussianMixture":
        """`means: [[x, y], ...]`, `circle: {modes, radius}` or `grid: {rows, cols, spacing}`
        (centred on 0); `std`: one number or one per mode; optional `weights` (normalised);
        `conditional: true` (labels "0".."M-1") or explicit `labels: [...]`."""
        if "means" in options:
            means = torch.tensor(options["means"], dtype=torch.float32).reshape(-1, 2)
        elif "grid" in options:
            grid = options["grid"]
            rows, cols = int(grid.get("rows", 3)), int(grid.get("cols", grid.get("rows", 3)))
            spacing = float(grid.get("spacing", 1.0))
            y, x = torch.meshgrid(torch.arange(rows) - (rows - 1) / 2,
                                  torch.arange(cols) - (cols - 1) / 2, indexing="ij")
            means = (spacing * torch.stack([x.reshape(-1), y.reshape(-1)], 1)).float()
        else:
            circle = options.get("circle", {})
            modes, radius = int(circle.get("modes", 8)), float(circle.get("radius", 2.0))
            angle = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
            means = (radius * torch.stack([angle.cos(), angle.sin()], 1)).float()
        weights = torch.tensor(options.get("weights") or [1.0] * len(means), dtype=torch.float32)
        if weights.shape != (len(means),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"mixture weights must be {len(means)} non-negative numbers")
        std = torch.tensor(options.get("std", 0.1), dtype=torch.float32).reshape(-1)
        std = std.expand(len(means)).clone() if std.numel() == 1 else std
        if std.shape != (len(means),) or (std <= 0).any():
            raise ValueError(f"mixture std must be one positive number or {len(means)} of them")
        labels = options.get("labels")
        if labels is None and options.get("conditional"):
            labels = [str(i) for i in range(len(means))]
        if labels is not None and len(labels) != len(means):
            raise ValueError(f"mixture has {len(means)} means but {len(labels)} labels")
        return cls(means, std, weights / weights.sum(),
                   [str(label) for label in labels] if labels is not None else None)

    @property
    def num_classes(self) -> int:
        """Number of class labels; 0 for an unconditional mixture."""
        return len(self.labels) if self.labels else 0

    def sample(self, n: int, rng: Optional[torch.Generator] = None):
        """(points [n, 2], component index [n])."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=rng)
        noise = torch.randn((n, 2), generator=rng)
        return self.means[component] + self.std[component, None] * noise, component
