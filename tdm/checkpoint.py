"""Checkpoint folders `checkpoint-N/` written by accelerate: lookup and rotation."""
from __future__ import annotations

import os
import re
import shutil
import time
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


def rotate_checkpoints(output_dir: str, total_limit: Optional[int]) -> None:
    """Keep the `total_limit` newest complete checkpoints. Runs after a save has completed, so
    the newest complete checkpoint is never among those deleted."""
    if not total_limit:
        return
    found = list_checkpoints(output_dir)
    for path in found[:max(len(found) - max(total_limit, 1), 0)]:
        shutil.rmtree(path)


TMP_SUFFIX = ".incomplete"


def remove_incomplete(output_dir: str) -> None:
    """Folders of saves that were killed half-way; never picked by `latest`."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.endswith(TMP_SUFFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def save_atomically(accelerator, output_dir: str, step: int, total_limit: Optional[int]) -> str:
    """accelerate.save_state into `checkpoint-N.incomplete`, renamed to `checkpoint-N` once every
    process has written its part: a checkpoint folder is either complete or absent."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + TMP_SUFFIX
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    time.sleep(float(os.environ.get("TDM_TEST_SAVE_DELAY", 0)))   # lets a test kill a save mid-way
    if accelerator.is_main_process:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


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
