"""Conditions are dicts of batch-first tensors, so the loop can batch them without knowing
which backbone made them (prompt embeddings, masks, pooled embeddings, time ids ...)."""
from __future__ import annotations

import torch


def cat_conditions(*conds: dict) -> dict:
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def expand_condition(cond: dict, batch: int) -> dict:
    """Repeat a batch-1 condition (e.g. the empty prompt) to `batch` rows without copying."""
    return {key: value.expand(batch, *value.shape[1:]) for key, value in cond.items()}


def condition_to(cond: dict, device=None, dtype=None) -> dict:
    """Move a condition; only floating tensors change dtype (masks and ids keep theirs)."""
    return {key: value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            for key, value in cond.items()}


def select_condition(cond: dict, index) -> dict:
    return {key: value[index] for key, value in cond.items()}
