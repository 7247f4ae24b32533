"""The toy's data: an isotropic Gaussian mixture in 2-D, unconditional or with class labels."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class GaussianMixture:
    """Isotropic Gaussian mixture in 2-D; `labels` names the components of a conditional one."""

    means: torch.Tensor            # [M, 2]
    std: float
    weights: torch.Tensor          # [M], sums to 1
    labels: Optional[List[str]] = None

    @classmethod
    def from_options(cls, options: dict) -> "GaussianMixture":
        """`means: [[x, y], ...]` or `circle: {modes, radius}`; `std`; optional `weights`;
        `conditional: true` (labels "0".."M-1") or explicit `labels: [...]`."""
        if "means" in options:
            means = torch.tensor(options["means"], dtype=torch.float32).reshape(-1, 2)
        else:
            circle = options.get("circle", {})
            modes, radius = int(circle.get("modes", 8)), float(circle.get("radius", 2.0))
            angle = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
            means = (radius * torch.stack([angle.cos(), angle.sin()], 1)).float()
        weights = torch.tensor(options.get("weights") or [1.0] * len(means), dtype=torch.float32)
        if weights.shape != (len(means),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"mixture weights must be {len(means)} non-negative numbers")
        labels = options.get("labels")
        if labels is None and options.get("conditional"):
            labels = [str(i) for i in range(len(means))]
        if labels is not None and len(labels) != len(means):
            raise ValueError(f"mixture has {len(means)} means but {len(labels)} labels")
        return cls(means, float(options.get("std", 0.1)), weights / weights.sum(),
                   [str(label) for label in labels] if labels is not None else None)

    @property
    def num_classes(self) -> int:
        """Number of class labels; 0 for an unconditional mixture."""
        return len(self.labels) if self.labels else 0

    def sample(self, n: int, rng: Optional[torch.Generator] = None):
        """(points [n, 2], component index [n])."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=rng)
        noise = torch.randn((n, 2), generator=rng)
        return self.means[component] + self.std * noise, component
