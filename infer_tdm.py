#!/usr/bin/env python
"""Sample a TDM student in K steps with the stock diffusers pipeline, optionally beside its teacher.

    python infer_tdm.py --weights tdm-output --prompt "a red fox in the snow" --output fox.png \
        --teacher_steps 25 --teacher_guidance 4.5

The student runs on its training grid with a stock scheduler that reproduces the training
rollout exactly (first-order DPM-Solver++ = DDIM, TDM_SPEC §7), with guidance 1.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import List, Optional

import torch

from tdm.config import DEFAULT_MODEL, int_list
from tdm.data import load_prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Teacher pipeline; default: the one the student was trained from.")
    p.add_argument("--weights", default=None,
                   help="Training output dir, a LoRA .safetensors, or a full transformer folder.")
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--prompt", action="append", default=None, help="Repeatable.")
    p.add_argument("--prompts_file", default=None, help="A .txt with one prompt a line.")
    p.add_argument("--num_inference_steps", type=int, default=4)
    p.add_argument("--timesteps", type=int_list, default=None,
                   help="Explicit grid; default: the training grid (or k·T/K − 1).")
    p.add_argument("--guidance_scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="Default: the training resolution.")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--output", default="tdm.png", help="PNG; a grid for several prompts.")
    p.add_argument("--teacher_steps", type=int, default=None,
                   help="Also render the teacher with this many steps, in the same grid.")
    p.add_argument("--teacher_guidance", type=float, default=4.5)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="Default: fp16 on CUDA, fp32 on CPU.")
    return p


def student_pipeline(model_path: str, weights, lora_scale: float, dtype, device):
    """(pipeline with the student applied, its backbone adapter, the teacher's own scheduler)."""
    from tdm.backbones import load_backbone

    backbone = load_backbone(model_path)
    pipe = backbone.load_pipeline(dtype, weights, lora_scale).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, backbone


def sample_student(pipe, backbone, prompts: List[str], timesteps: List[int], generator=None,
                   guidance_scale: float = 1.0, height: Optional[int] = None,
                   width: Optional[int] = None, latents=None, output_type: str = "pil"):
    """K-step sampling with the stock pipeline on the training grid (TDM_SPEC §7)."""
    grid_kwargs = backbone.use_training_grid(pipe, timesteps)
    return pipe(prompt=prompts, guidance_scale=guidance_scale, generator=generator, height=height,
                width=width, latents=latents, output_type=output_type, **grid_kwargs,
                **backbone.pipeline_kwargs())


@contextlib.contextmanager
def as_teacher(pipe, backbone, weights, scheduler, dtype):
    """The same pipeline with the teacher's network and scheduler: LoRA switched off, or the
    teacher's own denoiser in place of a fully fine-tuned student."""
    denoiser_name = backbone.denoiser_subfolder
    student_scheduler, student_net = pipe.scheduler, getattr(pipe, denoiser_name)
    pipe.scheduler = scheduler
    if weights and weights[0] == "full":
        setattr(pipe, denoiser_name, backbone.load_denoiser(dtype).to(pipe.device))
    elif weights:
        student_net.disable_adapters()
    try:
        yield pipe
    finally:
        pipe.scheduler = student_scheduler
        if weights and weights[0] == "full":
            setattr(pipe, denoiser_name, student_net)
        elif weights:
            student_net.enable_adapters()


def main(argv=None) -> int:
    from tdm.images import image_grid
    from tdm.sampling import resolve_weights, student_timesteps, training_config

    args = build_parser().parse_args(argv)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += load_prompts(args.prompts_file)
    if not prompts:
        print("error: give --prompt (repeatable) or --prompts_file", file=sys.stderr)
        return 2
    try:
        weights = resolve_weights(args.weights)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = training_config(args.weights)
    model_path = args.pretrained_model_name_or_path or config.get("pretrained_model_name_or_path",
                                                                  DEFAULT_MODEL)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    height = args.height or config.get("resolution")
    width = args.width or height

    pipe, backbone = student_pipeline(model_path, weights, args.lora_scale, dtype, device)
    if config.get("max_sequence_length"):
        backbone.max_sequence_length = config["max_sequence_length"]
    teacher_scheduler = pipe.scheduler
    timesteps = student_timesteps(args.num_inference_steps, config, args.timesteps)
    images = sample_student(pipe, backbone, prompts, timesteps,
                            torch.Generator(device="cpu").manual_seed(args.seed),
                            args.guidance_scale, height, width).images
    labels = [f"TDM {len(timesteps)} steps"]
    if args.teacher_steps:
        with as_teacher(pipe, backbone, weights, teacher_scheduler, dtype) as teacher:
            images += teacher(prompt=prompts, num_inference_steps=args.teacher_steps,
                              guidance_scale=args.teacher_guidance, height=height, width=width,
                              generator=torch.Generator(device="cpu").manual_seed(args.seed),
                              **backbone.pipeline_kwargs()).images
        labels.append(f"teacher {args.teacher_steps} steps, cfg {args.teacher_guidance:g}")
    rows = len(labels)
    grid = image_grid(images, rows=rows, row_labels=labels if rows > 1 else None)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    grid.save(args.output)
    print(f"wrote {args.output} ({len(prompts)} prompt(s), student timesteps {timesteps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
