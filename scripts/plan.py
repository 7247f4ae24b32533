#!/usr/bin/env python
"""Plan a run before launching it: peak GPU memory by kind, FLOPs and forward rows per iteration,
the cards it fits and the smallest change that fits the others (tdm/plan.py; CPU, no download).

    python scripts/plan.py --config configs/flux_dev.yaml --mixed_precision bf16
    python scripts/plan.py --config configs/pixart_alpha_512.yaml --train_batch_size 8 --no_suggest
    python scripts/plan.py --validate                  # PixArt-XL-2-512 against its measured peaks
    python scripts/plan.py --table configs/*.yaml      # the table of docs/families.md
    python scripts/plan.py --table --cached configs/*.yaml   # only the plans already cached

Every other flag is train_tdm.py's; plans are cached per setting in $XDG_CACHE_HOME/tdm/plans.
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MiB = 2**20

# The measured peaks (CUDA max_memory_allocated) of bench_train.py's PixArt-XL-2-512 run: random
# weights, a 2-layer T5 of width 4096, bf16, 512 px, cfg 4.5, LoRA rank 64, torch's AdamW.
# Batch 4 with checkpointing: H200, 2026-11-26, docs/benchmarks.md, code of MEASURED_COMMIT.
# LoRA batch 16 without checkpointing: "29.3 GiB" as reported in the planning issue (card and
# code not recorded).
MEASURED_COMMIT = "547d859"
MEASURED = [("lora", 4, True, 3391 * MiB), ("full", 4, True, 20008 * MiB),
            ("lora", 16, False, int(29.3 * 2**30))]
BENCH_FLAGS = ["--resolution", "512", "--mixed_precision", "bf16", "--seed", "0", "--cfg", "4.5",
               "--total_steps", "900", "--use_huber", "--use_separate", "--lora_rank", "64"]


def bench_flags(folder, mode, batch, checkpointing):
    return ["--pretrained_model_name_or_path", folder, "--train_mode", mode, "--train_batch_size",
            str(batch), *BENCH_FLAGS, *(["--gradient_checkpointing"] if checkpointing else [])]


def plan_measured_code(tree: str, flags: list) -> int:
    """The planner's machinery (this tdm/simulate.py) on the train_tdm.py and tdm/ of `tree` (the
    measured commit): its build and iteration, with torch's AdamW as CUDA runs it (foreach).
    Runs in a process of its own (`--measured_code`): that tree's tdm package is imported."""
    import importlib.util

    sys.path[:] = [tree] + [p for p in sys.path if p != ROOT]
    spec = importlib.util.spec_from_file_location("simulate", os.path.join(ROOT, "tdm", "simulate.py"))
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    import torch
    import train_tdm
    from tdm.config import parse_args

    with tempfile.TemporaryDirectory(prefix="tdm-plan-") as scratch:   # removed after
        batch = int(flags[flags.index("--train_batch_size") + 1])
        with open(os.path.join(scratch, "prompts.txt"), "w") as f:
            f.write("a photo of a cat on a chair\n" * batch)
        args = parse_args(flags + ["--output_dir", os.path.join(scratch, "run"), "--prompts",
                                   os.path.join(scratch, "prompts.txt"), "--report_to", "none",
                                   "--checkpointing_steps", "0", "--validation_steps", "0"])
        with sim.accelerate_on(sim.SIMULATED), sim.SimulatedDevice(), sim.weightless_loading(), \
                sim.MemoryTrace(sim.SIMULATED, sim.ALLOCATOR_BLOCK) as trace, sim.cuda_autocast():
            run = train_tdm.build(args)
            optimisers = [run.accelerator.prepare_optimizer(torch.optim.AdamW(
                params, lr=1e-5, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                weight_decay=args.adam_weight_decay, foreach=True))
                for params in (run.networks.fake_params, run.networks.student_params)]
            prompts = list(run.dataloader.dataset)[:batch]
            for _ in range(2):   # the first allocates the optimiser states
                train_tdm.tdm_iteration(run.accelerator, run.tdm, run.networks, run.encode(prompts),
                                        run.uncond, run.latent_shape, optimisers[0], optimisers[1],
                                        run.lr_scheduler, args.max_grad_norm)
            return trace.peak


