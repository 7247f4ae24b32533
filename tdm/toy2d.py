"""The 2-D toy: a Gaussian mixture, a small MLP ε-denoiser and its denoising-score-matching
pre-training. The TDM backbone adapter around them is tdm/backbones/toy2d.py."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

from .path import GaussianPath


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


class ToyDenoiser(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Residual MLP ε(x_t, t, class): sinusoidal timestep embedding plus a class embedding whose
    last row (`num_classes`) is the empty condition."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, hidden: int = 128, depth: int = 3, time_channels: int = 64,
                 num_classes: int = 0):
        super().__init__()
        self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_channels, hidden)
        self.class_embedding = torch.nn.Embedding(num_classes + 1, hidden)
        self.proj_in = torch.nn.Linear(2, hidden)
        self.blocks = torch.nn.ModuleList(ResidualBlock(hidden) for _ in range(depth))
        self.proj_out = torch.nn.Linear(hidden, 2)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
        emb = self.time_embedding(self.time_proj(timestep).to(x.dtype))
        emb = emb + self.class_embedding(class_labels)
        h = self.proj_in(x)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                h = self._gradient_checkpointing_func(block, h, emb)
            else:
                h = block(h, emb)
        return self.proj_out(torch.nn.functional.silu(h))


class ResidualBlock(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(hidden, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)

    def forward(self, h, emb):
        act = torch.nn.functional.silu
        return h + self.fc2(act(self.fc1(act(h + emb))))


def pretrain_teacher(net: ToyDenoiser, mixture: GaussianMixture, path: GaussianPath,
                     steps: int = 4000, batch_size: int = 2048, lr: float = 2e-3,
                     label_dropout: float = 0.1, ema: float = 0.995, seed: int = 0) -> ToyDenoiser:
    """Denoising score matching (ε-prediction): E‖ε_φ(α_t x0 + σ_t ε, t, c) − ε‖², t ~ U{0..N-1}.

    A conditional mixture drops the label to the empty condition with prob. `label_dropout`, so
    that the teacher has the unconditional branch CFG needs (docs/method.md §5). Returns the EMA copy.
    """
    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    average = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    null = mixture.num_classes
    for _ in range(steps):
        x0, component = mixture.sample(batch_size, rng)
        label = component if mixture.num_classes else torch.full_like(component, null)
        drop = torch.rand(batch_size, generator=rng) < label_dropout
        label = torch.where(drop, torch.full_like(label, null), label)
        t = torch.randint(0, path.num_timesteps, (batch_size,), generator=rng)
        eps = torch.randn(x0.shape, generator=rng)
        loss = (net(path.ddim_move(x0, eps, t), t, label) - eps).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for avg, param in zip(average.parameters(), net.parameters()):
                avg.lerp_(param, 1 - ema)
    return average
