"""Checkpoint folders `checkpoint-N/` written by accelerate: lookup and rotation."""
from __future__ import annotations

import os
import re
import shutil
from typing import List, Optional

import torch
from safetensors.torch import load_file, save_file

PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> List[str]:
    """Complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := PATTERN.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_step(path: str) -> int:
    return int(PATTERN.match(os.path.basename(os.path.normpath(path))).group(1))


def rotate_checkpoints(output_dir: str, total_limit: Optional[int], keep_room_for: int = 1) -> None:
    """Delete the oldest checkpoints so that `keep_room_for` new ones fit within the limit."""
    if not total_limit:
        return
    found = list_checkpoints(output_dir)
    excess = len(found) + keep_room_for - total_limit
    for path in found[:max(excess, 0)]:
        shutil.rmtree(path)


def trainable_state_dict(model: torch.nn.Module) -> dict:
    """Only what trains: LoRA weights in lora mode, every weight in full mode."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: torch.nn.Module, path: str) -> None:
    save_file(trainable_state_dict(model), path)


def load_trainable(model: torch.nn.Module, path: str) -> None:
    state = load_file(path)
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise RuntimeError(f"{path} does not match the model (missing {missing}, unexpected {extra})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
