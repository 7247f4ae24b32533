#!/usr/bin/env python
"""Sample a TDM student in K steps with the stock diffusers pipeline, optionally beside its teacher.

    python infer_tdm.py --weights tdm-output --prompt "a red fox in the snow" --output fox.png \
        --teacher_steps 25 --teacher_guidance 4.5

The student runs on its training grid with a stock scheduler that reproduces the training
rollout exactly (first-order DPM-Solver++ = DDIM, docs/method.md §7), with guidance 1.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import List, Optional

import torch

from tdm.checks import (Number, Parser, UsageError, check_output_file, choice, image_extensions,
                        first_line, model_error, offline_hint)
from tdm.config import DEFAULT_MODEL, SEED, int_list
from tdm.data import load_prompts

VIDEO_EXTENSIONS = (".mp4", ".gif")
TOY_TEACHER_STEPS = 50
SAMPLERS = ("grid", "upstream")   # --sampler of infer_tdm.py and eval_tdm.py
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}   # --dtype


def inference_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """--dtype, or its default: fp16 on CUDA, fp32 elsewhere."""
    return DTYPES[name or ("fp16" if device.type == "cuda" else "fp32")]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Teacher pipeline; default: the one the student was trained from.")
    p.add_argument("--weights", default=None,
                   help="Training output dir, a LoRA .safetensors, or a full transformer folder.")
    p.add_argument("--lora_scale", type=Number(float), default=1.0)
    p.add_argument("--prompt", action="append", default=None,
                   help="Repeatable (toy2d: class labels of a conditional mixture; none: the whole "
                   "mixture).")
    p.add_argument("--prompts_file", default=None, help="A .txt with one prompt a line.")
    p.add_argument("--num_inference_steps", type=Number(int, low=1), default=4)
    p.add_argument("--timesteps", type=int_list, default=None,
                   help="Explicit grid; default: the training grid (or k·T/K − 1).")
    p.add_argument("--sampler", **choice(*SAMPLERS), default="grid",
                   help="grid: the exact training rollout on the student's grid; upstream: the "
                   "sampler of the family's published TDM snippet (DPM-Solver++ multistep).")
    p.add_argument("--flow_shift", type=Number(float, above=0), default=None,
                   help="Flow shift of the upstream DPM-Solver for rectified-flow models (1–6).")
    p.add_argument("--num_frames", type=Number(int, low=1), default=None, help="Video backbones: frames.")
    p.add_argument("--fps", type=Number(int, low=1), default=8,
                   help="Video backbones: frames per second.")
    p.add_argument("--guidance_scale", type=Number(float, low=0), default=None,
                   help="Default: what the student was trained for (1; FLUX.1-dev: --student_guidance).")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--height", type=Number(int, low=1), default=None,
                   help="Default: the training resolution.")
    p.add_argument("--width", type=Number(int, low=1), default=None)
    p.add_argument("--output", default="tdm.png",
                   help="PNG, a grid for several prompts; video backbones: .mp4 (or .gif), one "
                   "file per prompt and sampler when there are several.")
    p.add_argument("--teacher_steps", type=Number(int, low=1), default=None,
                   help="Also render the teacher with this many steps, in the same grid (toy2d: "
                   f"DDIM, default {TOY_TEACHER_STEPS} as in the demo's figure).")
    p.add_argument("--teacher_guidance", type=Number(float, low=0), default=None,
                   help="Default: the --cfg the student was trained with (config.yaml), else 4.5.")
    p.add_argument("--num_samples", type=Number(int, low=1), default=20000,
                   help="toy2d: points per scatter panel.")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", **choice(*DTYPES), default=None,
                   help="Default: fp16 on CUDA, fp32 on CPU.")
    return p


def student_pipeline(model_path: str, weights, lora_scale: float, dtype, device,
                     backbone_name: str = "auto", backbone_options: Optional[dict] = None,
                     num_steps: Optional[int] = None, student_guidance: Optional[float] = None,
                     sizes: Optional[dict] = None):
    """(stock pipeline of the teacher with the student applied, its backbone adapter). A
    step-conditioned student (TDM-unify) is conditioned on K = `num_steps`; a guidance-embedded
    one (FLUX.1-dev) samples with the `student_guidance` it was trained with. `sizes` (flag →
    pixels, e.g. --height) are checked against the model before any weight loads."""
    from tdm.backbones import load_backbone

    from tdm.lora import check_lora_file

    try:
        backbone = load_backbone(model_path, backbone_name, options=backbone_options)
        for flag, side in (sizes or {}).items():
            if side is not None:
                backbone.check_resolution(side, flag)
        if student_guidance is not None:
            backbone.set_guidance(None, student_guidance)
        skeleton = backbone.denoiser_skeleton() if weights and weights[0] == "lora" else None
        if skeleton is not None:
            check_lora_file(weights[1], skeleton, backbone.lora_prefix)
    except (OSError, ValueError) as error:
        raise UsageError(offline_hint(error) or first_line(error)) from None
    pipe = backbone.load_pipeline(dtype, weights, lora_scale).to(device)
    pipe.set_progress_bar_config(disable=True)
    if weights:
        condition_on_steps(getattr(pipe, backbone.denoiser_subfolder), weights[1], num_steps)
    return pipe, backbone


def condition_on_steps(denoiser, weights_location: str, num_steps: Optional[int]) -> None:
    """Apply step_embedding.safetensors (beside the LoRA / in the model folder), if any."""
    from tdm.step_condition import apply_step_embedding, find_step_embedding_file

    path = find_step_embedding_file(weights_location)
    if path is None:
        return
    num_steps = num_steps or 4
    trained = apply_step_embedding(denoiser, path, num_steps)
    if trained and num_steps not in trained:
        print(f"warning: this student was trained for {', '.join(map(str, trained))} steps; "
              f"{num_steps} steps runs without a learned step condition", file=sys.stderr)


def sample_student(pipe, backbone, prompts: List[str], timesteps: List[int], generator=None,
                   guidance_scale: float = 1.0, height: Optional[int] = None,
                   width: Optional[int] = None, latents=None, output_type: str = "pil",
                   sampler: str = "grid", flow_shift: Optional[float] = None,
                   num_frames: Optional[int] = None):
    """K-step sampling with the stock pipeline: on the training grid (docs/method.md §7), or with the
    sampler of the family's published snippet."""
    if sampler == "grid":
        sampler_kwargs = backbone.use_training_grid(pipe, timesteps)
    else:
        sampler_kwargs = backbone.use_upstream_sampler(pipe, len(timesteps), flow_shift)
    return pipe(prompt=prompts, guidance_scale=guidance_scale, generator=generator, height=height,
                width=width, latents=latents, output_type=output_type, **sampler_kwargs,
                **backbone.pipeline_kwargs(num_frames))


