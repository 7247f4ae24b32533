#!/usr/bin/env python
"""Evaluate a TDM student against its teacher: CLIP score, HPSv2, ImageReward and FID on a prompt set.

    python eval_tdm.py --weights tdm-pixart --prompts_file assets/prompts.txt --teacher_steps 25 \
        --teacher_cfg 4.5 --clip_model openai/clip-vit-large-patch14 --output_dir eval-pixart

The student samples K steps on its training grid with guidance 1 (as infer_tdm.py), the teacher
with its own scheduler, both from the same noise per prompt. Writes metrics.json, metrics.md and
samples.png (teacher row over student row, first --grid_prompts prompts) to --output_dir, and the
metrics into the student's model card when --weights is a train_tdm.py output. HPSv2 and
ImageReward are optional packages; FID's standard InceptionV3 needs torch-fidelity. A metric that
cannot run is reported as skipped with the reason. docs/evaluation.md: the paper's commands.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from typing import Optional

import torch

from infer_tdm import (DTYPES, SAMPLERS, as_teacher, inference_dtype, sample_student, sampling_timesteps,
                       student_pipeline)
from tdm.checks import (Number, Parser, UsageError, check_writable_folder, choice, did_you_mean,
                        first_line, model_error)
from tdm.config import DEFAULT_MODEL, SEED, int_list
from tdm.data import load_prompts

METRICS = ("clip", "hpsv2", "image_reward", "fid")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True,
                   help="The student: a training output dir, a LoRA .safetensors or a full model folder.")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Teacher pipeline (hub id or folder); default: the one the student was trained from.")
    p.add_argument("--lora_scale", type=Number(float), default=1.0)
    p.add_argument("--prompts_file", default=None,
                   help="Prompts: .txt (one a line), .jsonl/.json/.csv/.parquet, dataset folder or hub id.")
    p.add_argument("--caption_column", default=None, help="Column of a table or dataset of prompts.")
    p.add_argument("--prompt", action="append", default=None, help="Repeatable; added to the file's.")
    p.add_argument("--num_prompts", type=Number(int, low=1), default=None,
                   help="Only the first N prompts.")
    p.add_argument("--num_inference_steps", type=Number(int, low=1), default=4)
    p.add_argument("--timesteps", type=int_list, default=None,
                   help="Student grid; default: the training grid (or k·T/K − 1).")
    p.add_argument("--sampler", **choice(*SAMPLERS), default="grid",
                   help="Student sampler, as in infer_tdm.py.")
    p.add_argument("--flow_shift", type=Number(float, above=0), default=None)
    p.add_argument("--teacher_steps", type=Number(int, low=0), default=25,
                   help="0: no teacher (FID then needs --reference_dir).")
    p.add_argument("--teacher_cfg", "--teacher_guidance", dest="teacher_cfg", type=Number(float, low=0),
                   default=4.5)
    p.add_argument("--seed", type=SEED, default=0,
                   help="Prompt i is sampled from seed + i (teacher and student).")
    p.add_argument("--batch_size", type=Number(int, low=1), default=4)
    p.add_argument("--height", type=Number(int, low=1), default=None,
                   help="Default: the training resolution.")
    p.add_argument("--width", type=Number(int, low=1), default=None)
    p.add_argument("--metrics", default=",".join(METRICS),
                   help=f"Comma-separated subset of {', '.join(METRICS)}.")
    p.add_argument("--clip_model", default="openai/clip-vit-large-patch14",
                   help="transformers CLIP (hub id or folder) for the CLIP score.")
    p.add_argument("--hps_version", **choice("v2.0", "v2.1"), default="v2.1")
    p.add_argument("--hps_checkpoint", default=None, help="Local HPS checkpoint (default: downloaded).")
    p.add_argument("--image_reward_model", default="ImageReward-v1.0")
    p.add_argument("--reference_dir", default=None,
                   help="FID against these images (centre-cropped and resized to the samples) "
                   "instead of against the teacher's samples.")
    p.add_argument("--fid_feature_extractor", default=None, metavar="MODULE:FACTORY",
                   help="A callable returning the FID feature network (uint8 [N,3,H,W] → [N,D]); "
                   "default: torch-fidelity's InceptionV3, 2048-d pool features.")
    p.add_argument("--output_dir", default=None, help="Default: <student folder>/eval.")
    p.add_argument("--grid_prompts", type=Number(int, low=0), default=8,
                   help="Prompts shown in samples.png.")
    p.add_argument("--save_images", action="store_true",
                   help="Also write every sample to OUTPUT_DIR/{student,teacher}/NNNNN.png.")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", **choice(*DTYPES), default=None,
                   help="Default: fp16 on CUDA, fp32 on CPU.")
    return p


def main(argv=None) -> int:
    try:
        with quiet_loading():
            return run(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def import_factory(spec: str):
    """"package.module:callable" → the module it returns (called without arguments)."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr or "")
    except (ImportError, AttributeError, ValueError) as error:
        raise UsageError(f"--fid_feature_extractor {spec}: {first_line(error)}") from None
    return factory()


