"""Training that survives a cluster, kept out of the method's wiring in train_tdm.py: what a
checkpoint holds and how a run resumes from one, the stop signal of a preemption, the policy for
non-finite updates, the ranks' agreement at the end, and the one line for a lost peer.

train_tdm.py calls one entry per event of its loop: `Survival.count_nonfinite` after each
iteration, `after_step` once the step is logged, `stop_requested` last in the step, and
`student_checksums` before the export. Nothing here changes what a step computes.
"""
from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys

import torch
from accelerate.utils import OPTIMIZER_NAME, RNG_STATE_NAME, SCHEDULER_NAME, gather_object

from .checkpoint import checkpointed_names, load_tensors, save_atomically, save_tensors
from .checks import UsageError

logger = logging.getLogger("tdm")


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite updates; the last good state is checkpointed."""


# -- what a checkpoint holds, and resuming from one ------------------------------------------
def state_file_name(name: str, per_process: bool, process_index: int) -> str:
    return f"{name}_{process_index}.safetensors" if per_process else f"{name}.safetensors"


def checkpoint_files(args, num_processes: int, sharded: bool) -> list:
    """The files every checkpoint of this run holds (checked where one has no manifest): the
    states of register_checkpoint_hooks, the networks' files, and accelerate's optimiser, scheduler
    and RNG files (under FSDP accelerate writes the networks and optimisers in its own layout)."""
    states = {"training_rng": True, **({"ema": False} if args.use_ema else {})}   # as build() registers
    files = [state_file_name(name, per_process, rank) for name, per_process in states.items()
             for rank in range(num_processes if per_process else 1)]
    files += [f"{RNG_STATE_NAME}_{rank}.pkl" for rank in range(num_processes)] + [f"{SCHEDULER_NAME}.bin"]
    if not sharded:
        files += [f"{name}.safetensors" for name in checkpointed_names(args.train_mode)]
        files += [f"{OPTIMIZER_NAME}.bin", f"{OPTIMIZER_NAME}_1.bin"]
    return files


def register_checkpoint_hooks(accelerator, networks, states: dict):
    """Checkpoints hold only what trains (LoRA layers, or every weight in full mode), written
    by the networks themselves, and `states` (name → object with tensor state_dicts: the
    training RNG, one file per process, and the EMA), as safetensors: resuming unpickles nothing
    of ours. accelerate adds optimisers, scheduler and its RNG states."""

    def state_file(folder, name, per_process):
        return os.path.join(folder, state_file_name(name, per_process, accelerator.process_index))

    def save_hook(models, weights, output_dir):
        for name, (obj, per_process) in states.items():
            if per_process or accelerator.is_main_process:
                save_tensors(obj.state_dict(), state_file(output_dir, name, per_process))
        if networks.sharded:   # FSDP/DeepSpeed: accelerate gathers and writes the shards itself
            return
        if accelerator.is_main_process:
            networks.save(output_dir)
        weights.clear()   # nothing else: the default would store the frozen base too

    def load_hook(models, input_dir):
        for name, (obj, per_process) in states.items():
            path = state_file(input_dir, name, per_process)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing (the checkpoint was written by fewer "
                                        "processes, or by a version that pickled this state)")
            obj.load_state_dict(load_tensors(path))
        if networks.sharded:
            return
        networks.load(input_dir)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_checkpoint(accelerator, path: str, requested: str) -> None:
    """Load the verified checkpoint (tdm.run_folder.plan_start chose it); one that does not load
    into this run (another model, a file accelerate cannot read) is refused in one line."""
    try:
        accelerator.load_state(path)
    except Exception as error:   # a file accelerate or safetensors cannot read, another model
        raise UsageError(f"--resume_from_checkpoint {requested}: cannot load {path}: "
                         f"{type(error).__name__}: {first_line(error)}") from None


def log_resume(args, resumed_from, step: int) -> None:
    if resumed_from is not None:
        logger.info("resumed from %s at step %d", resumed_from, step)
    elif args.resume_from_checkpoint:
        logger.info("no checkpoint in %s; starting from scratch", args.output_dir)


def resume_position(step: int, batches_per_epoch: int, accumulation: int) -> tuple:
    """Where optimiser step `step` is in the data: its epoch and the batches of that epoch to skip
    (the sampler is seeded per epoch, so skipping them gives the batches a straight run saw)."""
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    return step // steps_per_epoch, (step % steps_per_epoch) * accumulation


def save_checkpoint(accelerator, args, global_step) -> str:
    path = save_atomically(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
    logger.info("saved %s", path)
    return path


# -- agreement between processes -------------------------------------------------------------
def all_finite(accelerator, values: torch.Tensor) -> bool:
    """Whether every value is finite on every process (so that all ranks skip together): one
    reduction, one host sync."""
    flag = torch.isfinite(values).all().float().reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "min")
    return bool(flag.item())


class StopSignal:
    """SIGTERM/SIGINT ask the loop to finish its step, save and exit 0 (cluster preemption)."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """Agreed over processes: one rank signalled is enough for all to stop at this step."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, "max")
        return bool(flag.item())