@contextlib.contextmanager
def as_teacher(pipe, backbone, weights, scheduler, dtype):
    """The same pipeline with the teacher's network and scheduler: LoRA switched off, or the
    teacher's own denoiser in place of a fully fine-tuned student."""
    from tdm.roles import role_scope

    denoiser_name = backbone.denoiser_subfolder
    student_scheduler, student_net = pipe.scheduler, getattr(pipe, denoiser_name)
    scope = role_scope(student_net)                  # the teacher has no step condition
    step_condition, scope.fixed = scope.fixed, None
    pipe.scheduler = scheduler
    if weights and weights[0] == "full":
        setattr(pipe, denoiser_name, backbone.load_denoiser(dtype).to(pipe.device))
    elif weights:
        student_net.disable_adapters()
    try:
        yield pipe
    finally:
        pipe.scheduler = student_scheduler
        scope.fixed = step_condition
        if weights and weights[0] == "full":
            setattr(pipe, denoiser_name, student_net)
        elif weights:
            student_net.enable_adapters()


def main(argv=None) -> int:
    try:
        return run(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def check_output(path: str, model_path: str, config: dict):
    """--output: a folder it can be written to and a file type for what this model makes, before
    any model loads (sampling first would lose the samples). Returns the model's adapter class."""
    images = "an image type (.png, .jpg, .webp, … any that Pillow writes)"
    check_output_file("--output", path, image_extensions() + VIDEO_EXTENSIONS,
                      f"{images} or a video (.mp4, .gif)")
    from tdm.backbones import backbone_class

    try:
        family = backbone_class(config.get("backbone", "auto"), model_path)
    except (OSError, ValueError) as error:
        raise model_error("--pretrained_model_name_or_path", model_path, error) from None
    if family.is_video:
        check_output_file("--output", path, VIDEO_EXTENSIONS, "a video (.mp4, .gif) for this video model")
    else:
        check_output_file("--output", path, image_extensions(), f"{images} for this image model")
    return family


def sampling_timesteps(num_steps: int, config: dict, timesteps: Optional[List[int]]) -> List[int]:
    from tdm.sampling import student_timesteps

    try:
        return student_timesteps(num_steps, config, timesteps)
    except ValueError as error:
        raise UsageError(f"--timesteps/--num_inference_steps: {error}") from None


def run(argv=None) -> int:
    from tdm.images import image_grid
    from tdm.sampling import resolve_weights, training_config

    args = build_parser().parse_args(argv)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += load_prompts(args.prompts_file, flag="--prompts_file")
    try:
        weights = resolve_weights(args.weights)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    config = training_config(args.weights)
    model_path = args.pretrained_model_name_or_path or config.get("pretrained_model_name_or_path",
                                                                  DEFAULT_MODEL)
    family = check_output(args.output, model_path, config)
    if not family.pipeline_class_names:   # the 2-D toy: no diffusers pipeline, scatter plots
        return sample_toy(args, prompts, weights, config, model_path)
    if not prompts:
        raise UsageError("give --prompt (repeatable) or --prompts_file")
    teacher_guidance = teacher_cfg(args, config)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = inference_dtype(args.dtype, device)
    timesteps = sampling_timesteps(args.num_inference_steps, config, args.timesteps)
    pipe, backbone = student_pipeline(model_path, weights, args.lora_scale, dtype, device,
                                      config.get("backbone", "auto"), config.get("backbone_options"),
                                      num_steps=len(timesteps),
                                      student_guidance=config.get("student_guidance"),
                                      sizes={"--height": args.height, "--width": args.width})
    trained_h, trained_w = (backbone.image_size(config["resolution"]) if config.get("resolution")
                            else (None, None))
    height = args.height or trained_h
    width = args.width or trained_w or height
    if config.get("max_sequence_length"):
        backbone.max_sequence_length = config["max_sequence_length"]
    num_frames = args.num_frames or config.get("num_frames")
    teacher_scheduler = pipe.scheduler
    seed = lambda: torch.Generator(device="cpu").manual_seed(args.seed)  # noqa: E731
    guidance = backbone.sampling_guidance() if args.guidance_scale is None else args.guidance_scale
    results = [sample_student(pipe, backbone, prompts, timesteps, seed(), guidance,
                              height, width, sampler=args.sampler, flow_shift=args.flow_shift,
                              num_frames=num_frames)]
    labels = [f"TDM {len(timesteps)} steps"]
    if args.teacher_steps:
        with as_teacher(pipe, backbone, weights, teacher_scheduler, dtype) as teacher:
            results.append(teacher(prompt=prompts, num_inference_steps=args.teacher_steps,
                                   guidance_scale=teacher_guidance, height=height, width=width,
                                   generator=seed(), **backbone.pipeline_kwargs(num_frames)))
        labels.append(f"teacher {args.teacher_steps} steps, cfg {teacher_guidance:g}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if backbone.is_video:
        written = save_videos([r.frames for r in results], ["tdm", "teacher"], args.output, args.fps)
        print(f"wrote {', '.join(written)} (student timesteps {timesteps})")
        return 0
    images = [image for r in results for image in r.images]
    grid = image_grid(images, rows=len(labels), row_labels=labels if len(labels) > 1 else None)
    grid.save(args.output)
    print(f"wrote {args.output} ({len(prompts)} prompt(s), student timesteps {timesteps})")
    return 0


def teacher_cfg(args, config: dict) -> float:
    """--teacher_guidance, else the --cfg the student was trained against, else 4.5."""
    if args.teacher_guidance is not None:
        return args.teacher_guidance
    return float(config.get("cfg", 4.5))


def sample_toy(args, prompts: List[str], weights, config: dict, model_path: str) -> int:
    """The 2-D toy: --num_samples points of the student on its grid beside the teacher's DDIM
    (--teacher_steps, default TOY_TEACHER_STEPS) from the same noise, as density scatter panels
    like the demo's figure, and the points beside it (.npz: student, teacher)."""
    import numpy as np

    from tdm.backbones import load_backbone
    from tdm.images import image_grid
    from tdm.toy.evaluate import scatter_panel, student_and_teacher

    timesteps = sampling_timesteps(args.num_inference_steps, config, args.timesteps)
    try:
        backbone = load_backbone(model_path, "toy2d", options=config.get("backbone_options"))
    except (OSError, ValueError) as error:
        raise model_error("--pretrained_model_name_or_path", model_path, error) from None
    net = backbone.load_weights(*weights) if weights else backbone.load_denoiser()
    if weights:
        condition_on_steps(net, weights[1], len(timesteps))
    teacher_steps, cfg = args.teacher_steps or TOY_TEACHER_STEPS, teacher_cfg(args, config)
    samples = student_and_teacher(backbone, net, timesteps, args.num_samples, args.seed, prompts,
                                  teacher_steps, cfg)
    name = "TDM student" if weights else "teacher on the student's grid"
    titles = {"student": f"{name} {len(timesteps)} steps\ngrid {', '.join(map(str, timesteps))}",
              "teacher": f"teacher DDIM {teacher_steps}\ncfg {cfg:g}"}
    panels = [scatter_panel(points.numpy(), titles[key]) for key, points in samples.items()]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    image_grid(panels, rows=1).save(args.output)
    points = os.path.splitext(args.output)[0] + ".npz"
    np.savez(points, **{key: x.numpy() for key, x in samples.items()})
    print(f"wrote {args.output} and the points, {points} (toy2d, {args.num_samples} points a "
          f"panel: student timesteps {timesteps}, teacher DDIM {teacher_steps} with cfg {cfg:g})")
    return 0


def save_videos(videos_per_sampler, names, output: str, fps: int) -> List[str]:
    """One file per prompt and sampler: MP4 through diffusers' export_to_video, GIF when no
    video encoder is installed (or when --output ends in .gif)."""
    from diffusers.utils import export_to_gif, export_to_video

    stem, ext = os.path.splitext(output)
    several = len(videos_per_sampler) > 1 or len(videos_per_sampler[0]) > 1
    written = []
    for name, videos in zip(names, videos_per_sampler):
        for i, frames in enumerate(videos):
            path = f"{stem}-{name}-{i}{ext}" if several else output
            if ext.lower() != ".gif":
                try:
                    written.append(export_to_video(frames, path, fps=fps))
                    continue
                except (ImportError, RuntimeError, OSError):
                    path = os.path.splitext(path)[0] + ".gif"
            written.append(export_to_gif(frames, path, fps=fps))
    return written

if __name__ == "__main__":
    sys.exit(main())
