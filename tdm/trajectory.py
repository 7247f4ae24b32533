"""The student's trajectory: step grid, rollout, and sampling a point of it (docs/method.md §2–3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .conditions import select_condition
from .path import GaussianPath, working_dtype

# (x_t, t, condition) -> (x̂0, ε̂); see tdm.backbones.Denoiser.
DenoiserFn = Callable[[torch.Tensor, torch.Tensor, dict], tuple]


class StepGrid:
    """Step times τ_K > … > τ_1, first step first (docs/method.md §2).

    Default: τ_k = k·T/K − 1 (T = total_steps), e.g. T=900, K=4 → 899, 674, 449, 224.
    An explicit list (e.g. 999, 856, 665, 399) overrides T and K; then T = τ_K + 1.
    """

    def __init__(self, timesteps: Sequence[int]):
        timesteps = [int(t) for t in timesteps]
        if not timesteps or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
            raise ValueError(f"timesteps must be strictly decreasing, got {timesteps}")
        if timesteps[-1] < 0:
            raise ValueError(f"timesteps must be >= 0, got {timesteps}")
        self.timesteps = timesteps
        # taus[k] = τ_k for k = 1..K; taus[0] = -1 so that the end of step 1 is τ_0 + 1 = 0.
        self.taus = torch.tensor([-1] + timesteps[::-1], dtype=torch.long)

    @classmethod
    def uniform(cls, num_steps: int, total_steps: int) -> "StepGrid":
        return cls([k * total_steps // num_steps - 1 for k in range(num_steps, 0, -1)])

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def horizon(self) -> int:
        """T: the first step starts at τ_K = T − 1."""
        return self.timesteps[0] + 1

    def tau(self, k: torch.Tensor) -> torch.Tensor:
        return self.taus.to(k.device)[k]


@dataclass
class Rollout:
    """States x^{(k)} and the student's predictions at each step, indexed k-1 along dim 0."""

    states: torch.Tensor  # [K, B, ...] input state of step k
    x0: torch.Tensor      # [K, B, ...] x̂0 of step k
    eps: torch.Tensor     # [K, B, ...] ε̂ of step k

    def at(self, k: torch.Tensor):
        """Per-sample (state, x̂0, ε̂) of step k[b] for every sample b, without a batch loop."""
        rows = torch.arange(k.shape[0], device=k.device)
        return self.states[k - 1, rows], self.x0[k - 1, rows], self.eps[k - 1, rows]

    @property
    def sample(self) -> torch.Tensor:
        """The K-step sample: x̂0 of the last step (k = 1)."""
        return self.x0[0]


@torch.no_grad()
def rollout(student: DenoiserFn, noise: torch.Tensor, cond: dict, grid: StepGrid,
            path: GaussianPath, depth: Optional[torch.Tensor] = None) -> Rollout:
    """Deterministic K-step sampling from pure noise placed at τ_K (docs/method.md §2).

    x ← α_{τ_{k-1}} x̂0 + σ_{τ_{k-1}} ε̂ between steps; the student uses no CFG.
    `depth` (per sample, 0..K, best on the host) stops each sample after that many student steps: rows that are
    done leave the batch, so no forward is spent on steps nobody reads. States are kept up to
    the input of step K − depth; predictions past a sample's depth are left zero.
    """
    batch, K = noise.shape[0], grid.num_steps
    states = torch.zeros((K, *noise.shape), device=noise.device, dtype=working_dtype(noise))
    x0s, epss = torch.zeros_like(states), torch.zeros_like(states)
    x = noise.to(states.dtype, copy=True)
    for k in range(K, 0, -1):
        states[k - 1] = x   # every sample that got this far: also those that stop before step k
        rows = None if depth is None else torch.nonzero(depth >= K - k + 1).squeeze(1)
        if rows is not None and rows.numel() == batch:
            rows = None
        if rows is not None and rows.numel() == 0:
            break
        if rows is not None:   # chosen on the host (depth lives there): no wait for the device
            rows = rows.to(noise.device, non_blocking=True)
        x_in = x if rows is None else x[rows]
        c_in = cond if rows is None else select_condition(cond, rows)
        t = grid.tau(torch.full((x_in.shape[0],), k, device=noise.device, dtype=torch.long))
        x0, eps = student(x_in, t, c_in)
        target = slice(None) if rows is None else rows
        x0s[k - 1, target], epss[k - 1, target] = x0, eps
        if k > 1:
            x[target] = path.ddim_move(x0, eps, grid.tau(torch.full_like(t, k - 1)))
    return Rollout(states, x0s, epss)


