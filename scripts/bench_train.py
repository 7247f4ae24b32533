#!/usr/bin/env python
"""Benchmark one TDM training iteration: forward rows and backward passes per network (counted
by hooks on the networks), seconds per iteration and peak memory, for lora and full modes.

    python scripts/bench_train.py                       # tiny PixArt-shaped model, CPU
    python scripts/bench_train.py --size medium         # ~60 M-parameter PixArt-shaped transformer
    python scripts/bench_train.py --size full --batch 4 --mixed_precision bf16 --gradient_checkpointing
                                                        # the real PixArt-XL-2 architecture (GPU)

Each configuration runs in a fresh process (peak memory is per process) through the same
`train_tdm.build` and `train_tdm.tdm_iteration` as training. One JSON line per configuration on
stdout; with --markdown FILE, a table for docs/benchmarks.md.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESOLUTION = {"tiny": 32, "medium": 64, "full": 512}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(RESOLUTION), default="tiny")
    p.add_argument("--full_size", action="store_true", help="Same as --size full.")
    p.add_argument("--train_mode", choices=["lora", "full", "both"], default="both")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iterations", type=int, default=10, help="Timed iterations (median reported).")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mixed_precision", default="no")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--extra", default="", help="More train_tdm.py flags, e.g. '--full_rollout'.")
    p.add_argument("--markdown", default=None, help="Append a README table to this file.")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.full_size:
        args.size = "full"
    return args


def model_folder(size: str) -> str:
    from tdm.tiny import build_tiny_pixart

    folder = os.path.join(tempfile.gettempdir(), "tdm-bench", f"pixart-{size}")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        build_tiny_pixart(folder, size=size)
    return folder


class Counters:
    """Forward rows by role (hooks on the networks' forward) and backward passes by role
    (hooks on one trainable tensor of each role)."""

    def __init__(self, networks):
        self.rows, self.backwards = Counter(), Counter()
        self.networks = networks
        for module in networks.modules():
            module.register_forward_pre_hook(self._forward, with_kwargs=True)
        for role, params in (("student", networks.student_params), ("fake_score", networks.fake_score_params)):
            params[0].register_hook(lambda grad, role=role: self._backward(role))

    @staticmethod
    def role(module) -> str:
        """Whose call is running on `module` (its role scope; a call without one is the
        teacher's in full mode)."""
        from tdm.roles import TEACHER, role_scope

        return role_scope(module).current[0] or TEACHER

    def _forward(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.rows[self.role(module)] += x.shape[0]

    def _backward(self, role):
        self.backwards[role] += 1

    def reset(self):
        self.rows.clear()
        self.backwards.clear()


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> dict:
    import torch

    import train_tdm
    from tdm.config import parse_args

    import accelerate  # noqa: F401  (imported before the baseline, which should hold no model)
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    folder = model_folder(args.size)
    baseline = current_rss_mb()   # the interpreter, torch and the libraries, before any model
    out = tempfile.mkdtemp(prefix="tdm-bench-")
    flags = ["--pretrained_model_name_or_path", folder, "--output_dir", out, "--train_mode",
             args.train_mode, "--resolution", str(RESOLUTION[args.size]), "--train_batch_size",
             str(args.batch), "--mixed_precision", args.mixed_precision, "--report_to", "none",
             "--checkpointing_steps", "0", "--validation_steps", "0", "--seed", "0",
             "--cfg", "4.5", "--total_steps", "900", "--use_huber", "--use_separate",
             *(["--gradient_checkpointing"] if args.gradient_checkpointing else []), *args.extra.split()]
    targs = parse_args(flags)
    run = train_tdm.build(targs)
    counters = Counters(run.networks)
    prompts = iter(run.dataloader)
    times = []
    for i in range(args.warmup + args.iterations):
        if i == args.warmup:
            counters.reset()
        try:
            batch = next(prompts)
        except StopIteration:
            prompts = iter(run.dataloader)
            batch = next(prompts)
        if run.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_tdm.tdm_iteration(run.accelerator, run.tdm, run.networks, run.encode(batch), run.uncond,
                                run.latent_shape, run.fake_score_optimizer, run.student_optimizer,
                                run.lr_scheduler, targs.max_grad_norm)
        if run.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    per_sample = {role: counters.rows[role] / (args.iterations * args.batch)
                  for role in ("teacher", "student", "fake_score")}
    device = run.accelerator.device
    params = {m.__class__.__name__: sum(p.numel() for p in m.parameters()) for m in run.networks.modules()}
    return {
        "size": args.size, "train_mode": args.train_mode, "batch": args.batch,
        "resolution": RESOLUTION[args.size], "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing, "extra": args.extra,
        "denoiser_params_M": round(max(params.values()) / 1e6, 1),
        "forward_rows_per_sample": {k: round(v, 3) for k, v in per_sample.items()},
        "forward_rows_per_sample_total": round(sum(per_sample.values()), 3),
        "backward_passes_per_iteration": {k: counters.backwards[k] / args.iterations
                                          for k in ("student", "fake_score")},
        "seconds_per_iteration": round(statistics.median(times), 4),
        "peak_memory_MiB": round(peak_memory_mb(device), 1),
        "baseline_rss_MiB": round(baseline, 1) if device.type != "cuda" else 0.0,
        "memory_kind": "cuda max allocated" if device.type == "cuda" else "peak RSS",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }


def markdown(rows, command: str) -> str:
    lines = [f"Measured {date.today().isoformat()} on {rows[0]['device']} "
             f"({os.cpu_count()} CPU cores visible), `{command}`:", "",
             "| size | mode | batch | fwd rows/sample (teacher + student + fake) | backward/iter | s/iter | peak memory | above baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["forward_rows_per_sample"]
        b = r["backward_passes_per_iteration"]
        lines.append(f"| {r['size']} ({r['denoiser_params_M']} M) | {r['train_mode']}{' ' + r['extra'] if r['extra'] else ''} "
                     f"| {r['batch']} | {r['forward_rows_per_sample_total']:.2f} = {f['teacher']:.2f} + "
                     f"{f['student']:.2f} + {f['fake_score']:.2f} | {b['student'] + b['fake_score']:.0f} "
                     f"| {r['seconds_per_iteration']:.3f} | {r['peak_memory_MiB']:.0f} MiB ({r['memory_kind']}) "
                     f"| {r['peak_memory_MiB'] - r['baseline_rss_MiB']:.0f} MiB |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse(argv)
    if args.worker:
        print("BENCH " + json.dumps(worker(args)), flush=True)
        return 0
    modes = ["lora", "full"] if args.train_mode == "both" else [args.train_mode]
    rows = []
    for mode in modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--size", args.size, "--train_mode",
               mode, "--batch", str(args.batch), "--iterations", str(args.iterations), "--warmup",
               str(args.warmup), "--mixed_precision", args.mixed_precision, f"--extra={args.extra}"]
        if args.gradient_checkpointing:
            cmd.append("--gradient_checkpointing")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("BENCH ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            return proc.returncode or 1
        rows.append(json.loads(lines[-1][6:]))
        print(json.dumps(rows[-1]), flush=True)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(markdown(rows, "python scripts/bench_train.py " + " ".join(argv or sys.argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
