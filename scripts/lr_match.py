#!/usr/bin/env python
"""Match LoRA learning rates to full fine-tuning by how far the student moves.

For one model and one set of train_tdm.py flags, train `--train_mode full` at the given learning
rates and `--train_mode lora` at the learning rates × m for each multiplier m (fake score and
generator alike, generator_lr_ratio kept), each for --steps optimiser steps through the script's
own `train_tdm.build` and `train_tdm.tdm_iteration`. After every step, a probe: the student's x̂0
at its first grid time (e.g. 899) on fixed prompts and fixed noise; the movement after n steps is
RMS(x̂0(n) − x̂0(0)). The matching multiplier is where lora's movement after N steps equals full
mode's, interpolated linearly in log(m)–log(movement) between the two measured multipliers that
bracket it. One JSON line per run on stdout, then a markdown table (also appended to --markdown).
Runs are deterministic (--seed 0, fixed probe): with --reuse, rows printed by an earlier call
with the same flags are taken instead of trained again (e.g. to add multipliers, or to split
the multipliers over several processes and then tabulate them together).

    # medium PixArt-shaped transformer (~60 M, 64 px), PixArt config settings, LoRA rank 64
    python scripts/lr_match.py --model pixart-medium --config configs/pixart_alpha_512.yaml \
        --lora_rank 64 --train_batch_size 2 --steps 50 --multipliers 3,5,10,30
    # the toy 2-D mixture with a wide MLP (hidden 512) and LoRA rank 8
    python scripts/lr_match.py --model toy2d --config configs/toy2d.yaml --lora_rank 8 \
        --backbone_options '{"network": {"hidden": 512, "depth": 3, "time_channels": 64},
                             "teacher": {"steps": 300, "batch_size": 512}}'
    # other families on their tiny pipelines (narrower than rank 64: use a smaller rank)
    python scripts/lr_match.py --model sd15 --config configs/sd15_dreamshaper.yaml --lora_rank 4 --steps 40

Models are built locally (tdm.tiny) under --models_dir on first use. From the config only the
training settings are used: the model, resolution, backbone_options (--backbone_options wins),
LR schedule (constant here), gradient accumulation (1 here), 8-bit Adam and gradient
checkpointing (both off here: same maths, plain AdamW) are replaced.
"""
import argparse
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import date

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# model -> (builder name in tdm.tiny or None, builder kwargs, train_tdm.py flags)
MODELS = {
    "pixart-tiny": ("build_tiny_pixart", {"size": "tiny"}, ["--resolution", "32"]),
    "pixart-medium": ("build_tiny_pixart", {"size": "medium"}, ["--resolution", "64"]),
    "sd15": ("build_tiny_sd15", {}, ["--resolution", "32"]),
    "sdxl": ("build_tiny_sdxl", {}, ["--resolution", "32"]),
    "sd3": ("build_tiny_sd3", {}, ["--resolution", "32"]),
    "cogvideox": ("build_tiny_cogvideox", {}, ["--resolution", "32", "--num_frames", "9",
                                              "--backbone", "cogvideox", "--backbone_options", "{}"]),
    "toy2d": (None, {}, ["--backbone", "toy2d"]),   # teacher pre-trained by model_folder
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", choices=list(MODELS), default="pixart-tiny")
    p.add_argument("--config", default=None, help="train_tdm.py YAML with the family's settings.")
    p.add_argument("--lora_rank", type=int, default=None, help="Default: the config's (64).")
    p.add_argument("--learning_rate", type=float, default=None, help="Full-mode fake-score lr; "
                   "default: the config's. The generator's is × generator_lr_ratio.")
    p.add_argument("--train_batch_size", type=int, default=None, help="Default: the config's.")
    p.add_argument("--backbone_options", default=None, help="Overrides the config's (YAML/JSON).")
    p.add_argument("--extra", default="", help="More train_tdm.py flags, e.g. '--cfg 3.5'.")
    p.add_argument("--steps", type=int, default=100, help="Optimiser steps per run (N).")
    p.add_argument("--multipliers", default="1,3,10,30,100", help="LoRA lr = full lr × m.")
    p.add_argument("--probe_batch", type=int, default=4, help="Probe prompts (toy2d: 256 points).")
    p.add_argument("--models_dir", default=os.path.join(tempfile.gettempdir(), "tdm-lr-match"))
    p.add_argument("--markdown", default=None, help="Append the table to this file.")
    p.add_argument("--reuse", default=None, help="Stdout of an earlier run: its rows with the same "
                   "flags (and at least --steps steps) are used instead of measured again.")
    return p.parse_args(argv)


def model_folder(args) -> str:
    builder, kwargs, _ = MODELS[args.model]
    options = hashlib.sha1((args.backbone_options or "").encode()).hexdigest()[:8]
    suffix = "-" + options if args.model == "toy2d" else ""   # one teacher per toy network
    folder = os.path.join(args.models_dir, args.model + suffix)
    if builder and not os.path.isfile(os.path.join(folder, "model_index.json")):
        import tdm.tiny

        getattr(tdm.tiny, builder)(folder, **kwargs)
    if args.model == "toy2d":   # the toy teacher: pre-trained once for these options
        from tdm.config import parse_args
        from tdm.toy.teacher import ensure_teacher

        flags = (["--config", args.config] if args.config else []) + (
            ["--backbone_options", args.backbone_options] if args.backbone_options else [])
        ensure_teacher(folder, parse_args(flags).backbone_options or {})
    return folder


def train_flags(args, mode: str, multiplier: float) -> list:
    """train_tdm.py flags of one run (all but --output_dir); the lr is the config's (or
    --learning_rate) × multiplier."""
    from tdm.config import parse_args

    flags = (["--config", args.config] if args.config else []) + MODELS[args.model][2] + [
        "--pretrained_model_name_or_path", model_folder(args), "--train_mode", mode,
        "--gradient_accumulation_steps", "1", "--mixed_precision", "no", "--report_to", "none",
        "--validation_steps", "0", "--checkpointing_steps", "0", "--lr_scheduler", "constant",
        "--seed", "0", *args.extra.split()]
    if args.backbone_options:
        flags += ["--backbone_options", args.backbone_options]
    if args.train_batch_size:
        flags += ["--train_batch_size", str(args.train_batch_size)]
    if args.lora_rank and mode == "lora":
        flags += ["--lora_rank", str(args.lora_rank)]
    lr = args.learning_rate or parse_args(flags + ["--output_dir", tempfile.gettempdir()]).learning_rate
    return flags + ["--learning_rate", repr(lr * multiplier)]


def reused(args, flags):
    """A row of --reuse measured with the same flags, probe and at least as many steps."""
    for line in open(args.reuse) if args.reuse else []:
        row = json.loads(line) if line.startswith("{") else {}
        if row.get("flags") == flags and row.get("probe_batch") == args.probe_batch \
                and row["steps"] >= args.steps:
            return {**row, "movement": row["movement"][:args.steps + 1], "steps": args.steps,
                    "seconds": row["seconds"] * args.steps / row["steps"], "reused": args.reuse}
    return None


def measure(args, mode: str, multiplier: float = 1.0) -> dict:
    """Train `mode` at lr × multiplier for args.steps steps; x̂0 movement after each step."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    import train_tdm
    from tdm.config import parse_args
    from tdm.data import load_prompts

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    flags = train_flags(args, mode, multiplier)
    row = reused(args, flags)
    if row:
        return row
    out = tempfile.mkdtemp(prefix="tdm-lr-match-")
    targs = parse_args(flags + ["--output_dir", out])
    off = {"use_8bit_adam": False, "gradient_checkpointing": False}   # same maths, plain AdamW
    targs = targs.replace(**off)
    run = train_tdm.build(targs)
    tdm, networks = run.tdm, run.networks

    # the probe: fixed prompts, fixed noise, the student's first step
    batch = 256 if args.model == "toy2d" else args.probe_batch
    prompts = (load_prompts(targs.prompts) * batch)[:batch]
    K = tdm.step_counts[-1]
    cond = tdm.student_condition(run.encode(prompts), K)
    device = run.accelerator.device
    noise = torch.randn((batch, *run.latent_shape), generator=torch.Generator().manual_seed(1234))
    noise = noise.to(device)
    t = tdm.grids[K].tau(torch.full((batch,), K, dtype=torch.long, device=device))

    def probe(student=networks.student_eval):
        with torch.no_grad():
            return student(noise, t, cond)[0].float()

    x0_start = probe()
    movement, skipped, start = [0.0], 0, time.perf_counter()
    batches = iter(run.dataloader)
    for _ in range(args.steps):
        try:
            prompts_batch = next(batches)
        except StopIteration:
            batches = iter(run.dataloader)
            prompts_batch = next(batches)
        _, _, n_skipped = train_tdm.tdm_iteration(
            run.accelerator, tdm, networks, run.encode(prompts_batch), run.uncond, run.latent_shape,
            run.fake_score_optimizer, run.student_optimizer, run.lr_scheduler, targs.max_grad_norm,
            targs.fake_score_updates)
        skipped += n_skipped
        movement.append(((probe() - x0_start).pow(2).mean().sqrt()).item())
        if len(movement) % 10 == 1:
            print(f"{mode} ×{multiplier:g}: step {len(movement) - 1}, x̂0 moved {movement[-1]:.4g}, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    row = {"model": args.model, "config": args.config, "lora_rank": targs.lora_rank if mode == "lora" else None,
           "mode": mode, "multiplier": multiplier, "lr_fake": targs.learning_rate,
           "lr_generator": targs.learning_rate * targs.generator_lr_ratio, "cfg": targs.cfg,
           "batch": targs.train_batch_size, "steps": args.steps, "x0_rms": x0_start.pow(2).mean().sqrt().item(),
           "movement": movement, "skipped_updates": skipped,
           "seconds": round(time.perf_counter() - start, 1), "probe_batch": args.probe_batch, "flags": flags}
    del run, networks, probe   # free the models before the next build
    gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    return row


def matching_multiplier(full: float, loras: list, step: int):
    """m where lora's movement at `step` equals full's: log-log interpolation between the two
    measured multipliers that bracket it; None if none do."""
    points = [(r["multiplier"], r["movement"][step]) for r in sorted(loras, key=lambda r: r["multiplier"])]
    for (m0, v0), (m1, v1) in zip(points, points[1:]):
        if min(v0, v1) <= full <= max(v0, v1) and v0 > 0 and v1 > 0 and v0 != v1:
            s = (math.log(full) - math.log(v0)) / (math.log(v1) - math.log(v0))
            return math.exp(math.log(m0) + s * (math.log(m1) - math.log(m0)))
    return None


def markdown(rows, steps, command):
    """(the table with the matching multipliers below it, {step: multiplier or None})"""
    full = next(r for r in rows if r["mode"] == "full")
    loras = [r for r in rows if r["mode"] == "lora"]
    at = [n for n in (10, 50) if n < steps] + [steps]
    head = " | ".join(f"x̂0 moved @{n}" for n in at)
    lines = [f"`{command}` ({date.today().isoformat()}, {os.cpu_count()}-core CPU, fp32; x̂0 RMS at "
             f"step 0: {full['x0_rms']:.3g}; batch {full['batch']}, cfg {full['cfg']}):", "",
             f"| model | lora rank | mode | lr fake / generator | {head} | ratio to full @{'/'.join(map(str, at))} | s/step |",
             "|---|---|---|---|" + "---|" * len(at) + "---|---|"]
    for r in [full] + loras:
        moved = " | ".join(f"{r['movement'][n]:.3g}" for n in at)
        ratio = " / ".join(f"{r['movement'][n] / full['movement'][n]:.2f}" if full["movement"][n] else "–"
                           for n in at)
        mode = "full" if r is full else f"lora ×{r['multiplier']:g}"
        skip = f" ({r['skipped_updates']} skipped)" if r["skipped_updates"] else ""
        lines.append(f"| {r['model']} | {r['lora_rank'] or '–'} | {mode}{skip} | {r['lr_fake']:.3g} / "
                     f"{r['lr_generator']:.3g} | {moved} | {ratio} | {r['seconds'] / steps:.2f} |")
    matches = {n: matching_multiplier(full["movement"][n], loras, n) for n in at}
    top = max(loras, key=lambda r: r["multiplier"])

    def describe(n, m):
        if m:
            return f"×{m:.3g}"
        above = top["movement"][n] < full["movement"][n]
        return f"{'above' if above else 'at or below'} the measured range (not bracketed)"

    text = ", ".join(f"@{n}: {describe(n, m)}" for n, m in matches.items())
    lines += ["", f"Matching LoRA multiplier (log-log interpolation between measured ones) {text}."]
    return "\n".join(lines) + "\n", matches


def main(argv=None):
    args = parse(argv)
    argv = sys.argv[1:] if argv is None else argv
    rows = []
    for mode, m in [("full", 1.0)] + [("lora", float(m)) for m in args.multipliers.split(",")]:
        rows.append(measure(args, mode, m))
        print(json.dumps(rows[-1]), flush=True)
    table, matches = markdown(rows, args.steps, "python scripts/lr_match.py " + " ".join(
        f"'{a}'" if " " in a else a for a in argv))
    print(json.dumps({"model": args.model, "matching_multiplier": {str(k): v for k, v in matches.items()}}))
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
