#!/usr/bin/env python
"""Benchmark one TDM training iteration: forward rows and backward passes per network (counted
by hooks on the networks), seconds per iteration, FLOPs (torch.utils.flop_counter), achieved
TFLOP/s and MFU against the device's dense bf16 peak, the GPU-busy fraction (CUDA), host syncs
per iteration by call site, and peak memory, for lora and full modes.

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

RESOLUTION = {"tiny": 32, "medium": 64, "deep": 32, "full": 512}
LORA_RANK = {"tiny": 4, "medium": 64, "deep": 16, "full": 64}   # at most the narrowest layer (tiny: 16)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(RESOLUTION), default="tiny")
    p.add_argument("--full_size", action="store_true", help="Same as --size full.")
    p.add_argument("--train_mode", choices=["lora", "full", "both"], default="both")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iterations", type=int, default=10, help="Timed iterations (median reported).")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--count_iterations", type=int, default=4,
                   help="Iterations whose device operations are counted (mean reported).")
    p.add_argument("--mixed_precision", default="no")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--extra", default="", help="More train_tdm.py flags, e.g. '--full_rollout'.")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="Dense bf16 peak of the device for MFU (default: from a table of known GPUs).")
    p.add_argument("--markdown", default=None, help="Append a markdown table to this file.")
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
    def row_roles(module, rows: int) -> list:
        """[(role, rows)] of the call running on `module` (its role scope): one role, or each
        role's row block of a call of several roles on one batch."""
        from tdm.roles import role_scope

        call = role_scope(module).current
        blocks = getattr(call, "rows", ())
        if blocks:
            return [(role, stop - start) for role, start, stop, _ in blocks]
        return [(call[0], rows)]

    enabled = True   # off after the counted iterations (the FLOP/sync passes are not counted)

    def _forward(self, module, args, kwargs):
        if not self.enabled:
            return
        x = args[0] if args else kwargs["hidden_states"]
        for role, rows in self.row_roles(module, x.shape[0]):
            self.rows[role] += rows

    def _backward(self, role):
        if not self.enabled:
            return
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


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}   # dense bf16, from the spec sheets
# Host-side by construction (tdm/method.py draws K from a CPU rng; the rollout picks rows from
# depths drawn on the host; the embedding cache reads files into host memory; torch.optim keeps
# non-fused step counters on the CPU): no wait for the device on a GPU, though on a CPU run every
# tensor is a host tensor.
HOST_SITES = {("method.py", "draw_num_steps"), ("trajectory.py", "rollout"),
              ("embedding_cache.py", "<genexpr>"), ("embedding_cache.py", "encode")}


def count_syncs(run_iteration, device) -> dict:
    """Device-to-host syncs of one iteration: every aten op that reads a value back to Python
    (`item`, `tolist`, `bool(tensor)`) or sizes its output from data (`nonzero`), by call site."""
    import traceback

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    sync_ops = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}
    calls = Counter()

    def record(op, tensor):
        stack = traceback.extract_stack()[:-2]
        frames = [f for f in stack if f.filename.startswith(ROOT) and "site-packages" not in f.filename
                  and f.name not in ("count_syncs", "record", "counted_tolist", "__torch_dispatch__")]
        in_optim = any(os.sep + os.path.join("torch", "optim") in f.filename for f in stack)
        site = (os.path.basename(frames[-1].filename), frames[-1].name) if frames else ("?", "?")
        host = (in_optim or site in HOST_SITES
                or (tensor is not None and tensor.device.type == "cpu" and device.type != "cpu"))
        calls[("host" if host else "device", op, *site)] += 1

    class Syncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in sync_ops:
                record(func.__name__.split(".")[0], next((a for a in args if isinstance(a, torch.Tensor)), None))
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist   # reads values without an aten op: counted here

    def counted_tolist(tensor):
        record("tolist", tensor)
        return tolist(tensor)

    torch.Tensor.tolist = counted_tolist
    try:
        with Syncs():
            run_iteration()
    finally:
        torch.Tensor.tolist = tolist
    device_calls = {f"{op} {file}:{fn}": n for (kind, op, file, fn), n in calls.items() if kind == "device"}
    host_calls = {f"{op} {file}:{fn}": n for (kind, op, file, fn), n in calls.items() if kind == "host"}
    return {"device_syncs": sum(device_calls.values()), "device_sync_sites": device_calls,
            "host_reads": sum(host_calls.values()), "host_read_sites": host_calls}


