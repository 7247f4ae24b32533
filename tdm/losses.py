"""The two TDM losses, in the notation of docs/method.md §4–5."""
from __future__ import annotations

import math

import torch

from .path import GaussianPath, working_dtype


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.flatten(1).mean(dim=1)


def importance_weight(m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """w_IS = exp(−½ mean(m²)) / exp(−½ mean(n²)), per sample (docs/method.md §4).

    Written as one exponential of the difference so that it cannot overflow or become 0/0.
    """
    dtype = working_dtype(m)
    return torch.exp(-0.5 * (per_sample_mean(m.to(dtype) ** 2) - per_sample_mean(n.to(dtype) ** 2)))


def min_snr_weight(path: GaussianPath, t: torch.Tensor, gamma: float = 5.0,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """min(SNR_t, γ) with γ = 5 (docs/method.md §4)."""
    return path.snr(t, dtype).clamp(max=gamma)


def classifier_free_guidance(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, cfg: float):
    """x0_real = x0_u + cfg · (x0_c − x0_u) (docs/method.md §5)."""
    return x0_uncond + cfg * (x0_cond - x0_uncond)


def dmd_normalizer(x0: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """w = mean_pixels |x̂0 − x0_real| per sample, in float64 as in the demo (docs/method.md §5)."""
    return per_sample_mean((x0.double() - x0_real.double()).abs()).detach()


class FakeScoreLoss:
    """L_ψ = mean_b[ min(SNR_t, 5) · w_IS · mean_pixels (x0_ψ − x̂0)² ]  (docs/method.md §4).
    `use_importance_weight=False` sets w_IS = 1 (the paper's ablation)."""

    def __init__(self, path: GaussianPath, snr_gamma: float = 5.0, use_importance_weight: bool = True):
        self.path = path
        self.snr_gamma = snr_gamma
        self.use_importance_weight = use_importance_weight

    def __call__(self, x0_fake, x0_student, t, m, n) -> torch.Tensor:
        dtype = working_dtype(x0_fake)
        weight = min_snr_weight(self.path, t, self.snr_gamma, dtype)
        if self.use_importance_weight:
            weight = weight * importance_weight(m, n)
        mse = per_sample_mean((x0_fake.to(dtype) - x0_student.detach().to(dtype)) ** 2)
        return (weight.detach() * mse).mean()


class StudentLoss:
    """The student update's distribution-matching surrogate on x̂0 (docs/method.md §5).

    target = sg(x̂0 + (x0_real − x0_fake)), w = sg(mean |x̂0 − x0_real|) per sample, and
      mse:        mean( (x̂0 − target)² / w )
      huber:      mean( (√((x̂0 − target)² + c²) − c) / w ), element-wise, c = 1e-3 (demo)
      huber_norm: mean_b( (√(‖x̂0 − target‖² + c²) − c) / w ), c = 0.00054·√d (paper)
    Every variant's gradient is zero when x0_real == x0_fake.
    """

    kinds = ("mse", "huber", "huber_norm")

    def __init__(self, kind: str = "mse", huber_c: float = 1e-3):
        if kind not in self.kinds:
            raise ValueError(f"loss kind must be one of {self.kinds}, got {kind!r}")
        self.kind = kind
        self.huber_c = huber_c

    def __call__(self, x0, x0_real, x0_fake) -> torch.Tensor:
        dtype = working_dtype(x0)
        x0 = x0.to(dtype)
        target = (x0 + (x0_real.to(dtype) - x0_fake.to(dtype))).detach()
        w = dmd_normalizer(x0, x0_real).to(x0.dtype)
        diff = x0 - target
        if self.kind == "huber_norm":
            c = 0.00054 * math.sqrt(diff[0].numel())
            per_sample = (diff.flatten(1).pow(2).sum(1) + c**2).sqrt() - c
            return (per_sample / w).mean()
        w = w.reshape(-1, *([1] * (x0.ndim - 1)))
        if self.kind == "huber":
            return (((diff**2 + self.huber_c**2).sqrt() - self.huber_c) / w).mean()
        return (diff**2 / w).mean()
