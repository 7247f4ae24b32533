"""Exponential moving average of the student's trainable weights (--use_ema).

    θ_ema ← θ                                   while step < ema_start_step
    θ_ema ← decay · θ_ema + (1 − decay) · θ     afterwards

applied after every optimisation step, whether or not the student's update was applied (a
skipped update leaves θ as it was). The averages are fp32, one per trainable tensor of the
student (its LoRA adapter and step tables in lora mode, every weight in full mode); they are
saved in checkpoints, used for validation samples and, with --export_ema, exported instead of θ.
"""
from __future__ import annotations

import contextlib
from typing import List

import torch


class StudentEMA:
    def __init__(self, params: List[torch.nn.Parameter], decay: float, start_step: int = 0):
        self.params = list(params)
        self.decay = decay
        self.start_step = start_step
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimisation step `step` (1, 2, …): copy before `start_step`, average after."""
        current = [p.detach().float() for p in self.params]
        if step < self.start_step:
            torch._foreach_copy_(self.shadow, current)
        else:
            torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self):
        """The student's weights replaced by their averages inside the block, restored after."""
        saved = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            for p, s in zip(self.params, saved):
                p.copy_(s)

    def state_dict(self) -> dict:
        """Flat name → tensor (what a safetensors file holds)."""
        return {f"shadow.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if len(state) != len(self.shadow):
            raise RuntimeError(f"EMA state has {len(state)} tensors, the student {len(self.shadow)}")
        for i, s in enumerate(self.shadow):
            s.copy_(state[f"shadow.{i}"])
