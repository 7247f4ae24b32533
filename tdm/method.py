"""One TDM iteration in terms of three denoisers (x_t, t, condition) -> (x̂0, ε̂).

The training script owns devices, optimisers and logging; this object owns the maths:
fake-score loss (TDM_SPEC §4) and generator loss (TDM_SPEC §5) on a shared student rollout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .conditions import cat_conditions
from .losses import FakeScoreLoss, GeneratorLoss, classifier_free_guidance
from .path import GaussianPath
from .trajectory import DenoiserFn, Rollout, StepGrid, diffuse, rollout, sample_intervals


@dataclass
class TDMConfig:
    cfg: float = 4.5
    separate: bool = False      # mode 1 (--use_separate) vs mode 2 (intervals up to T)
    randmid: bool = False       # --use_randmid
    loss: str = "mse"           # mse | huber | huber_norm
    snr_gamma: float = 5.0


class NoiseGenerator:
    """The random stream of training (initial noise, interval draws, diffusion noise), separate
    from torch's global one so that a checkpoint can store it and resume continues it exactly."""

    def __init__(self, device, seed: int):
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def randn(self, shape, device) -> torch.Tensor:
        return torch.randn(shape, device=device, generator=self.generator)

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


class TDM:
    def __init__(self, path: GaussianPath, grid: StepGrid, config: TDMConfig,
                 noise: Optional[NoiseGenerator] = None):
        self.path = path
        self.grid = grid
        self.config = config
        self.noise = noise
        self.fake_score_objective = FakeScoreLoss(path, config.snr_gamma)
        self.generator_objective = GeneratorLoss(config.loss)

    def rollout(self, student: DenoiserFn, noise: torch.Tensor, cond: dict) -> Rollout:
        return rollout(student, noise, cond, self.grid, self.path)

    def _draw(self, batch: int, device):
        return sample_intervals(self.grid, batch, device, self.config.separate, self.config.randmid,
                                self.noise.generator if self.noise else None)

    def randn(self, shape, device) -> torch.Tensor:
        if self.noise is None:
            return torch.randn(shape, device=device)
        return self.noise.randn(shape, device)

    def fake_score_loss(self, traj: Rollout, cond: dict, fake: DenoiserFn) -> torch.Tensor:
        """§4. The student's step-k prediction is the rollout's own, not a recomputation."""
        draw = self._draw(traj.states.shape[1], traj.states.device)
        _, x0, eps = traj.at(draw.k)
        noise = self.randn(x0.shape, x0.device)
        x_t, m = diffuse(self.path, x0, eps, draw.t_e, draw.t, noise)
        x0_fake, _ = fake(x_t, draw.t, cond)
        return self.fake_score_objective(x0_fake, x0, draw.t, m, noise)

    @torch.no_grad()
    def teacher_x0(self, teacher: DenoiserFn, x_t, t, cond: dict, uncond: dict) -> torch.Tensor:
        """CFG teacher prediction (§5); both branches in one batched forward, one if cfg == 1."""
        if self.config.cfg == 1.0:
            return teacher(x_t, t, cond)[0]
        x0 = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conditions(cond, uncond))[0]
        x0_cond, x0_uncond = x0.chunk(2)
        return classifier_free_guidance(x0_cond, x0_uncond, self.config.cfg)

    def generator_loss(self, traj: Rollout, cond: dict, uncond: dict, student: DenoiserFn,
                       teacher: DenoiserFn, fake: DenoiserFn) -> torch.Tensor:
        """§5. A fresh draw; gradient reaches θ only through x̂0 of the one student step."""
        draw = self._draw(traj.states.shape[1], traj.states.device)
        state, _, _ = traj.at(draw.k)
        x0, eps = student(state, draw.t_g, cond)
        noise = self.randn(x0.shape, x0.device)
        with torch.no_grad():
            x_t, _ = diffuse(self.path, x0.detach(), eps.detach(), draw.t_e, draw.t, noise)
            x0_real = self.teacher_x0(teacher, x_t, draw.t, cond, uncond)
            x0_fake, _ = fake(x_t, draw.t, cond)
        return self.generator_objective(x0, x0_real, x0_fake)