@dataclass
class Draw:
    """One update's point of the trajectory distribution, one entry per sample
    (docs/method.md §3.1–3.3)."""

    k: torch.Tensor    # step index in 1..K
    t_g: torch.Tensor  # the step's input time τ_k
    t_e: torch.Tensor  # end of the ODE move
    t: torch.Tensor    # diffusion time
    num_steps: int = 0  # K of the grid it was drawn on

    def to(self, device) -> "Draw":
        move = lambda v: v.to(device, non_blocking=True)  # noqa: E731
        return Draw(move(self.k), move(self.t_g), move(self.t_e), move(self.t), self.num_steps)


def _uniform_int(low: torch.Tensor, high: torch.Tensor, rng=None) -> torch.Tensor:
    """Integer draw from U[low, high) per element; an empty range collapses to `low`."""
    span = (high - low).clamp(min=1)
    u = torch.rand(low.shape, device=low.device, generator=rng)
    return low + (u * span).long().clamp(max=span - 1)


def sample_draw(grid: StepGrid, batch: int, device, separate: bool, randmid: bool,
                rng: Optional[torch.Generator] = None, k: Optional[torch.Tensor] = None) -> Draw:
    """Draw (k, t_g, t_e, t) per sample (docs/method.md §3.1–3.3).

    k ~ U{1..K}; t_g = τ_k; t_e = τ_{k-1} + 1 (0 for the last step);
    randmid: t_e ~ U[t_e, t_g − 20);
    separate (mode 1): t ~ U[max(20, t_e), t_g − 10); mode 2: t ~ U[max(20, t_e), T − 10).
    A given `k` is kept (one step draw shared by both updates) and the rest drawn afresh.
    """
    if k is None:
        k = torch.randint(1, grid.num_steps + 1, (batch,), device=device, generator=rng)
    t_g = grid.tau(k)
    t_e = grid.tau(k - 1) + 1
    if randmid:
        t_e = _uniform_int(t_e, t_g - 20, rng)
    low = t_e.clamp(min=20)
    high = t_g - 10 if separate else torch.full_like(t_g, grid.horizon - 10)
    t = _uniform_int(low, high, rng)
    return Draw(k=k, t_g=t_g, t_e=t_e, t=t, num_steps=grid.num_steps)


def transition_std(path: GaussianPath, t_e: torch.Tensor, t: torch.Tensor, ndim: int = 1,
                   dtype: torch.dtype = torch.float32):
    """β = √(σ_t² − (α_t σ_{t_e} / α_{t_e})²), the std of q(x_t | x_{t_e}) (docs/method.md §3.5)."""
    a_e, s_e = path.alpha_sigma(t_e, ndim, dtype)
    a_t, s_t = path.alpha_sigma(t, ndim, dtype)
    return (s_t**2 - (a_t * s_e / a_e) ** 2).clamp(min=0).sqrt()


def diffuse(path: GaussianPath, x0: torch.Tensor, eps: torch.Tensor, t_e: torch.Tensor,
            t: torch.Tensor, noise: torch.Tensor):
    """ODE move to t_e, then forward diffusion to t (docs/method.md §3.4–3.6).

    x_e = α_{t_e} x̂0 + σ_{t_e} ε̂;   x_t = (α_t/α_{t_e}) x_e + β n;
    mixed noise m = ((α_t/α_{t_e}) σ_{t_e} ε̂ + β n) / σ_t, so that x_t = α_t x̂0 + σ_t m.
    Returns (x_t, m).
    """
    nd, dtype = x0.ndim, working_dtype(x0)
    a_e, s_e = path.alpha_sigma(t_e, nd, dtype)
    a_t, s_t = path.alpha_sigma(t, nd, dtype)
    beta = transition_std(path, t_e, t, nd, dtype)
    x_e = path.ddim_move(x0, eps, t_e)
    x_t = (a_t / a_e) * x_e + beta * noise
    m = ((a_t / a_e) * s_e * eps + beta * noise) / s_t
    return x_t, m