def check_args(args) -> tuple:
    """(prompts, weights, metrics, output_dir) or a UsageError, before any model is loaded."""
    from tdm.sampling import resolve_weights

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += load_prompts(args.prompts_file, args.caption_column, flag="--prompts_file")
    if args.num_prompts is not None:
        prompts = prompts[:args.num_prompts]
    if not prompts:
        raise UsageError("give --prompts_file or --prompt (repeatable)")
    try:
        weights = resolve_weights(args.weights)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise UsageError(f"--metrics {args.metrics}: unknown {', '.join(unknown)}"
                         f"{did_you_mean(unknown[0], METRICS)} (choose from {', '.join(METRICS)})")
    if args.clip_model.lower() == "none" and "clip" in metrics:
        metrics.remove("clip")
    if "clip" in metrics and not os.path.exists(args.clip_model) and (
            os.path.isabs(args.clip_model) or args.clip_model.startswith(".")):
        raise UsageError(f"--clip_model {args.clip_model}: no such folder")
    if "fid" in metrics and args.reference_dir is not None:
        check_reference_images(args.reference_dir)
    elif "fid" in metrics and args.teacher_steps == 0:
        raise UsageError("FID without the teacher (--teacher_steps 0) needs --reference_dir")
    output_dir = args.output_dir or os.path.join(export_folder(args.weights) or os.path.dirname(
        os.path.abspath(weights[1])), "eval")
    if os.path.isfile(output_dir):
        raise UsageError(f"--output_dir {output_dir} is a file")
    check_writable_folder("--output_dir", output_dir)
    return prompts, weights, metrics, output_dir


def check_reference_images(folder: str) -> None:
    """FID's reference: at least 2 images, each of which decodes (all read now, not after the
    sampling)."""
    from PIL import Image

    from tdm.evaluation import reference_paths

    if not os.path.isdir(folder):
        raise UsageError(f"--reference_dir {folder}: no such folder")
    paths = reference_paths(folder)
    if len(paths) < 2:
        raise UsageError(f"--reference_dir {folder}: FID needs at least 2 images")
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise UsageError(f"--reference_dir {folder}: cannot read {os.path.basename(path)} "
                             f"({first_line(error)})") from None