# Ops that launch no device kernel: allocations without a fill, and detach (views are found by
# their schema and by their output sharing an input's storage).
NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach"}


def launches(func, args, out) -> bool:
    """Whether an aten op launches device work: not a view (an output that aliases an input
    without writing it, by schema or by storage) and not an allocation or detach."""
    import torch
    from torch.utils._pytree import tree_leaves

    if func.__name__.split(".")[0] in NO_LAUNCH or func.is_view:
        return False
    if func._schema.is_mutable:
        return True
    inputs = {t.untyped_storage().data_ptr() for t in tree_leaves(args)
              if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes()}
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return not (outputs and all(t.untyped_storage().data_ptr() in inputs for t in outputs))


def count_launches(run_iteration, iterations: int) -> dict:
    """Device operations per iteration, counted outside the code: every aten op dispatched
    outside optimizer.step (CPU AdamW is a loop over tensors, CUDA's is fused), split into
    those that launch work (`launches`) and all of them, with the most frequent launches."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from torch.utils._python_dispatch import TorchDispatchMode

    launched, every, in_step = Counter(), [0], [False]

    class Launches(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not in_step[0]:
                every[0] += 1
                if launches(func, args, out):
                    launched[func.__name__] += 1
            return out

    hooks = [register_optimizer_step_pre_hook(lambda *a: in_step.__setitem__(0, True)),
             register_optimizer_step_post_hook(lambda *a: in_step.__setitem__(0, False))]
    try:
        with Launches():
            for _ in range(iterations):
                run_iteration()
    finally:
        for hook in hooks:
            hook.remove()
    return {"launch_ops_per_iteration": sum(launched.values()) / iterations,
            "all_ops_per_iteration": every[0] / iterations,
            "launch_ops_top": {op: n / iterations for op, n in launched.most_common(12)}}


def count_flops(run_iteration) -> float:
    """FLOPs executed by one iteration (torch.utils.flop_counter; recomputed blocks count)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run_iteration()
    return float(counter.get_total_flops())


