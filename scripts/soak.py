#!/usr/bin/env python
"""Soak test: train the toy for many steps and check that memory and open files stay flat.

    OMP_NUM_THREADS=1 python scripts/soak.py                        # 5,000 steps, lora and full
    python scripts/soak.py --steps 300 --every 50 --warmup_steps 100 --modes full [train_tdm.py flags]

Each mode runs train_tdm.main in a fresh process of its own (this script, `--worker MODE`), on
the config's toy (configs/toy2d.yaml; its teacher is pre-trained first if missing). That process
records its resident memory (VmRSS of /proc/self/status, psutil where there is no /proc) and its
open file descriptors (/proc/self/fd) before the first iteration and after every `--every`-th.
A mode passes when, from the first sample at or after `--warmup_steps` to the last, RSS grows by
at most `--max_growth` % and the descriptor count does not change. Prints a markdown table,
writes the report (JSON) to `--report`, exits 1 if a mode fails. Not part of the test suite
(tests/test_soak.py runs it briefly).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

REPORT_FIELDS = ("machine", "date", "command", "steps", "every", "warmup_steps", "max_growth_pct",
                 "modes", "passed")
MODE_FIELDS = ("mode", "samples", "rss_start_mb", "rss_end_mb", "rss_growth_pct", "rss_min_mb",
               "rss_max_mb", "rss_trend_mb_per_1k_steps", "fds_start", "fds_end", "fds_constant",
               "seconds", "passed")


def rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss


def open_fds() -> int:
    """Open file descriptors of this process (the listing's own descriptor not counted)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1
    except OSError:
        import psutil

        return psutil.Process().num_fds()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000, help="Training steps per mode.")
    p.add_argument("--every", type=int, default=250, help="Sample RSS and open files every N steps.")
    p.add_argument("--warmup_steps", type=int, default=1000,
                   help="Growth is measured from the first sample at or after this step.")
    p.add_argument("--max_growth", type=float, default=2.0, help="Allowed RSS growth after warm-up, %%.")
    p.add_argument("--modes", default="lora,full", help="Comma-separated --train_mode values.")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "toy2d.yaml"),
                   help="train_tdm.py config of the run (a toy2d one: its teacher is ensured).")
    p.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "soak"),
                   help="Runs go to OUTPUT_DIR/MODE (emptied first).")
    p.add_argument("--report", default=None, help="JSON report; default OUTPUT_DIR/soak.json.")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def worker(args, train_flags) -> int:
    """One mode in this process: train_tdm.main with every iteration counted and sampled."""
    import torch

    import train_tdm
    from tdm.config import parse_args

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = os.path.join(args.output_dir, args.worker)
    run_args = parse_args(["--config", args.config, "--train_mode", args.worker,
                           "--output_dir", out, "--max_train_steps", str(args.steps),
                           "--checkpointing_steps", "0", "--validation_steps", "0",
                           "--report_to", "none", "--overwrite_output_dir", *train_flags])
    samples, count, start = [], [0], time.time()

    def sample():
        samples.append({"step": count[0], "rss_mb": round(rss_bytes() / 2 ** 20, 2),
                        "fds": open_fds(), "elapsed_s": round(time.time() - start, 1)})

    iteration = train_tdm.tdm_iteration

    def counted(*a, **k):
        if count[0] == 0:
            sample()   # everything built, nothing trained
        result = iteration(*a, **k)
        count[0] += 1
        if count[0] % args.every == 0:
            sample()
        return result

    train_tdm.tdm_iteration = counted
    code = train_tdm.main(run_args)
    with open(os.path.join(out, "soak_samples.json"), "w") as f:
        json.dump(samples, f)
    return code


def summarise(mode: str, samples: list, args, seconds: float) -> dict:
    after = [s for s in samples if s["step"] >= args.warmup_steps] or samples[-1:]
    first, last = after[0], after[-1]
    growth = 100.0 * (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"]
    fds_constant = len({s["fds"] for s in after}) == 1
    steps, rss = [s["step"] for s in after], [s["rss_mb"] for s in after]
    mean_step, mean_rss = sum(steps) / len(steps), sum(rss) / len(rss)
    spread = sum((x - mean_step) ** 2 for x in steps)
    slope = (sum((x - mean_step) * (y - mean_rss) for x, y in zip(steps, rss)) / spread * 1000
             if spread else 0.0)   # least squares: a trend under the allocator's noise
    return {"mode": mode, "samples": samples, "warmup_step": first["step"],
            "rss_start_mb": first["rss_mb"], "rss_end_mb": last["rss_mb"],
            "rss_growth_pct": round(growth, 3), "rss_min_mb": min(rss), "rss_max_mb": max(rss),
            "rss_trend_mb_per_1k_steps": round(slope, 3),
            "fds_start": first["fds"], "fds_end": last["fds"],
            "fds_constant": fds_constant, "seconds": round(seconds, 1),
            "passed": growth <= args.max_growth and fds_constant}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, train_flags = build_parser().parse_known_args(argv)
    if args.worker:
        return worker(args, train_flags)

    import shutil

    import yaml

    from tdm.toy.teacher import ensure_teacher

    with open(args.config) as f:
        config = yaml.safe_load(f)
    if config.get("backbone") == "toy2d":
        ensure_teacher(config["pretrained_model_name_or_path"], config.get("backbone_options"))
    modes = [m for m in args.modes.split(",") if m]
    report = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "command": " ".join(["python", "scripts/soak.py", *argv]),
        "steps": args.steps, "every": args.every, "warmup_steps": args.warmup_steps,
        "max_growth_pct": args.max_growth, "modes": {}}
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.setdefault("OMP_NUM_THREADS", "1")
    for mode in modes:
        out = os.path.join(args.output_dir, mode)
        shutil.rmtree(out, ignore_errors=True)
        started = time.time()
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--steps", str(args.steps),
               "--every", str(args.every), "--config", args.config, "--output_dir", args.output_dir,
               *train_flags]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            print(f"error: the {mode} run failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        with open(os.path.join(out, "soak_samples.json")) as f:
            samples = json.load(f)
        report["modes"][mode] = summarise(mode, samples, args, time.time() - started)
    report["passed"] = all(m["passed"] for m in report["modes"].values())
    path = args.report or os.path.join(args.output_dir, "soak.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{report['machine']}; {report['date']}\n$ {report['command']}\n")
    print(f"| mode | steps | RSS at step {args.warmup_steps}+ (MB) | RSS at the end (MB) | growth | "
          "min–max after warm-up (MB) | trend (MB / 1k steps) | open fds (start → end) | time | ok |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for m in report["modes"].values():
        print(f"| {m['mode']} | {args.steps} | {m['rss_start_mb']:.1f} (step {m['warmup_step']}) | "
              f"{m['rss_end_mb']:.1f} | {m['rss_growth_pct']:+.2f} % | "
              f"{m['rss_min_mb']:.1f}–{m['rss_max_mb']:.1f} | "
              f"{m['rss_trend_mb_per_1k_steps']:+.2f} | {m['fds_start']} → {m['fds_end']} | "
              f"{m['seconds']:.0f} s | {'yes' if m['passed'] else 'NO'} |")
    print("\nsamples (step: RSS MB / fds):")
    for m in report["modes"].values():
        print(f"  {m['mode']}: " + ", ".join(f"{s['step']}: {s['rss_mb']:.1f}/{s['fds']}"
                                           for s in m["samples"]))
    print(f"\nreport: {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
