"""README.md model cards beside every exported student (LoRA or full), as diffusers' scripts write them.

YAML front matter, base model, step grid, guidance, how to load the student (each backbone's
`loading_snippet`), the training flags and, once eval_tdm.py has run, its metrics."""
from __future__ import annotations

import copy
import json
import os
import sys
from types import SimpleNamespace
from typing import List, Optional, Sequence

import yaml

from .lora import LORA_WEIGHT_NAME
from .sampling import student_timesteps
from .step_condition import STEP_EMBEDDING_NAME

EXAMPLE_PROMPT = "a red fox in fresh snow"
CARD_NAME = "README.md"
# scheduler settings written out even where they equal the defaults, which may change
ALWAYS_SHOWN = ("algorithm_type", "solver_order", "final_sigmas_type")


# -- loading snippets ---------------------------------------------------------------------------
def training_grid_scheduler(backbone, timesteps: Sequence[int]):
    """(scheduler class name, from_config overrides, pipeline-call kwargs) that
    `backbone.use_training_grid` puts on the pipeline's own scheduler: the overrides are the
    config values that differ from a plain `from_config` of the pipeline's scheduler config."""
    import diffusers

    kw = backbone._load_kwargs()
    index = diffusers.DiffusionPipeline.load_config(backbone.model_path, **kw)
    original = getattr(diffusers, index["scheduler"][1]).from_pretrained(
        backbone.model_path, subfolder="scheduler", **kw)
    holder = SimpleNamespace(scheduler=original)
    call = backbone.use_training_grid(holder, list(timesteps))
    new = holder.scheduler
    plain = type(new).from_config(original.config)
    overrides = {k: v for k, v in new.config.items()
                 if not k.startswith("_") and (k in ALWAYS_SHOWN or _plain(plain.config.get(k)) != _plain(v))}
    return type(new).__name__, overrides, call


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _kwargs(values: dict) -> str:
    return ", ".join(f"{k}={_literal(v)}" for k, v in values.items())


