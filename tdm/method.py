"""One TDM iteration in terms of three denoisers (x_t, t, condition) -> (x̂0, ε̂).

Glossary (docs/method.md, Notation), used in code, docs and logs:
    teacher φ      the frozen pretrained model
    student θ      the K-step model being distilled; its update is the *student update* (§5,
                   the paper's "generator update"; the CLI keeps the upstream --generator_lr_ratio)
    fake score ψ   the denoiser trained on the student's trajectory (§4)
    draw           one update's (k, t_g, t_e, t) per sample (§3), a `Draw`
    K, T, grid     steps, horizon (--total_steps) and step times τ_K > … > τ_1 (§2)
    rng            a torch.Generator; `TrainingRNG` holds the training stream

`TDM.start` makes an iteration's draws and the student's rollout, returned as plain data (an
`Iteration`); `TDM.fake_score_loss` and `TDM.student_loss` take it. Nothing about draws, depths or K
leaves this module: the training script only runs forward loss → backward → optimiser step for each
update.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from .conditions import cat_conditions, expand_condition
from .losses import FakeScoreLoss, StudentLoss, classifier_free_guidance
from .path import GaussianPath
from .step_condition import NUM_STEPS, STEP_INDEX
from .trajectory import DenoiserFn, Draw, Rollout, StepGrid, diffuse, rollout, sample_draw


@dataclass(frozen=True)
class TDMConfig:
    """The settings of the objective, each the flag of the same name (tdm/config.py), read by
    `from_flags` without renaming. What the run decides (the teacher's guidance input, sharded
    forwards) is not a setting: `TDM` takes it as its own arguments."""
    cfg: float = 4.5
    use_separate: bool = False  # mode 1 (each step's own interval) vs mode 2 (intervals up to T)
    use_randmid: bool = False   # random end point of the ODE move
    loss: str = "mse"           # one of StudentLoss.kinds
    snr_gamma: float = 5.0
    importance_weight: bool = True  # w_IS of §4 (--no_importance_weight: the paper's ablation)
    full_rollout: bool = False  # every sample to the last step (else only as deep as its draws need)
    share_step_draw: bool = False  # one k per sample for both updates
    unify_steps: tuple = ()     # TDM-unify (§6): K drawn per iteration from these, K-conditioned
    fake_step_condition: bool = False  # the fake score also sees the step index k

    def __post_init__(self):
        object.__setattr__(self, "unify_steps", tuple(self.unify_steps or ()))   # a flag's list or None

    @classmethod
    def from_flags(cls, flags) -> "TDMConfig":
        """Each field from the run config `flags`' value of the same name."""
        return cls(**{field.name: getattr(flags, field.name) for field in fields(cls)})


GUIDANCE = "guidance"   # condition key of a guidance-embedded teacher's guidance value ([B])


class TrainingRNG:
    """The random stream of training (initial noise, draws, diffusion noise), separate from
    torch's global one so that a checkpoint can store it and resume continues it exactly.

    Draws are made on the host (`draw_rng`, the same generator as `rng` on a CPU device) so
    that the lazy rollout knows each sample's depth without waiting for the device."""

    def __init__(self, device, seed: int, shared_seed: Optional[int] = None):
        self.rng = torch.Generator(device=device).manual_seed(seed)
        on_host = torch.device(device).type == "cpu"
        self.draw_rng = self.rng if on_host else torch.Generator().manual_seed(seed)
        # draws every process must agree on (the iteration's K: sharded forwards are collective)
        self.shared_rng = torch.Generator().manual_seed(seed if shared_seed is None else shared_seed)

    def randn(self, shape, device) -> torch.Tensor:
        return torch.randn(shape, device=device, generator=self.rng)

    def state_dict(self) -> dict:
        state = {"state": self.rng.get_state(), "shared": self.shared_rng.get_state()}
        if self.draw_rng is not self.rng:
            state["draw"] = self.draw_rng.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["state"])
        if "shared" in state:
            self.shared_rng.set_state(state["shared"])
        if "draw" in state and self.draw_rng is not self.rng:
            self.draw_rng.set_state(state["draw"])


@dataclass(frozen=True)
class Iteration:
    """One iteration's state, made by `TDM.start`: the prompts, K, both updates' draws and the
    student's rollout. Plain data: `TDM.fake_score_loss` and then `TDM.student_loss` read it."""

    cond: dict
    uncond: dict                # the empty prompt's condition, one row per sample
    num_steps: int              # K of this iteration
    fake_score_draw: Draw
    student_draw: Optional[Draw]   # None: started for a fake-score update only
    trajectory: Rollout