@contextlib.contextmanager
def quiet_loading():
    """One progress bar (ours): no per-component loading bars from diffusers and transformers."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def metric_models(args, wanted, num_prompts: int, extractor, device) -> tuple:
    """(status per metric, scorers of the per-image metrics, FID metric per model), before any
    sampling. A CLIP that does not load is bad input; an optional metric that cannot run is
    skipped, its reason printed now; when no requested metric can run, that is bad input too
    (nothing would be measured). An FID from too few images to mean much is run with a warning."""
    from tdm.evaluation import (STANDARD_FID, Unavailable, clip_scores, fid_feature_count,
                                fid_metric, fid_sample_warning, load_clip, load_hpsv2,
                                load_image_reward, reference_paths)

    status, scorers, fid = {}, {}, {}
    if "clip" in wanted:
        try:
            clip = load_clip(args.clip_model, device)
        except (OSError, ValueError) as error:
            raise model_error("--clip_model", args.clip_model, error) from None
        scorers["clip_score"] = lambda images, texts: clip_scores(*clip, images, texts)
        status["clip_score"] = {"status": "ok", "model": args.clip_model}
    loaders = {"hpsv2": (args.hps_version, lambda: load_hpsv2(args.hps_version, args.hps_checkpoint,
                                                                device)),
               "image_reward": (args.image_reward_model,
                                lambda: load_image_reward(args.image_reward_model, device))}
    for key, (model, loader) in loaders.items():
        if key in wanted:
            try:
                scorers[key] = loader()
                status[key] = {"status": "ok", "model": model}
            except Unavailable as error:
                status[key] = {"status": "skipped", "reason": str(error)}
    if "fid" in wanted and num_prompts < 2:
        status["fid"] = {"status": "skipped", "reason": "FID needs at least 2 prompts"}
    elif "fid" in wanted:
        try:
            models = ["student"] + (["teacher"] if args.reference_dir and args.teacher_steps else [])
            fid = {name: fid_metric(extractor, device) for name in models}
            status["fid"] = {"status": "ok", "reference": args.reference_dir or "teacher",
                             "features": f"{args.fid_feature_extractor}: not InceptionV3, not "
                             "comparable to published FIDs" if extractor is not None else STANDARD_FID}
            count = num_prompts if args.reference_dir is None else min(
                num_prompts, len(reference_paths(args.reference_dir)))
            warning = fid_sample_warning(count, fid_feature_count(fid["student"]))
            if warning:
                status["fid"]["warning"] = warning
                print(f"warning: {warning}", file=sys.stderr)
        except Unavailable as error:
            status["fid"] = {"status": "skipped", "reason": str(error)}
    for key, value in status.items():
        if value["status"] != "ok":
            print(f"{key}: skipped ({value['reason']})", file=sys.stderr)
    if not any(value["status"] == "ok" for value in status.values()):
        raise UsageError(f"--metrics {args.metrics}: none can run here ("
                         + "; ".join(f"{k}: {v['reason']}" for k, v in status.items()) + ")"
                         if status else "--metrics: nothing to measure (--clip_model none)")
    for key in ("clip_score", "hpsv2", "image_reward", "fid"):   # the rest, as not requested
        status.setdefault(key, {"status": "skipped", "reason": "not requested"})
    return status, scorers, fid


def score_batch(scorers: dict, status: dict, per_image: dict, name: str, images, prompts) -> None:
    """Add a batch's per-image scores of every metric. An optional metric (HPSv2, ImageReward)
    whose package fails while scoring is skipped from then on, with the reason, on screen too."""
    from tqdm.auto import tqdm

    for key, score in list(scorers.items()):
        try:
            per_image[name][key] += score(images, prompts)
        except Exception as error:
            if key == "clip_score":
                raise
            del scorers[key]
            for scores in per_image.values():
                scores.pop(key, None)
            reason = f"failed while scoring: {type(error).__name__}: {first_line(error)}"
            status[key] = {"status": "skipped", "reason": reason}
            tqdm.write(f"{key}: skipped ({reason})", file=sys.stderr)


def export_folder(weights_arg: str) -> Optional[str]:
    """The train_tdm.py output folder holding the student (config.yaml beside or above it)."""
    folder = weights_arg if os.path.isdir(weights_arg) else os.path.dirname(os.path.abspath(weights_arg))
    for candidate in (folder, os.path.dirname(os.path.normpath(folder))):
        if os.path.isfile(os.path.join(candidate, "config.yaml")):
            return candidate
    return None


def run(argv=None) -> int:
    from tqdm.auto import tqdm

    from tdm.backbones import backbone_class
    from tdm.evaluation import (fid_compute, fid_update, markdown_table, mean_and_error,
                                reference_batches, report_notes)
    from tdm.images import image_grid
    from tdm.sampling import training_config

    args = build_parser().parse_args(argv)
    prompts, weights, wanted, output_dir = check_args(args)
    extractor = import_factory(args.fid_feature_extractor) if args.fid_feature_extractor else None
    config = training_config(args.weights)
    model_path = args.pretrained_model_name_or_path or config.get("pretrained_model_name_or_path",
                                                                  DEFAULT_MODEL)
    try:
        cls = backbone_class(config.get("backbone", "auto"), model_path)
    except (OSError, ValueError) as error:
        raise model_error("--pretrained_model_name_or_path", model_path, error) from None
    if cls.is_video or not cls.pipeline_class_names:
        raise UsageError(f"eval_tdm.py scores text-to-image pipelines; {cls.name} is not one")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = inference_dtype(args.dtype, device)
    status, scorers, fid = metric_models(args, wanted, len(prompts), extractor, device)
    fid_reference = args.reference_dir or "teacher"

    timesteps = sampling_timesteps(args.num_inference_steps, config, args.timesteps)
    pipe, backbone = student_pipeline(model_path, weights, args.lora_scale, dtype, device,
                                      config.get("backbone", "auto"), config.get("backbone_options"),
                                      num_steps=len(timesteps),
                                      student_guidance=config.get("student_guidance"),
                                      sizes={"--height": args.height, "--width": args.width})
    if config.get("max_sequence_length"):
        backbone.max_sequence_length = config["max_sequence_length"]
    trained_h, trained_w = (backbone.image_size(config["resolution"]) if config.get("resolution")
                            else (None, None))
    height = args.height or trained_h
    width = args.width or trained_w or height

    student_folder = export_folder(args.weights)

    # Sample and score, streaming: the student first, then the teacher in one switch.
    runs = [("student", len(timesteps))] + ([("teacher", args.teacher_steps)] if args.teacher_steps else [])
    per_image = {name: {key: [] for key in scorers} for name, _ in runs}
    grid_images = {name: [] for name, _ in runs}
    teacher_scheduler = pipe.scheduler
    progress = tqdm(total=len(prompts) * len(runs), desc="eval", unit="image")
    size = None
    for name, steps in runs:
        context = (as_teacher(pipe, backbone, weights, teacher_scheduler, dtype) if name == "teacher"
                   else contextlib.nullcontext(pipe))
        with context as model:
            for start in range(0, len(prompts), args.batch_size):
                batch = prompts[start:start + args.batch_size]
                generators = [torch.Generator("cpu").manual_seed(args.seed + start + i)
                              for i in range(len(batch))]
                if name == "student":
                    images = sample_student(model, backbone, batch, timesteps, generators,
                                            backbone.sampling_guidance(),
                                            height, width, sampler=args.sampler,
                                            flow_shift=args.flow_shift).images
                else:
                    images = model(prompt=batch, num_inference_steps=steps,
                                   guidance_scale=args.teacher_cfg, height=height, width=width,
                                   generator=generators, **backbone.pipeline_kwargs()).images
                size = images[0].size
                score_batch(scorers, status, per_image, name, images, batch)
                if name in fid:
                    fid_update(fid[name], images, real=False)
                elif name == "teacher" and "student" in fid and args.reference_dir is None:
                    fid_update(fid["student"], images, real=True)
                grid_images[name] += images[:max(0, args.grid_prompts - len(grid_images[name]))]
                if args.save_images:
                    os.makedirs(os.path.join(output_dir, name), exist_ok=True)
                    for i, image in enumerate(images):
                        image.save(os.path.join(output_dir, name, f"{start + i:05d}.png"))
                progress.update(len(batch))
    progress.close()
    if args.reference_dir and fid:   # read only where FID runs against it
        for batch in reference_batches(args.reference_dir, size, args.batch_size):
            for metric in fid.values():
                fid_update(metric, batch, real=True)

    rows = []
    labels = {"student": f"TDM {len(timesteps)} steps",
              "teacher": f"teacher {args.teacher_steps} steps, cfg {args.teacher_cfg:g}"}
    for name, steps in runs:
        row = {"model": labels[name], "steps": steps}
        for key in ("clip_score", "hpsv2", "image_reward"):
            row[key], row[f"{key}_sem"] = mean_and_error(per_image[name].get(key))
        row["fid"] = fid_compute(fid[name]) if name in fid else None
        rows.append(row)

    # Write (bad input was refused above, before anything touched the disk).
    os.makedirs(output_dir, exist_ok=True)
    result = {
        "rows": rows,
        "metrics": status,
        "fid_reference": fid_reference,
        "student": {"weights": args.weights, "kind": weights[0], "timesteps": timesteps,
                    "steps": len(timesteps), "guidance_scale": backbone.sampling_guidance(),
                    "sampler": args.sampler,
                    "lora_scale": args.lora_scale},
        "teacher": {"model": model_path, "steps": args.teacher_steps,
                    "guidance_scale": args.teacher_cfg},
        "prompts": {"source": args.prompts_file, "count": len(prompts), "texts": prompts},
        "seed": args.seed, "image_size": list(size), "dtype": str(dtype).replace("torch.", ""),
        "per_image": per_image,
    }
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    report = (f"{len(prompts)} prompts from {args.prompts_file or 'the command line'}, one image "
              f"each (prompt i from seed {args.seed} + i), {size[0]}×{size[1]} px\n\n"
              f"{markdown_table(rows, fid_reference)}\n" + "\n".join(report_notes(result)) + "\n")
    with open(os.path.join(output_dir, "metrics.md"), "w") as f:
        f.write(report)
        shown = prompts[:args.grid_prompts]
        f.write("\nsamples.png, left to right: "
                + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(shown)) + "\n")
    order = [name for name in ("teacher", "student") if name in grid_images]
    grid = image_grid([image for name in order for image in grid_images[name]], rows=len(order),
                      row_labels=[labels[name] for name in order])
    grid.save(os.path.join(output_dir, "samples.png"))
    if student_folder is not None:
        from tdm.model_card import write_model_card

        write_model_card(student_folder, backbone, config, metrics=result)
    print(report, end="")
    print(f"wrote {output_dir}/metrics.json, metrics.md, samples.png"
          + (f"; updated {student_folder}/README.md" if student_folder else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
