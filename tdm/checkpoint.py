"""Checkpoint folders `checkpoint-N/` written by accelerate: lookup, rotation, a manifest that
proves a folder is the one that was written, and the training state this project adds to it.

Nothing here unpickles: the project's own state (networks, training RNG, EMA) is safetensors;
accelerate loads its own files (optimisers, scheduler, RNG) with torch's weights_only loader.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

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


MANIFEST = "manifest.json"
logger = logging.getLogger(__name__)


class DamagedCheckpoint(Exception):
    """A checkpoint folder whose files are not those that were written (one line: which and how)."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: str) -> List[str]:
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names if name != MANIFEST)


def write_manifest(folder: str) -> None:
    """Size and SHA-256 of every file of a finished save (hashed in threads: hashlib releases the GIL)."""
    files = _files(folder)
    with ThreadPoolExecutor(max_workers=min(8, len(files) or 1)) as pool:
        digests = list(pool.map(lambda name: _sha256(os.path.join(folder, name)), files))
    entries = {name: {"bytes": os.path.getsize(os.path.join(folder, name)), "sha256": digest}
               for name, digest in zip(files, digests)}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"files": entries}, f, indent=1)


def verify_checkpoint(folder: str) -> None:
    """Raise DamagedCheckpoint unless every file of the manifest is there, whole and unchanged.
    Checkpoints written before manifests existed pass unchecked."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            entries: Dict[str, dict] = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        raise DamagedCheckpoint(f"{path}: unreadable manifest") from None
    for name, entry in entries.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise DamagedCheckpoint(f"{file}: missing")
        size = os.path.getsize(file)
        if size != entry["bytes"]:
            raise DamagedCheckpoint(f"{file}: {size} bytes, {entry['bytes']} were written (truncated?)")
        if _sha256(file) != entry["sha256"]:
            raise DamagedCheckpoint(f"{file}: contents differ from what was written")


def checkpoint_to_resume(output_dir: str, requested: str) -> Optional[str]:
    """The folder to resume from. An explicit path must verify (DamagedCheckpoint otherwise);
    'latest' is the newest checkpoint that verifies, older ones taken with a warning."""
    if requested != "latest":
        verify_checkpoint(requested)
        return requested
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
            return path
        except DamagedCheckpoint as error:
            logger.warning("skipping damaged checkpoint: %s", error)
    return None


def save_atomically(accelerator, output_dir: str, step: int, total_limit: Optional[int]) -> str:
    """accelerate.save_state into `checkpoint-N.incomplete`, renamed to `checkpoint-N` once every
    process has written its part and the manifest is written: a checkpoint folder is either
    complete or absent, and a later change to its files is detected at resume."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + TMP_SUFFIX
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    time.sleep(float(os.environ.get("TDM_TEST_SAVE_DELAY", 0)))   # lets a test kill a save mid-way
    if accelerator.is_main_process:
        write_manifest(tmp)
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


def save_tensors(state: Dict[str, torch.Tensor], path: str) -> None:
    save_file({name: t.detach().cpu().contiguous() for name, t in state.items()}, path)


def load_tensors(path: str) -> Dict[str, torch.Tensor]:
    return load_file(path)
