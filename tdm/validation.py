"""Quality during training (docs/method.md §10): numbers that log_validation reports beside its
sample grid, so that a run drifting away from its teacher shows in the curves, not only at
evaluation.

Every family: the mean absolute difference between the student's K-step latents and the
teacher's DDIM latents from the same noise and prompts (the teacher's computed once, at the first
validation). A backbone that knows its data distribution (the 2-D toy) also scores the student's
samples against a held-out sample of the data (`Backbone.held_out_data`).
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Dict, Optional

import torch

from .conditions import cat_conditions, expand_condition
from .losses import classifier_free_guidance
from .trajectory import DenoiserFn, StepGrid, rollout


def mean_absolute_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean |a − b| over every element (docs/method.md §10): 0 for identical samples."""
    if a.shape != b.shape:
        raise ValueError(f"need samples of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a.double() - b.double()).abs().mean().item()


def guided(teacher: DenoiserFn, uncond: dict, cfg: float, guidance: Optional[str] = None) -> DenoiserFn:
    """The teacher as DDIM samples it with guidance `cfg` (docs/method.md §5): classifier-free
    guidance on both x̂0 and ε̂, or, for a guidance-embedded teacher (§5.1), one call with cfg
    under the condition key `guidance`. `uncond`: the empty prompt's condition, one row."""
    if guidance is not None:
        return lambda x_t, t, cond: teacher(x_t, t, {**cond, guidance: torch.full(
            (x_t.shape[0],), cfg, device=x_t.device)})
    if cfg == 1.0:
        return teacher

    def denoise(x_t, t, cond):
        both = cat_conditions(cond, expand_condition(uncond, x_t.shape[0]))
        x0, eps = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
        return (classifier_free_guidance(x0_c, x0_u, cfg), classifier_free_guidance(eps_c, eps_u, cfg))

    return denoise


class ValidationMeasures:
    """The numbers of one validation: {name: value}, names starting with "val_".

    `teacher`: the guided teacher (`guided`); `teacher_steps`: its DDIM steps (0: no teacher
    reference); `held_out`: the backbone's held-out data (None for every diffusers family) —
    an object with `noise`, `cond` and `score(samples) -> {name: value}`. The teacher's samples
    are computed at the first call and kept (the validation noise and prompts are fixed)."""

    def __init__(self, teacher: DenoiserFn, path, teacher_steps: int, held_out=None):
        self.teacher, self.path, self.teacher_steps, self.held_out = teacher, path, teacher_steps, held_out
        self._teacher_samples: Dict[str, torch.Tensor] = {}

    def teacher_sample(self, name: str, noise: torch.Tensor, cond: dict) -> torch.Tensor:
        """The teacher's DDIM sample of input set `name` (computed once)."""
        if name not in self._teacher_samples:
            grid = StepGrid.uniform(self.teacher_steps, self.path.num_timesteps)
            with torch.no_grad():
                self._teacher_samples[name] = rollout(self.teacher, noise, cond, grid, self.path).sample
        return self._teacher_samples[name]

    @torch.no_grad()
    def __call__(self, latents: Dict[int, torch.Tensor], noise: torch.Tensor, cond: dict,
                 sample_student: Callable[[torch.Tensor, dict], torch.Tensor]) -> dict:
        """`latents`: {K: the student's K-step latents} on the validation `noise` and `cond`;
        `sample_student(noise, cond)`: the student's samples at its deepest K (for held-out data)."""
        measures = {}
        if self.teacher_steps:
            teacher = self.teacher_sample("prompts", noise, cond)
            for K, x in latents.items():
                measures[f"val_teacher_mad_k{K}"] = mean_absolute_difference(x, teacher)
        if self.held_out is not None:
            data = self.held_out
            measures.update({f"val_{k}": v for k, v in
                             data.score(sample_student(data.noise, data.cond)).items()})
            if self.teacher_steps:
                measures.update({f"val_teacher_{k}": v for k, v in
                                 data.score(self.teacher_sample("held_out", data.noise, data.cond)).items()})
        return measures


def validation_measures(args, backbone, tdm, teacher: DenoiserFn, uncond: dict) -> ValidationMeasures:
    """The measures of a run: its teacher guided as in training (--cfg, or the guidance input of
    §5.1), --validation_teacher_steps, and the backbone's held-out data if it has any."""
    from .method import GUIDANCE

    guidance = GUIDANCE if tdm.guidance_embedding else None
    return ValidationMeasures(guided(teacher, uncond, args.cfg, guidance), backbone.path,
                              args.validation_teacher_steps, backbone.held_out_data())


def log_measures(accelerator, log_path: str, step: int, measures: dict) -> None:
    """To the trackers, as a line {"step", val_...} of train_log.jsonl, and one log line."""
    if not measures:
        return
    accelerator.log(measures, step=step)
    with open(log_path, "a") as f:
        f.write(json.dumps({"step": step, **measures}) + "\n")
    logging.getLogger("tdm").info("step %d validation: %s", step, summary_line(measures))


def summary_line(measures: dict) -> str:
    """One line for the log: each measure, and the teacher's where it has one."""
    parts = []
    for name, value in measures.items():
        if name.startswith("val_teacher_") and f"val_{name[len('val_teacher_'):]}" in measures:
            continue   # printed beside the student's
        teacher = measures.get(f"val_teacher_{name[len('val_'):]}")
        parts.append(f"{name[len('val_'):]} {value:.4g}" + (f" (teacher {teacher:.4g})" if teacher is not None else ""))
    return ", ".join(parts)