class TDM:
    """The objective of docs/method.md on `path` and the step `grid`, with the settings `config`.

    Two facts about the run, not settings, are its own arguments (the caller derives them):
    `guidance_embedding`: the teacher takes --cfg through its guidance embedding, one call (§5.1,
    FLUX.1-dev; `Backbone.set_guidance` resolves --guidance_embedding auto/on/off);
    `sharded`: every forward is collective across ranks (FSDP), so every rank must run as many and
    rolls every sample out to the last step (no lazy rollout, as with --full_rollout)."""

    def __init__(self, path: GaussianPath, grid: StepGrid, config: TDMConfig,
                 rng: Optional[TrainingRNG] = None, *, guidance_embedding: bool = False,
                 sharded: bool = False):
        self.path = path
        self.grid = grid
        self.config = config
        self.rng = rng
        self.guidance_embedding = guidance_embedding
        # advance each sample only as deep as its draws need (TDM.start)
        self.lazy_rollout = not (config.full_rollout or sharded)
        # one grid per step count: the given grid, or k·T/K − 1 for each K of TDM-unify (§6)
        self.grids = ({K: StepGrid.uniform(K, grid.horizon) for K in config.unify_steps}
                      if config.unify_steps else {grid.num_steps: grid})
        self.fake_score_objective = FakeScoreLoss(path, config.snr_gamma, config.importance_weight)
        self.student_objective = StudentLoss(config.loss)

    @property
    def step_counts(self) -> list:
        """The K the student is trained for (one, unless TDM-unify)."""
        return sorted(self.grids)

    def start(self, student: DenoiserFn, cond: dict, uncond: dict, latent_shape: tuple,
              device, student_update: bool = True) -> Iteration:
        """Draw this iteration's K and both updates' draws, then roll the student out from pure
        noise, each sample only as deep as its draws need (lazy rollout: the fake-score update
        reads the prediction AT step k, K − k + 1 forwards; the student update only the state
        BEFORE step k, K − k forwards). `uncond` has one row (the empty prompt).
        `student_update=False`: an extra fake-score update (--fake_score_updates, §4), rolled out
        only as deep as its own draw; its iteration has no student loss."""
        batch = next(iter(cond.values())).shape[0]
        noise = self.randn((batch, *latent_shape), device)
        K = self.draw_num_steps()
        fake_score_draw, student_draw = self.draw(K, batch, device)   # both: one stream either way
        depth = None
        if self.lazy_rollout:   # on the host
            depth = K - fake_score_draw.k + 1
            if student_update:
                depth = torch.maximum(depth, K - student_draw.k)
        trajectory = self.rollout(student, noise, cond, depth, K)
        return Iteration(cond, expand_condition(uncond, batch), K, fake_score_draw.to(device),
                         student_draw.to(device) if student_update else None, trajectory)

    def fake_score_loss(self, iteration: Iteration, fake_score: DenoiserFn) -> torch.Tensor:
        """§4, on `iteration`'s fake-score draw. The student's step-k prediction is the rollout's
        own, not a recomputation."""
        draw = iteration.fake_score_draw
        _, x0, eps = iteration.trajectory.at(draw.k)
        n = self.randn(x0.shape, x0.device)
        x_t, m = diffuse(self.path, x0, eps, draw.t_e, draw.t, n)
        cond = self.fake_score_condition(iteration.cond, iteration.num_steps, draw.k)
        x0_fake, _ = fake_score(x_t, draw.t, cond)
        return self.fake_score_objective(x0_fake, x0, draw.t, m, n)

    def student_loss(self, iteration: Iteration, student: DenoiserFn, teacher: DenoiserFn,
                     fake_score: DenoiserFn) -> torch.Tensor:
        """§5, on `iteration`'s student draw. The gradient reaches θ only through x̂0 of the one
        student step at the draw's k; `fake_score` is ψ after its update of this iteration."""
        draw = iteration.student_draw
        if draw is None:   # the rollout stopped where the fake-score draw needed it
            raise ValueError("this iteration was started for a fake-score update only "
                             "(TDM.start(student_update=False)): it has no student draw")
        state, _, _ = iteration.trajectory.at(draw.k)
        x0, eps = student(state, draw.t_g, self.student_condition(iteration.cond, iteration.num_steps))
        n = self.randn(x0.shape, x0.device)
        with torch.no_grad():
            x_t, _ = diffuse(self.path, x0.detach(), eps.detach(), draw.t_e, draw.t, n)
            x0_real, x0_fake = self.teacher_and_fake_score_x0(
                teacher, fake_score, x_t, draw.t, iteration.cond, iteration.uncond,
                self.fake_score_condition(iteration.cond, iteration.num_steps, draw.k))
        return self.student_objective(x0, x0_real, x0_fake)

    def draw_num_steps(self) -> int:
        """K of this iteration (§6): uniform over the unify set, the same on every process."""
        counts = self.step_counts
        if len(counts) == 1:
            return counts[0]
        shared_rng = self.rng.shared_rng if self.rng else None
        return counts[int(torch.randint(len(counts), (1,), generator=shared_rng))]

    def draw(self, num_steps: int, batch: int, device) -> tuple:
        """(fake-score draw, student draw) of (k, t_g, t_e, t) per sample on the grid of K
        (§3.1–3.3), made on the host and also returned there (`Draw.to` moves them). Both come
        before the rollout so that it knows how deep each sample must go; they are independent,
        as with the demo's fresh draw after the fake-score update. With share_step_draw the
        student draw reuses the fake-score draw's k (fresh t_e and t)."""
        rng = self.rng.draw_rng if self.rng else None
        grid, c = self.grids[num_steps], self.config
        fake_score_draw = sample_draw(grid, batch, "cpu", c.use_separate, c.use_randmid, rng)
        student_draw = sample_draw(grid, batch, "cpu", c.use_separate, c.use_randmid, rng,
                                   k=fake_score_draw.k if c.share_step_draw else None)
        return fake_score_draw, student_draw

    def student_condition(self, cond: dict, num_steps: int) -> dict:
        """The student's condition: the prompt, plus K under TDM-unify (§6)."""
        if not self.config.unify_steps:
            return cond
        batch = next(iter(cond.values())).shape[0]
        device = next(iter(cond.values())).device
        return {**cond, NUM_STEPS: torch.full((batch,), num_steps, dtype=torch.long, device=device)}

    def fake_score_condition(self, cond: dict, num_steps: int, k: torch.Tensor) -> dict:
        """The fake score's condition: the student's, plus the step index k with
        fake_step_condition (mode 2: the steps' noise intervals overlap)."""
        cond = self.student_condition(cond, num_steps)
        return {**cond, STEP_INDEX: k} if self.config.fake_step_condition else cond

    def rollout(self, student: DenoiserFn, noise: torch.Tensor, cond: dict,
                depth: Optional[torch.Tensor] = None, num_steps: Optional[int] = None) -> Rollout:
        """The student's K-step trajectory (default K: the deepest grid)."""
        K = num_steps or self.step_counts[-1]
        return rollout(student, noise, self.student_condition(cond, K), self.grids[K], self.path, depth)

    def randn(self, shape, device) -> torch.Tensor:
        if self.rng is None:
            return torch.randn(shape, device=device)
        return self.rng.randn(shape, device)

    @torch.no_grad()
    def teacher_x0(self, teacher: DenoiserFn, x_t, t, cond: dict, uncond: dict) -> torch.Tensor:
        """CFG teacher prediction (§5); both branches in one batched forward, one if cfg == 1.
        A guidance-embedded teacher (§5.1) is called once, with cfg as its guidance input."""
        conds = self.teacher_conditions(x_t, cond, uncond)
        if len(conds) == 1:
            return teacher(x_t, t, conds[0])[0]
        x0 = teacher(torch.cat([x_t] * len(conds)), torch.cat([t] * len(conds)), cat_conditions(*conds))[0]
        return self.guided(x0.chunk(len(conds)))

    @torch.no_grad()
    def teacher_and_fake_score_x0(self, teacher: DenoiserFn, fake_score: DenoiserFn, x_t, t,
                                  cond: dict, uncond: dict, fake_score_cond: dict) -> tuple:
        """(CFG teacher x̂0, fake-score x̂0) at the same x_t: one forward where both are roles of
        one network (LoRA: the teacher's rows without adapters, the fake score's with its own,
        tdm.networks.joint_call), else one call each."""
        from .networks import joint_call

        conds = self.teacher_conditions(x_t, cond, uncond)
        calls = [(teacher, c) for c in conds] + [(fake_score, fake_score_cond)]
        outputs = joint_call(calls, x_t, t)
        if outputs is None:
            return (self.teacher_x0(teacher, x_t, t, cond, uncond),
                    fake_score(x_t, t, fake_score_cond)[0])
        return self.guided([x0 for x0, _ in outputs[:-1]]), outputs[-1][0]

    def teacher_conditions(self, x_t, cond: dict, uncond: dict) -> list:
        """The teacher's conditions at x_t: (prompt, empty prompt) for CFG, one for cfg == 1; a
        guidance-embedded teacher (§5.1) takes cfg as its guidance input."""
        if self.guidance_embedding:
            guidance = torch.full((x_t.shape[0],), self.config.cfg, device=x_t.device)
            return [{**cond, GUIDANCE: guidance}]
        return [cond] if self.config.cfg == 1.0 else [cond, uncond]

    def guided(self, x0s: list) -> torch.Tensor:
        """The teacher's x̂0 from its predictions under `teacher_conditions` (§5)."""
        if len(x0s) == 1:
            return x0s[0]
        return classifier_free_guidance(x0s[0], x0s[1], self.config.cfg)
