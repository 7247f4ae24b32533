"""Backbone adapters, one per model family; `load_backbone` picks one from model_index.json."""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
from typing import Optional

from ..checks import did_you_mean
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


__all__ = ["Backbone", "Denoiser", "BACKBONES", "load_backbone", "pipeline_class_name"]
