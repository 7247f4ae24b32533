"""Backbone adapters, one per model family; `load_backbone` picks one from model_index.json."""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
from typing import Optional

from ..checks import UsageError, did_you_mean, model_error
from .base import Backbone, Denoiser


def _discover() -> dict:
    """Every Backbone subclass with a name in this package: a new family is one new file."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found, todo = {}, list(Backbone.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.name:
            found[cls.name] = cls
    return dict(sorted(found.items()))


BACKBONES = _discover()


def pipeline_class_name(model_path: str, revision: Optional[str] = None) -> str:
    if not os.path.exists(model_path) and (os.path.isabs(model_path) or model_path.startswith(".")):
        raise FileNotFoundError(f"no such folder {model_path}")
    if os.path.isdir(model_path):
        index = os.path.join(model_path, "model_index.json")
        if not os.path.isfile(index):
            raise FileNotFoundError(f"{model_path} is not a diffusers pipeline folder "
                                    "(no model_index.json)")
        with open(index) as f:
            return json.load(f)["_class_name"]
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(model_path, revision=revision)["_class_name"]


def backbone_class(name: str, model_path: str, revision: Optional[str] = None):
    if name != "auto":
        if name not in BACKBONES:
            raise ValueError(f"--backbone {name!r} is not one of {', '.join(BACKBONES)}"
                             f"{did_you_mean(name, BACKBONES)}")
        return BACKBONES[name]
    pipeline = pipeline_class_name(model_path, revision)
    for cls in BACKBONES.values():
        if pipeline in cls.pipeline_class_names:
            return cls
    raise ValueError(f"no backbone adapter for {pipeline}; pass --backbone, one of "
                     f"{', '.join(BACKBONES)}")


def load_backbone(model_path: str, name: str = "auto", revision: Optional[str] = None,
                  variant: Optional[str] = None, options: Optional[dict] = None,
                  resolution: Optional[int] = None) -> Backbone:
    """The adapter of a model folder or hub id; `resolution` is the training --resolution
    (what SDXL's time ids hold), None for the model's own default."""
    cls = backbone_class(name, model_path, revision)
    return cls(model_path, revision=revision, variant=variant, options=options, resolution=resolution)


def load_for_training(args, grid) -> Backbone:
    """The backbone of --pretrained_model_name_or_path, refused in one line where the flags do not
    fit it; its `guidance_embedding` resolved from --guidance_embedding (docs/method.md §5.1)."""
    try:
        backbone = load_backbone(args.pretrained_model_name_or_path, args.backbone, args.revision,
                                 args.variant, args.backbone_options, args.resolution)
    except (OSError, ValueError, KeyError) as error:   # missing, not a pipeline, unreachable
        raise model_error("--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
                          error) from None
    try:
        backbone.check_fit(args)
        backbone.set_guidance(args.guidance_embedding, args.student_guidance)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.export_format == "kohya" and (args.train_mode != "lora" or backbone.lora_prefix != "unet"):
        raise UsageError("--export_format kohya needs --train_mode lora on a UNet backbone (SD1.x, SDXL)")
    if args.max_sequence_length:
        backbone.max_sequence_length = args.max_sequence_length
    if grid.timesteps[0] >= backbone.path.num_timesteps:
        raise UsageError(f"--timesteps/--total_steps: first step {grid.timesteps[0]} is outside the "
                         f"scheduler's range 0..{backbone.path.num_timesteps - 1}")
    return backbone


__all__ = ["Backbone", "Denoiser", "BACKBONES", "load_backbone", "load_for_training",
           "pipeline_class_name"]
