"""What a run folder holds, and what a start may do with it: resume one of its checkpoints, start
in it when it holds no other run, or replace another run only when asked (--overwrite_output_dir).
Decided before anything is written, so a refused start leaves every byte of the folder as it was.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import List, Optional, Sequence, Tuple

from .checkpoint import (TMP_SUFFIX, DamagedCheckpoint, NoWholeCheckpoint, checkpoint_step,
                         checkpoint_to_resume, list_checkpoints, remove_incomplete)
from .checks import UsageError
from .config import save_resolved_config

logger = logging.getLogger("tdm")

WAYS_OUT = ("continue it with --resume_from_checkpoint latest, or start a new run with another "
            "--output_dir or with --overwrite_output_dir")


def exported_student(output_dir: str) -> Optional[str]:
    """The student a finished run exported there (a LoRA file or a model folder), if any."""
    from .sampling import resolve_weights

    try:
        found = resolve_weights(output_dir)
    except FileNotFoundError:
        return None
    except ValueError:   # a model folder with pickle weights only: still another run's export
        return output_dir
    return found[1] if found else None


def previous_run(output_dir: str) -> List[str]:
    """The checkpoints and the export of a run in `output_dir` (names), empty if there are none."""
    found = [os.path.basename(path) for path in list_checkpoints(output_dir)]
    export = exported_student(output_dir) if os.path.isdir(output_dir) else None
    if export is not None:
        found.append(os.path.relpath(export, output_dir))
    return found


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def plan_start(output_dir: str, resume_from: Optional[str], overwrite: bool,
               expected: Sequence[str] = ()) -> Tuple[Optional[str], int]:
    """(checkpoint to resume from, its step), or (None, 0) for a new run; UsageError, one line,
    where this start would damage what the folder holds. `expected`: the files every checkpoint
    of this run has (checked where a checkpoint has no manifest). Reads only."""
    if resume_from:
        path = _checkpoint(output_dir, resume_from, expected)
        if path is not None:
            if overwrite and _inside(path, output_dir):
                raise UsageError(f"--overwrite_output_dir would delete {path}, the checkpoint to "
                                 "resume from; drop one of the two flags")
            others = previous_run(output_dir)
            if others and not overwrite and not _inside(path, output_dir):
                raise UsageError(f"--output_dir {output_dir} holds another run ({', '.join(others[:4])}) "
                                 f"and {path} is not one of its checkpoints; resume into a new "
                                 "--output_dir, or replace that run with --overwrite_output_dir")
            try:
                return path, checkpoint_step(path)
            except ValueError as error:
                raise UsageError(f"--resume_from_checkpoint {resume_from}: {error}") from None
    others = previous_run(output_dir)
    if others and not overwrite:
        if resume_from == "latest":
            raise UsageError(f"--resume_from_checkpoint latest: {output_dir} holds no checkpoint, "
                             f"only another run's export ({', '.join(others)}); start a new run "
                             "with another --output_dir or with --overwrite_output_dir")
        raise UsageError(f"--output_dir {output_dir} holds another run ({', '.join(others[:4])}"
                         f"{', …' if len(others) > 4 else ''}): {WAYS_OUT}")
    return None, 0


def _checkpoint(output_dir: str, requested: str, expected: Sequence[str]) -> Optional[str]:
    try:
        return checkpoint_to_resume(output_dir, requested, expected)
    except NoWholeCheckpoint as error:
        raise UsageError(f"--resume_from_checkpoint latest: {error}; resume from a repaired one by "
                         "path, or start a new run with another --output_dir or with "
                         "--overwrite_output_dir") from None
    except DamagedCheckpoint as error:
        raise UsageError(f"--resume_from_checkpoint: damaged checkpoint: {error}") from None


def run_outputs(output_dir: str, logging_dir: str) -> List[str]:
    """Every path a run writes into its folder (checkpoints, export, samples, logs, config, model
    card), that exists; the prompt-embedding cache is kept (its key names what it holds)."""
    from .kohya import KOHYA_WEIGHT_NAME
    from .step_condition import STEP_EMBEDDING_NAME

    paths = list_checkpoints(output_dir) + [
        os.path.join(output_dir, name) for name in os.listdir(output_dir) if name.endswith(TMP_SUFFIX)]
    export = exported_student(output_dir)
    if export is not None and export != output_dir:
        paths.append(export)
    paths += [os.path.join(output_dir, name) for name in (
        KOHYA_WEIGHT_NAME, STEP_EMBEDDING_NAME, "samples", logging_dir, "config.yaml",
        "train_log.jsonl", "README.md")]
    # only inside the folder (an absolute --logging_dir elsewhere is not this folder's)
    return [path for path in dict.fromkeys(paths) if os.path.lexists(path) and _inside(path, output_dir)]


def clear_previous_run(output_dir: str, logging_dir: str) -> List[str]:
    """--overwrite_output_dir, once every check has passed: delete the other run's outputs."""
    removed = run_outputs(output_dir, logging_dir) if os.path.isdir(output_dir) else []
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed


def start_in_folder(accelerator, args) -> None:
    """The main process clears a replaced run (--overwrite_output_dir), removes a save cut short,
    writes config.yaml and starts the trackers; no rank writes into the folder before that."""
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            removed = clear_previous_run(args.output_dir, args.logging_dir)
            if removed:
                logger.info("--overwrite_output_dir: deleted the previous run's %s",
                            ", ".join(os.path.relpath(path, args.output_dir) for path in removed))
        os.makedirs(args.output_dir, exist_ok=True)
        remove_incomplete(args.output_dir)
        save_resolved_config(args, os.path.join(args.output_dir, "config.yaml"))
        tracker_config = {k: v for k, v in vars(args).items()
                          if isinstance(v, (int, float, str, bool)) and not k.startswith("_")}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)
    accelerator.wait_for_everyone()