def student_checksums(accelerator, networks, full_state) -> list:
    """The student's sum of weights on every rank (they must agree: a cheap check of data
    parallelism), or, sharded, of the whole student gathered on rank 0 (the others hold shards)."""
    if full_state is not None:
        return [float(sum(v.double().sum() for v in full_state.values()))]
    value = float(sum(p.detach().double().sum() for p in networks.student_params))
    return gather_object([value]) if accelerator.num_processes > 1 else [value]


# -- the loop's events -------------------------------------------------------------------------
class Survival:
    """The stop signal (installed here) and the non-finite policy of one run's loop."""

    def __init__(self, accelerator, args):
        self.accelerator, self.args = accelerator, args
        self.stop = StopSignal()
        self.nonfinite_total = self.nonfinite_in_a_row = 0

    def count_nonfinite(self, skipped: int) -> int:
        """Count the updates this iteration skipped; returns the run's total, for its log."""
        self.nonfinite_total += skipped
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        return self.nonfinite_total

    def after_step(self, global_step: int, progress) -> None:
        """--max_nonfinite iterations in a row skipped: save the last good state and stop
        (TrainingStopped); else the checkpoint of --checkpointing_steps when one is due."""
        args = self.args
        if self.nonfinite_in_a_row >= args.max_nonfinite:
            progress.close()
            path = save_checkpoint(self.accelerator, args, global_step)
            raise TrainingStopped(f"{self.nonfinite_in_a_row} consecutive iterations with non-finite "
                                  f"losses or gradients (--max_nonfinite {args.max_nonfinite}); "
                                  f"the last good state is in {path}")
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            save_checkpoint(self.accelerator, args, global_step)

    def stop_requested(self, global_step: int, progress) -> bool:
        """A stop signal on any rank: save, say how to continue, end the run (the caller returns)."""
        if not self.stop.requested(self.accelerator):
            return False
        progress.close()
        path = save_checkpoint(self.accelerator, self.args, global_step)
        logger.info("%s received: saved %s at step %d; continue with "
                    "--resume_from_checkpoint latest", self.stop.received or "stop signal",
                    path, global_step)
        self.accelerator.end_training()
        return True


# -- a lost peer -------------------------------------------------------------------------------
def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process is gone or stalled
    (gloo: connection reset or closed, or --ddp_timeout expired; NCCL errors that reach Python:
    by default NCCL's watchdog ends the process itself after --ddp_timeout, with its own message)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if isinstance(error, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed",
                                      "Timed out", "timed out"))


def lost_peer_message(error: BaseException) -> str:
    """The one line for a process whose collective failed (lost_peer): what, and how to go on."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    line = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error)).split(". ")[0]   # gloo: no source path
    return (f"error: process {rank} of {world} lost contact with the others in a collective "
            f"operation ({line}): another process died or hung (--ddp_timeout). "
            "Restart every process with --resume_from_checkpoint latest")


# -- the end of a process -----------------------------------------------------------------------
def exit_process(code: int):
    """End train_tdm.py's process with `code`. A process of a multi-process launch (WORLD_SIZE > 1)
    ends without the C++ teardown at interpreter exit: there, objects that torch.distributed leaves
    behind can abort the process ('terminate called without an active exception', SIGABRT), which
    turned a finished or cleanly stopped rank into a crash in about one run in five on 2 CPU
    ranks. Everything the run writes is closed by then; logs and streams are flushed here."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
