"""Checkpoint folders `checkpoint-N/` written by accelerate: lookup, rotation, a manifest that
proves a folder is the one that was written and records its step, and the training state this
project adds to it.

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
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from .roles import FAKE_SCORE, STUDENT

PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> List[str]:
    """Checkpoint folders (complete saves, whole or damaged since), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := PATTERN.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_step(path: str) -> int:
    """The step a checkpoint was saved at, from its manifest; checkpoints written before manifests
    recorded it (no manifest, or one without a step): from the folder name `checkpoint-N`."""
    manifest = _read_manifest(path)
    if manifest is not None and isinstance(manifest.get("step"), int):
        return manifest["step"]
    match = PATTERN.match(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise ValueError(f"{path}: its step is not recorded (a checkpoint of an older version) "
                         "and the folder is not named checkpoint-N; rename it checkpoint-<its step>")
    return int(match.group(1))


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


def write_manifest(folder: str, step: int) -> None:
    """The step, and size and SHA-256 of every file of a finished save (hashed in threads:
    hashlib releases the GIL)."""
    files = _files(folder)
    with ThreadPoolExecutor(max_workers=min(8, len(files) or 1)) as pool:
        digests = list(pool.map(lambda name: _sha256(os.path.join(folder, name)), files))
    entries = {name: {"bytes": os.path.getsize(os.path.join(folder, name)), "sha256": digest}
               for name, digest in zip(files, digests)}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"step": step, "files": entries}, f, indent=1)


def _read_manifest(folder: str) -> Optional[dict]:
    """The manifest, None where there is none; DamagedCheckpoint where it cannot be read."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
        return manifest
    except (OSError, ValueError, AttributeError):
        raise DamagedCheckpoint(f"{path}: unreadable manifest") from None


def verify_checkpoint(folder: str, expected: Sequence[str] = ()) -> None:
    """Raise DamagedCheckpoint unless the checkpoint is whole: with a manifest, every file it lists
    is there and unchanged; without one (older versions, copies by hand), every `expected` file
    is there and every file reads as what it claims to be (`check_file_structure`)."""
    manifest = _read_manifest(folder)
    if manifest is None:
        for name in expected:
            if not os.path.isfile(os.path.join(folder, name)):
                raise DamagedCheckpoint(f"{os.path.join(folder, name)}: missing")
        for name in _files(folder):
            check_file_structure(os.path.join(folder, name))
        return
    for name, entry in manifest["files"].items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise DamagedCheckpoint(f"{file}: missing")
        size = os.path.getsize(file)
        if size != entry["bytes"]:
            raise DamagedCheckpoint(f"{file}: {size} bytes, {entry['bytes']} were written (truncated?)")
        if _sha256(file) != entry["sha256"]:
            raise DamagedCheckpoint(f"{file}: contents differ from what was written")


# bytes per element of the safetensors dtypes
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_file_structure(path: str) -> None:
    """What a file without a manifest can prove: a .safetensors file's header parses and its
    tensors fill the file exactly; a torch file (.bin, .pkl) loads with the weights-only loader
    accelerate resumes with (so nothing runs). Raises DamagedCheckpoint naming the file."""
    if path.endswith(".safetensors"):
        _check_safetensors(path)
    elif path.endswith((".bin", ".pkl", ".pt")):
        from accelerate.utils import load   # accelerate's weights-only torch.load (numpy allowed)

        try:
            load(path, map_location="cpu", mmap=True)
        except Exception as error:   # a truncated zip, a pickle that is not weights only, …
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise DamagedCheckpoint(f"{path}: cannot load it weights-only ({type(error).__name__}: "
                                    f"{first_line})") from None


def _check_safetensors(path: str) -> None:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_bytes = int.from_bytes(f.read(8), "little")
            if size < 8 or header_bytes > size - 8:
                raise ValueError(f"a header of {header_bytes} bytes in {size}")
            header = json.loads(f.read(header_bytes))
        tensors = [v for k, v in header.items() if k != "__metadata__"]
        end = max((t["data_offsets"][1] for t in tensors), default=0)
        for t in tensors:
            begin, stop = t["data_offsets"]
            numel = int(torch.tensor(t["shape"], dtype=torch.int64).prod()) if t["shape"] else 1
            if t["dtype"] in DTYPE_BYTES and stop - begin != numel * DTYPE_BYTES[t["dtype"]]:
                raise ValueError(f"a tensor of shape {t['shape']} in {stop - begin} bytes")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DamagedCheckpoint(f"{path}: not a whole safetensors file ({error})") from None
    if 8 + header_bytes + end != size:
        raise DamagedCheckpoint(f"{path}: {size} bytes, its header describes "
                                f"{8 + header_bytes + end} (truncated?)")


class NoWholeCheckpoint(DamagedCheckpoint):
    """`latest` found checkpoints, and every one is damaged."""


def checkpoint_to_resume(output_dir: str, requested: str, expected: Sequence[str] = ()) -> Optional[str]:
    """The folder to resume from. An explicit path must verify (DamagedCheckpoint otherwise);
    'latest' is the newest checkpoint that verifies, newer damaged ones skipped with a warning;
    None where there is no checkpoint at all; NoWholeCheckpoint, naming the damage, where every
    checkpoint is damaged (never a silent fresh start over them)."""
    if requested != "latest":
        verify_checkpoint(requested, expected)
        return requested
    damages = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path, expected)
        except DamagedCheckpoint as error:
            damages.append(str(error))
            continue
        for damage in damages:
            logger.warning("skipping damaged checkpoint: %s", damage)
        return path
    if damages:
        more = f"; and {len(damages) - 3} more" if len(damages) > 3 else ""
        raise NoWholeCheckpoint(f"no whole checkpoint in {output_dir}: {'; '.join(damages[:3])}{more}")
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
    if accelerator.is_main_process:
        write_manifest(tmp, step)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def checkpointed_names(train_mode: str) -> List[str]:
    """The files `Networks.save` writes into a checkpoint (NAME.safetensors), unsharded: the one
    base with both adapters (lora), or the student and the fake score (full, named by role)."""
    return ["lora"] if train_mode == "lora" else [STUDENT, FAKE_SCORE]


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
    for name, value in state.items():
        if value.shape != params[name].shape:
            raise RuntimeError(f"{path} does not match the model: {name} is {tuple(value.shape)} there, "
                               f"{tuple(params[name].shape)} in the model (another model or --lora_rank?)")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save_tensors(state: Dict[str, torch.Tensor], path: str) -> None:
    save_file({name: t.detach().cpu().contiguous() for name, t in state.items()}, path)


def load_tensors(path: str) -> Dict[str, torch.Tensor]:
    return load_file(path)