def validate() -> int:
    """Plan the measured PixArt-XL-2-512 runs with the measured code and with today's, and print
    a markdown table of both beside the measurements."""
    from tdm.config import parse_args
    from tdm.plan import plan
    from tdm.tiny import build_tiny_pixart

    with tempfile.TemporaryDirectory(prefix="tdm-validate-") as scratch:   # removed after
        folder = build_tiny_pixart(os.path.join(scratch, "pixart-full"), size="full", weights=False)
        tree = os.path.join(scratch, "measured-code")
        os.makedirs(tree)
        archive = subprocess.run(["git", "-C", ROOT, "archive", MEASURED_COMMIT], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
        print("| mode | batch | checkpointing | measured | planned, measured code | error | "
              "planned, today's code | s to plan |\n|---|---|---|---|---|---|---|---|")
        for mode, batch, checkpointing, measured in MEASURED:
            flags = bench_flags(folder, mode, batch, checkpointing)
            proc = subprocess.run([sys.executable, __file__, "--measured_code", tree, *flags],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
                return 1
            old = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
            today = plan(parse_args(flags))
            print(f"| {mode} | {batch} | {'yes' if checkpointing else 'no'} | {measured / MiB:.0f} MiB "
                  f"| {old / MiB:.0f} MiB | {(old - measured) / measured:+.1%} "
                  f"| {today.peak / MiB:.0f} MiB | {today.seconds:.0f} |", flush=True)
        return 0


def table(configs: list, cached_only: bool = False) -> int:
    """Markdown rows: each config at its batch, bf16, planned in LoRA and full mode, with and
    without gradient checkpointing (GiB per process, TFLOP per iteration), and the cards the
    config as shipped fits (tdm.plan.CARDS). `cached_only`: plans not in the cache are left out
    ("not planned") instead of planned now."""
    from tdm.config import parse_args
    from tdm.plan import cache_path, cached_plan, cards_fitted

    def planned(args):
        return None if cached_only and not os.path.isfile(cache_path(args)) else cached_plan(args)

    print("| config | batch × accumulation | LoRA, checkpointing | LoRA, none | full, checkpointing "
          "| full, none | as shipped: fits |\n|---|---|---|---|---|---|---|")
    for config in configs:
        args = parse_args(["--config", config, "--mixed_precision", "bf16"])
        cells = []
        for mode in ("lora", "full"):
            for checkpointing in (True, False):
                cell = planned(args.replace(train_mode=mode, gradient_checkpointing=checkpointing))
                cells.append(f"{cell.peak_gib:.1f} GiB, {cell.tflop:.0f} TFLOP" if cell else "not planned")
        shipped = planned(args)
        fitted = shipped and ", ".join(c for c, ok in cards_fitted(shipped.peak).items() if ok)
        print(f"| `{os.path.basename(config)}` ({args.train_mode}) | {args.train_batch_size} × "
              f"{args.gradient_accumulation_steps} | {' | '.join(cells)} | "
              + (f"{fitted or 'none'} ({shipped.peak_gib:.1f} GiB) |" if shipped else "not planned |"),
              flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--measured_code"]:
        print(json.dumps({"peak": plan_measured_code(argv[1], argv[2:])}))
        return 0
    if argv[:1] == ["--validate"]:
        return validate()
    if argv[:1] == ["--table"]:
        cached_only = "--cached" in argv
        return table([a for a in argv[1:] if a != "--cached"], cached_only)
    from tdm.plan import main as plan_main

    return plan_main(argv)


if __name__ == "__main__":
    sys.exit(main())
