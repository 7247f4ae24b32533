#!/usr/bin/env python
"""Check full fine-tuning under FSDP (configs/accelerate/fsdp.yaml) on GPUs against plain data
parallelism: the same losses, exact resume from a sharded checkpoint that holds both models and
both optimisers, and an export that loads back with the logged weights.

    python scripts/check_fsdp.py                     # one GPU per process, as many as --processes
    python scripts/check_fsdp.py --reference_only    # CPU dry run of the script (no FSDP)

Prints a markdown table; exits 1 if a check fails.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench_train import RESOLUTION, ROOT   # same model sizes as the benchmark


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(RESOLUTION), default="medium")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--steps", type=int, default=6, help="Even: the resumed run stops half-way.")
    p.add_argument("--sharded_config", default=os.path.join(ROOT, "configs", "accelerate", "fsdp.yaml"))
    p.add_argument("--reference_only", action="store_true",
                   help="Run the sharded legs without the FSDP config (checks the script on CPU).")
    p.add_argument("--output_dir", default=None)
    return p.parse_args(argv)


def launch(args, out, steps, sharded, extra=()):
    if sharded and not args.reference_only:
        devices = ["--config_file", args.sharded_config, "--num_processes", str(args.processes)]
    elif args.reference_only:
        devices = ["--cpu", "--num_processes", "1", "--mixed_precision", "bf16"]
    else:
        devices = (["--multi_gpu"] if args.processes > 1 else []) + [
            "--num_processes", str(args.processes), "--mixed_precision", "bf16"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *devices, "--num_machines", "1",
           "--dynamo_backend", "no", os.path.join(ROOT, "train_tdm.py"),
           "--pretrained_model_name_or_path", args.model, "--output_dir", out, "--train_mode", "full",
           "--resolution", str(RESOLUTION[args.size]), "--train_batch_size", "2",
           "--max_train_steps", str(steps), "--checkpointing_steps", str(args.steps // 2),
           "--validation_steps", str(args.steps // 2), "--seed", "0", "--report_to", "none",
           "--learning_rate", "1e-5", *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(os.path.join(out, "train_log.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    losses = {line["step"]: (line["loss_fake_score"], line["loss_student"]) for line in lines if "loss_fake_score" in line}
    return losses, lines[-1]["student_checksum_per_rank"][0]


def relative_gap(a: dict, b: dict, steps) -> float:
    """Largest relative difference of the logged losses over `steps`."""
    return max(abs(x - y) / max(abs(x), abs(y), 1e-12) for step in steps for x, y in zip(a[step], b[step]))


def main(argv=None) -> int:
    import torch
    from diffusers import PixArtTransformer2DModel

    from tdm.tiny import build_tiny_pixart

    args = parse(argv)
    work = args.output_dir or tempfile.mkdtemp(prefix="tdm-fsdp-")
    args.model = os.path.join(work, "model")
    build_tiny_pixart(args.model, size=args.size)
    half, steps = args.steps // 2, range(1, args.steps + 1)
    after = range(half + 1, args.steps + 1)
    reference, _ = launch(args, os.path.join(work, "ddp"), args.steps, sharded=False)
    straight, checksum = launch(args, os.path.join(work, "fsdp"), args.steps, sharded=True)
    # control: GPU kernels (attention backward, bf16 reductions) are not bitwise deterministic,
    # so two identical runs set the scale that a resumed run is compared with
    repeat, repeat_checksum = launch(args, os.path.join(work, "fsdp_repeat"), args.steps, sharded=True)
    resumed_dir = os.path.join(work, "fsdp_resumed")
    first_leg, _ = launch(args, resumed_dir, half, sharded=True)
    checkpoint = os.path.join(resumed_dir, f"checkpoint-{half}")
    contents = sorted(os.listdir(checkpoint))
    resumed, resumed_checksum = launch(args, resumed_dir, args.steps, sharded=True,
                                       extra=["--resume_from_checkpoint", "latest"])
    resumed.update(first_leg)
    exported = PixArtTransformer2DModel.from_pretrained(os.path.join(work, "fsdp", "transformer"))
    export_checksum = float(sum(p.detach().double().sum() for p in exported.parameters()))
    samples = sorted(os.listdir(os.path.join(work, "fsdp", "samples")))

    noise_loss = relative_gap(straight, repeat, steps)
    noise_checksum = abs(repeat_checksum - checksum) / abs(checksum)
    checks = [
        ("two identical FSDP runs (run-to-run noise), loss gap", noise_loss, None),
        ("FSDP vs plain data parallel, loss gap (bf16)", relative_gap(reference, straight, steps), 0.05),
        (f"resume: steps {half + 1}-{args.steps} after resuming at {half} vs straight, loss gap",
         relative_gap(straight, resumed, after), max(1e-3, 3 * noise_loss)),
        ("two identical FSDP runs, final student checksum gap", noise_checksum, None),
        ("resumed vs straight final student checksum gap", abs(resumed_checksum - checksum) / abs(checksum),
         max(1e-4, 3 * noise_checksum)),
        ("exported transformer vs logged student checksum gap", abs(export_checksum - checksum) / abs(checksum),
         1e-6),
    ]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device}, {args.processes} process(es), PixArt {args.size}, {args.steps} steps "
          f"(relative gaps; limits: 3x run-to-run noise, at least 1e-3)\n")
    print("| check | measured | limit | ok |\n|---|---|---|---|")
    failed = 0
    for name, value, limit in checks:
        ok = limit is None or value <= limit
        failed += not ok
        print(f"| {name} | {value:.2e} | {'-' if limit is None else f'{limit:.1e}'} | "
              f"{'-' if limit is None else 'yes' if ok else 'NO'} |")
    print("\n| step | plain (fake, gen) | FSDP | FSDP repeat | FSDP resumed |\n|---|---|---|---|---|")
    for step in steps:
        cells = [", ".join(f"{v:.5g}" for v in run[step]) for run in (reference, straight, repeat, resumed)]
        print(f"| {step} | " + " | ".join(cells) + " |")
    print(f"\ncheckpoint-{half}: {', '.join(contents)}")
    print(f"validation samples: {', '.join(samples)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
