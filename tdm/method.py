"""One TDM iteration in terms of three denoisers (x_t, t, condition) -> (x̂0, ε̂).

The training script owns devices, optimisers and logging; this object owns the maths:
fake-score loss (docs/method.md §4) and generator loss (docs/method.md §5) on a shared student rollout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .conditions import cat_conditions
from .losses import FakeScoreLoss, GeneratorLoss, classifier_free_guidance
from .path import GaussianPath
from .step_condition import NUM_STEPS, STEP_INDEX
from .trajectory import (DenoiserFn, Interval, Rollout, StepGrid, diffuse, rollout,
                         sample_intervals)


@dataclass
class TDMConfig:
    cfg: float = 4.5
    separate: bool = False      # mode 1 (--use_separate) vs mode 2 (intervals up to T)
    randmid: bool = False       # --use_randmid
    loss: str = "mse"           # mse | huber | huber_norm
    snr_gamma: float = 5.0
    importance_weight: bool = True  # w_IS of §4 (False: the paper's ablation)
    lazy_rollout: bool = True   # advance each sample only as deep as its draws need
    share_step_draw: bool = False  # one k per sample for both updates
    unify_steps: tuple = ()     # TDM-unify (§6): K drawn per iteration from these, K-conditioned
    fake_step_condition: bool = False  # the fake score also sees the step index k


class NoiseGenerator:
    """The random stream of training (initial noise, interval draws, diffusion noise), separate
    from torch's global one so that a checkpoint can store it and resume continues it exactly."""

    def __init__(self, device, seed: int, shared_seed: Optional[int] = None):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # draws every process must agree on (the iteration's K: sharded forwards are collective)
        self.shared = torch.Generator().manual_seed(seed if shared_seed is None else shared_seed)

    def randn(self, shape, device) -> torch.Tensor:
        return torch.randn(shape, device=device, generator=self.generator)

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state(), "shared": self.shared.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])
        if "shared" in state:
            self.shared.set_state(state["shared"])


class TDM:
    def __init__(self, path: GaussianPath, grid: StepGrid, config: TDMConfig,
                 noise: Optional[NoiseGenerator] = None):
        self.path = path
        self.grid = grid
        self.config = config
        self.noise = noise
        # one grid per step count: the given grid, or k·T/K − 1 for each K of TDM-unify (§6)
        self.grids = ({K: StepGrid.uniform(K, grid.horizon) for K in config.unify_steps}
                      if config.unify_steps else {grid.num_steps: grid})
        self.fake_score_objective = FakeScoreLoss(path, config.snr_gamma, config.importance_weight)
        self.generator_objective = GeneratorLoss(config.loss)

    @property
    def step_counts(self) -> list:
        """The K the student is trained for (one, unless TDM-unify)."""
        return sorted(self.grids)

    def draw_num_steps(self) -> int:
        """K of this iteration (§6): uniform over the unify set, the same on every process."""
        counts = self.step_counts
        if len(counts) == 1:
            return counts[0]
        generator = self.noise.shared if self.noise else None
        return counts[int(torch.randint(len(counts), (1,), generator=generator))]

    def draw(self, batch: int, device):
        """(fake-score draw, generator draw) of (k, t_g, t_e, t) per sample (docs/method.md §3.1–3.3),
        both on the grid of this iteration's K.

        Both are drawn before the rollout so that it knows how deep each sample must go; they are
        independent, as with the demo's fresh draw after the fake update. With share_step_draw
        the generator reuses the fake draw's k (fresh t_e and t)."""
        generator = self.noise.generator if self.noise else None
        grid = self.grids[self.draw_num_steps()]
        fake = sample_intervals(grid, batch, device, self.config.separate, self.config.randmid,
                                generator)
        gen = sample_intervals(grid, batch, device, self.config.separate, self.config.randmid,
                               generator, k=fake.k if self.config.share_step_draw else None)
        return fake, gen

    def student_condition(self, cond: dict, num_steps: int) -> dict:
        """The student's condition: the prompt, plus K under TDM-unify (§6)."""
        if not self.config.unify_steps:
            return cond
        batch = next(iter(cond.values())).shape[0]
        device = next(iter(cond.values())).device
        return {**cond, NUM_STEPS: torch.full((batch,), num_steps, dtype=torch.long, device=device)}

    def fake_condition(self, cond: dict, num_steps: int, k: torch.Tensor) -> dict:
        """The fake score's condition: the student's, plus the step index k with
        fake_step_condition (mode 2: the steps' noise intervals overlap)."""
        cond = self.student_condition(cond, num_steps)
        return {**cond, STEP_INDEX: k} if self.config.fake_step_condition else cond

    def rollout_depth(self, fake: Interval, gen: Interval) -> Optional[torch.Tensor]:
        """Steps each sample needs: the fake update reads the student's prediction AT step k_f
        (K − k_f + 1 forwards), the generator update only the state BEFORE step k_g (K − k_g)."""
        if not self.config.lazy_rollout:
            return None
        K = fake.num_steps
        return torch.maximum(K - fake.k + 1, K - gen.k)

    def rollout(self, student: DenoiserFn, noise: torch.Tensor, cond: dict,
                depth: Optional[torch.Tensor] = None, num_steps: Optional[int] = None) -> Rollout:
        """The student's K-step trajectory (default K: the deepest grid)."""
        K = num_steps or self.step_counts[-1]
        return rollout(student, noise, self.student_condition(cond, K), self.grids[K], self.path, depth)

    def randn(self, shape, device) -> torch.Tensor:
        if self.noise is None:
            return torch.randn(shape, device=device)
        return self.noise.randn(shape, device)

    def fake_score_loss(self, traj: Rollout, cond: dict, fake: DenoiserFn, draw: Interval) -> torch.Tensor:
        """§4. The student's step-k prediction is the rollout's own, not a recomputation."""
        _, x0, eps = traj.at(draw.k)
        noise = self.randn(x0.shape, x0.device)
        x_t, m = diffuse(self.path, x0, eps, draw.t_e, draw.t, noise)
        x0_fake, _ = fake(x_t, draw.t, self.fake_condition(cond, draw.num_steps, draw.k))
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
                       teacher: DenoiserFn, fake: DenoiserFn, draw: Interval) -> torch.Tensor:
        """§5. The gradient reaches θ only through x̂0 of the one student step at draw.k."""
        state, _, _ = traj.at(draw.k)
        x0, eps = student(state, draw.t_g, self.student_condition(cond, draw.num_steps))
        noise = self.randn(x0.shape, x0.device)
        with torch.no_grad():
            x_t, _ = diffuse(self.path, x0.detach(), eps.detach(), draw.t_e, draw.t, noise)
            x0_real = self.teacher_x0(teacher, x_t, draw.t, cond, uncond)
            x0_fake, _ = fake(x_t, draw.t, self.fake_condition(cond, draw.num_steps, draw.k))
        return self.generator_objective(x0, x0_real, x0_fake)