def gpu_busy_fraction(run_iteration, iterations: int = 2) -> float:
    """Kernel time / wall time over a short profiler window (CUDA only)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            run_iteration()
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) * 1e6
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    return kernel_us / wall_us


def peak_tflops(args, device_name: str):
    if args.peak_tflops:
        return args.peak_tflops
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


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
             "--lora_rank", str(LORA_RANK[args.size]),
             *(["--gradient_checkpointing"] if args.gradient_checkpointing else []), *args.extra.split()]
    targs = parse_args(flags)
    run = train_tdm.build(targs)
    counters = Counters(run.networks)
    prompts = iter(run.dataloader)

    def next_batch():
        nonlocal prompts
        try:
            return next(prompts)
        except StopIteration:
            prompts = iter(run.dataloader)
            return next(prompts)

    def iteration(batch=None):
        batch = batch or next_batch()
        losses = train_tdm.tdm_iteration(run.accelerator, run.tdm, run.networks, run.encode(batch),
                                         run.uncond, run.latent_shape, run.fake_score_optimizer,
                                         run.student_optimizer, run.lr_scheduler, targs.max_grad_norm,
                                         targs.fake_score_updates)
        return torch.stack([losses[0].detach(), losses[1].detach()]).tolist()   # as training logs

    times = []
    for i in range(args.warmup + args.iterations):
        if i == args.warmup:
            counters.reset()
        if run.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        iteration()
        if run.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    timed_rows = sum(counters.rows.values())
    launch_counts = count_launches(iteration, args.count_iterations)
    counted_rows = sum(counters.rows.values()) - timed_rows
    counters.enabled = False
    device = run.accelerator.device
    batch = next_batch()   # the data loader's own host work stays outside the count
    syncs = count_syncs(lambda: iteration(batch), device)
    flops = count_flops(iteration)
    busy = gpu_busy_fraction(iteration) if device.type == "cuda" else None
    per_sample = {role: counters.rows[role] / ((args.iterations + args.count_iterations) * args.batch)
                  for role in ("teacher", "student", "fake_score")}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    seconds = statistics.median(times)
    achieved = flops / seconds / 1e12
    peak = peak_tflops(args, device_name)
    params = {m.__class__.__name__: sum(p.numel() for p in m.parameters()) for m in run.networks.modules()}
    return {
        "size": args.size, "train_mode": args.train_mode, "batch": args.batch,
        "resolution": RESOLUTION[args.size], "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing, "extra": args.extra,
        "denoiser_params_M": round(max(params.values()) / 1e6, 1),
        "forward_rows_per_sample": {k: round(v, 3) for k, v in per_sample.items()},
        "forward_rows_per_sample_total": round(sum(per_sample.values()), 3),
        "backward_passes_per_iteration": {k: counters.backwards[k] / (args.iterations + args.count_iterations)
                                          for k in ("student", "fake_score")},
        "seconds_per_iteration": round(seconds, 4),
        **launch_counts,
        "forward_rows_per_sample_counted": round(counted_rows / (args.count_iterations * args.batch), 3),
        "tflop_per_iteration": round(flops / 1e12, 4),
        "achieved_tflops": round(achieved, 3),
        "mfu": round(achieved / peak, 4) if peak else None,
        "gpu_busy": round(busy, 3) if busy is not None else None,
        **syncs,
        "peak_memory_MiB": round(peak_memory_mb(device), 1),
        "baseline_rss_MiB": round(baseline, 1) if device.type != "cuda" else 0.0,
        "memory_kind": "cuda max allocated" if device.type == "cuda" else "peak RSS",
        "device": device_name,
    }


def markdown(rows, command: str) -> str:
    lines = [f"Measured {date.today().isoformat()} on {rows[0]['device']} "
             f"({os.cpu_count()} CPU cores visible), `{command}`:", "",
             "| size | mode | batch | fwd rows/sample (teacher + student + fake) | backward/iter | s/iter "
             "| TFLOP/iter | TFLOP/s | MFU | GPU busy | host syncs/iter | peak memory | above baseline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["forward_rows_per_sample"]
        b = r["backward_passes_per_iteration"]
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "–"
        busy = f"{100 * r['gpu_busy']:.0f} %" if r["gpu_busy"] is not None else "–"
        lines.append(f"| {r['size']} ({r['denoiser_params_M']} M) | {r['train_mode']}{' ' + r['extra'] if r['extra'] else ''} "
                     f"| {r['batch']} | {r['forward_rows_per_sample_total']:.2f} = {f['teacher']:.2f} + "
                     f"{f['student']:.2f} + {f['fake_score']:.2f} | {b['student'] + b['fake_score']:.0f} "
                     f"| {r['seconds_per_iteration']:.3f} | {r['tflop_per_iteration']:.4g} "
                     f"| {r['achieved_tflops']:.3g} | {mfu} | {busy} | {r['device_syncs']} "
                     f"| {r['peak_memory_MiB']:.0f} MiB ({r['memory_kind']}) "
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
               str(args.warmup), "--count_iterations", str(args.count_iterations), "--mixed_precision", args.mixed_precision, f"--extra={args.extra}"]
        if args.peak_tflops:
            cmd += ["--peak_tflops", str(args.peak_tflops)]
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