def _literal(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(round(value, 10))
    return repr(value)


def model_location(name_or_path: str) -> str:
    """A hub id as it is; a local folder or file as an absolute path (a snippet runs from any
    folder)."""
    return os.path.abspath(name_or_path) if os.path.exists(name_or_path) else name_or_path


def diffusers_snippet(backbone, weights_kind: str, student_location: str, timesteps: Sequence[int],
                      load_lines: Optional[List[str]] = None, imports: Sequence[str] = (),
                      num_frames: Optional[int] = None) -> str:
    """Python that loads the student in plain diffusers and samples it on its training grid.

    Default loading: `pipeline_class_names[0].from_pretrained` with `load_lora_weights` (adapter
    "tdm", scale 1) for a LoRA, or the denoiser class of the base's model_index.json as a component
    for a full student; `load_lines` replaces it (a family whose pipeline lacks a LoRA loader).
    The scheduler line and the call's grid argument are what `backbone.use_training_grid` does;
    the size, text length and guidance are the backbone's (card_backbone: the run's), the frames
    `num_frames` (None: the family's default)."""
    import diffusers

    kw = backbone._load_kwargs()
    pipeline = backbone.pipeline_class_names[0]
    scheduler, overrides, call = training_grid_scheduler(backbone, timesteps)
    names = [pipeline, scheduler]
    extra = "".join(f", {k}={v!r}" for k, v in (("revision", backbone.revision),
                                                 ("variant", backbone.variant)) if v)
    sub = backbone.denoiser_subfolder
    if load_lines is None:
        if weights_kind == "lora":
            safetensors = ", use_safetensors=True" if student_location.endswith(".safetensors") else ""
            load_lines = [
                f"pipe = {pipeline}.from_pretrained(base, dtype=dtype{extra}).to(device)",
                f"pipe.load_lora_weights({student_location!r}, adapter_name=\"tdm\"{safetensors})",
                "pipe.set_adapters([\"tdm\"], [1.0])   # LoRA scale",
            ]
        else:
            index = diffusers.DiffusionPipeline.load_config(backbone.model_path, **kw)
            denoiser = index[sub][1]
            names.append(denoiser)
            load_lines = [
                f"{sub} = {denoiser}.from_pretrained({student_location!r}, dtype=dtype)",
                f"pipe = {pipeline}.from_pretrained(base, {sub}={sub}, dtype=dtype{extra}).to(device)",
            ]
    call_args = dict(call)
    if backbone.resolution:
        height, width = backbone.image_size(backbone.resolution)
        call_args.update(height=height, width=width)
    call_args.update(backbone.pipeline_kwargs(num_frames))
    output = "frames[0]" if backbone.is_video else "images[0]"
    lines = ["import torch", f"from diffusers import {', '.join(sorted(set(names)))}", *imports, "",
             "device, dtype = (\"cuda\", torch.float16) if torch.cuda.is_available() else "
             "(\"cpu\", torch.float32)",
             f"base = {model_location(backbone.model_path)!r}", *load_lines,
             f"pipe.scheduler = {scheduler}.from_config(pipe.scheduler.config"
             + (f", {_kwargs(overrides)}" if overrides else "") + ")",
             f"{'frames' if backbone.is_video else 'image'} = pipe({EXAMPLE_PROMPT!r}, "
             f"guidance_scale={backbone.sampling_guidance():g}, "
             f"{_kwargs(call_args)},",
             f"             generator=torch.Generator(\"cpu\").manual_seed(0)).{output}"]
    return "\n".join(lines) + "\n"


def step_embedding_lines(denoiser_attr: str, path: str, num_steps: int) -> List[str]:
    """Lines that apply a TDM-unify step embedding (needs this repository on the path)."""
    return ["from tdm.step_condition import apply_step_embedding   # from this repository",
            f"apply_step_embedding(pipe.{denoiser_attr}, {path!r}, num_steps={num_steps})"]


# -- the card -----------------------------------------------------------------------------------
def student_export(folder: str, backbone) -> tuple:
    """("lora" | "full", location) of the student exported in `folder`."""
    lora = os.path.join(folder, LORA_WEIGHT_NAME)
    if os.path.isfile(lora):
        return "lora", lora
    return "full", os.path.join(folder, backbone.denoiser_subfolder)


def _values(args) -> dict:
    values = dict(args) if isinstance(args, dict) else dict(vars(args))
    values = {k: v for k, v in values.items() if not k.startswith("_") and k != "config"}
    return json.loads(json.dumps(values, default=str))   # plain YAML types only


def card_backbone(backbone, values: dict):
    """A copy of `backbone` set up as the run was, from its config alone: resolution, text length
    and guidance (--guidance_embedding, --student_guidance), so that the card samples as trained
    whatever state the caller's adapter is in."""
    card = copy.copy(backbone)
    card.resolution = values.get("resolution") or backbone.resolution
    if values.get("max_sequence_length"):
        card.max_sequence_length = values["max_sequence_length"]
    card.set_guidance(values.get("guidance_embedding"), values.get("student_guidance"))
    return card


def write_model_card(folder: str, backbone, args, metrics: Optional[dict] = None) -> str:
    """Write `folder`/README.md for the student exported there; returns its path.

    `args`: the run's config (train_tdm's resolved flags, or config.yaml as a dict): every sampling
    argument of the card (grid, size, frames, text length, guidance) is taken from it. `metrics`:
    eval_tdm.py's result (metrics.json), shown as a table; a later call without metrics keeps the
    metrics section of an existing card."""
    values = _values(args)
    backbone = card_backbone(backbone, values)
    kind, location = student_export(folder, backbone)
    location = os.path.abspath(location)
    timesteps = list(values.get("timesteps") or student_timesteps(values.get("num_steps") or 4, values))
    base = values.get("pretrained_model_name_or_path", backbone.model_path)
    family = backbone.name
    task = (["text-to-video" if backbone.is_video else "text-to-image", "diffusers"]
            if backbone.pipeline_class_names else [])   # the toy is no diffusers pipeline
    tags = task + ["tdm", "distillation", family] + (["lora"] if kind == "lora" else [])
    front = {"base_model": base, "library_name": "diffusers" if backbone.pipeline_class_names else None,
             "tags": tags}
    if values.get("license"):
        front["license"] = values["license"]
    front = {k: v for k, v in front.items() if v is not None}
    try:
        snippet = backbone.loading_snippet(kind, location, timesteps, values.get("num_frames"))
    except Exception as error:   # the export is written: a card without a snippet beats a crash
        print(f"warning: no loading snippet in the model card: {type(error).__name__}: {error}",
              file=sys.stderr)
        reason = (str(error).strip().split("\n") or [""])[0]
        snippet = f"# no snippet: {type(error).__name__}: {reason}\n"
    step_file = os.path.join(os.path.dirname(location) if kind == "lora" else location,
                             STEP_EMBEDDING_NAME)
    if os.path.isfile(step_file) and backbone.pipeline_class_names:
        lines = snippet.rstrip("\n").split("\n")
        at = max((i for i, line in enumerate(lines) if line.startswith(("image = ", "frames = "))),
                 default=len(lines))
        lines[at:at] = step_embedding_lines(backbone.denoiser_subfolder, step_file, len(timesteps))
        snippet = "\n".join(lines) + "\n"
    unify = values.get("unify_steps")
    summary = [
        ("base model (teacher)", f"`{base}`"),
        ("family", family),
        ("student", "LoRA (diffusers format, `" + LORA_WEIGHT_NAME + "`)" if kind == "lora"
         else f"full `{backbone.denoiser_subfolder}/` model folder"),
        ("sampling steps", str(len(timesteps)) + (f" (also {', '.join(map(str, unify))}: TDM-unify)"
                                                   if unify else "")),
        ("step grid (timesteps)", ", ".join(map(str, timesteps))),
        ("guidance", f"{backbone.sampling_guidance():g} (the student uses no CFG); the teacher's "
         + (f"guidance input in training: {values.get('cfg')}" if backbone.guidance_embedding
            else f"CFG in training: {values.get('cfg')}")),
        ("sampler", "the snippet's stock scheduler on the training grid (= the training rollout)"
         if backbone.pipeline_class_names else "the training rollout"),
    ]
    if backbone.pipeline_class_names and backbone.resolution:
        frames = backbone.pipeline_kwargs(values.get("num_frames")).get("num_frames")
        summary.append(("sample size", "{}×{} px".format(*backbone.image_size(backbone.resolution))
                        + (f", {frames} frames" if frames else "")))
    for key, label in (("train_mode", "training mode"), ("max_train_steps", "iterations"),
                       ("train_batch_size", "batch size per process"),
                       ("learning_rate", "learning rate (fake score)"),
                       ("generator_lr_ratio", "student learning-rate ratio"),
                       ("lora_rank", "LoRA rank"), ("resolution", "resolution"),
                       ("mixed_precision", "mixed precision")):
        if values.get(key) is not None and (key != "lora_rank" or kind == "lora"):
            summary.append((label, f"{values[key]}"))
    parts = ["---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n",
             f"# TDM student of {base}\n",
             "A few-step student distilled with Trajectory Distribution Matching (Luo et al., "
             "*Learning Few-Step Diffusion Models by Trajectory Distribution Matching*, ICCV 2025, "
             "arXiv 2503.06674) by this repository's `train_tdm.py`, from prompts only.\n",
             "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in summary),
             "## Use it\n",
             ("```python\n" + snippet + "```\n"),
             "Paths are where the run wrote the files: after uploading, put the repository id (and "
             "`weight_name=`) in their place.\n"]
    if kind == "lora" and backbone.pipeline_class_names:
        parts.append(f"`pipe.{backbone.denoiser_subfolder}.disable_adapters()` gives back the teacher, "
                     "to be sampled with its own scheduler and CFG.\n")
    card_path = os.path.join(folder, CARD_NAME)
    metrics_section = _metrics_section(metrics) if metrics else _existing_section(card_path, "## Metrics")
    if metrics_section:
        parts.append(metrics_section)
    flags = yaml.safe_dump(values, sort_keys=False)
    parts.append("## Training flags\n\nAs resolved by `train_tdm.py` (also in `config.yaml`):\n\n"
                 "```yaml\n" + flags + "```\n")
    with open(card_path, "w") as f:
        f.write("\n".join(parts))
    return card_path


def _metrics_section(result: dict) -> str:
    from .evaluation import markdown_table, report_notes

    prompts = result.get("prompts", {})
    teacher = result.get("teacher", {})
    lines = ["## Metrics\n",
             f"`eval_tdm.py`: {prompts.get('count')} prompts from `{prompts.get('source')}`, seed "
             f"{result.get('seed')}, teacher {teacher.get('steps')} steps with CFG "
             f"{teacher.get('guidance_scale')}, CLIP "
             f"`{result.get('metrics', {}).get('clip_score', {}).get('model', '–')}`.\n",
             markdown_table(result["rows"], result.get("fid_reference", "teacher")),
             "\n".join(report_notes(result)) + "\n"]
    return "\n".join(lines)


def _existing_section(path: str, heading: str) -> Optional[str]:
    """The section starting at `heading` of an existing card, up to the next `## `."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read()
    start = text.find("\n" + heading)
    if start < 0:
        return None
    end = text.find("\n## ", start + 1)
    return text[start + 1:end + 1 if end >= 0 else len(text)]
