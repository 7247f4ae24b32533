#!/usr/bin/env python
"""Wall time of the 4-step student (guidance 1) against the teacher's 25-step sampling with CFG 4.5,
same prompts, resolution and stock pipeline, end to end (text encoding and VAE decode included).

    python scripts/bench_infer.py --size medium
    python scripts/bench_infer.py --model PixArt-alpha/PixArt-XL-2-512x512 --weights tdm-pixart  # GPU

Without --weights the student is the teacher's network itself: a full-mode student costs exactly
that per step (a LoRA student adds its low-rank products unless fused).
"""
import argparse
import json
import os
import statistics
import sys
import time
from datetime import date

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench_train import RESOLUTION, model_folder  # noqa: E402
from infer_tdm import sample_student, student_pipeline  # noqa: E402
from tdm.sampling import resolve_weights  # noqa: E402
from tdm.trajectory import StepGrid  # noqa: E402

PROMPTS = ["a red fox sitting in fresh snow at sunrise", "a lighthouse on a rocky cliff during a storm"]


def timed(fn, repeats: int, device) -> float:
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(RESOLUTION), default="tiny")
    p.add_argument("--model", default=None, help="A real pipeline instead of a built one.")
    p.add_argument("--weights", default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--student_steps", type=int, default=4)
    p.add_argument("--teacher_steps", type=int, default=25)
    p.add_argument("--teacher_guidance", type=float, default=4.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    model = args.model or model_folder(args.size)
    resolution = args.resolution or (512 if args.model else RESOLUTION[args.size])
    pipe, backbone = student_pipeline(model, resolve_weights(args.weights), 1.0, dtype, device)
    teacher_scheduler = pipe.scheduler
    grid = StepGrid.uniform(args.student_steps, 900).timesteps

    def student():
        sample_student(pipe, backbone, PROMPTS, grid, torch.manual_seed(0), 1.0, resolution, resolution)

    def teacher():
        pipe.scheduler = teacher_scheduler
        pipe(prompt=PROMPTS, num_inference_steps=args.teacher_steps, guidance_scale=args.teacher_guidance,
             height=resolution, width=resolution, generator=torch.manual_seed(0),
             **backbone.pipeline_kwargs())

    with torch.no_grad():
        student_s = timed(student, args.repeats, device)
        teacher_s = timed(teacher, args.repeats, device)
    result = {"model": args.model or f"pixart-{args.size}", "resolution": resolution,
              "prompts": len(PROMPTS), "student_steps": args.student_steps,
              "teacher_steps": args.teacher_steps, "teacher_guidance": args.teacher_guidance,
              "student_seconds": round(student_s, 4), "teacher_seconds": round(teacher_s, 4),
              "speedup": round(teacher_s / student_s, 2),
              "forward_rows_ratio": args.teacher_steps * 2 / args.student_steps,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "date": date.today().isoformat()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
