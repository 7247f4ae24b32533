"""Command-line flags of train_tdm.py; a YAML --config supplies defaults, the command line wins.

Flag names follow the upstream TDM demo and the diffusers training examples.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional

import yaml

from .checks import (Choice, Number, Parser, Switch, UsageError, check_values, check_writable_folder,
                     choice, did_you_mean, flag_error, yaml_value)
from .losses import StudentLoss

DEFAULT_MODEL = "PixArt-alpha/PixArt-XL-2-512x512"
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


# --guidance_embedding → Backbone.set_guidance's choice (None: the family's default, resolved by the
# backbone); YAML's booleans and null (on/off, a resolved config.yaml) are read as these names
GUIDANCE_EMBEDDING = {"auto": None, "on": True, "off": False}


def int_list(text) -> List[int]:
    """'999,856' or a YAML list → [999, 856]; anything but whole numbers is refused."""
    items = text if isinstance(text, (list, tuple)) else [
        v for v in str(text).replace(" ", "").split(",") if v]
    for item in items:
        whole = isinstance(item, int) and not isinstance(item, bool)
        if not (whole or (isinstance(item, str) and re.fullmatch(r"[+-]?\d+", item))):
            raise argparse.ArgumentTypeError(f"must be whole numbers, got {item!r}")
    return [int(v) for v in items]


def lr_scheduler_names() -> List[str]:
    """diffusers' get_scheduler names that need no flag this script lacks (piecewise_constant
    needs step rules)."""
    from diffusers.optimization import SchedulerType

    return [kind.value for kind in SchedulerType if kind is not SchedulerType.PIECEWISE_CONSTANT]


def tracker_names() -> List[str]:
    """accelerate's trackers, `all` (every installed one) and `none`."""
    from accelerate.utils import LoggerType

    return [kind.value for kind in LoggerType if kind is not LoggerType.ALL] + ["all", "none"]


def check_tracker_installed(name: str) -> None:
    if name in ("all", "none"):
        return
    from accelerate.tracking import get_available_trackers

    if name not in [str(getattr(t, "value", t)) for t in get_available_trackers()]:
        raise UsageError(f"--report_to {name}: the {name} package is not installed; install it "
                         "or use --report_to none")


def yaml_mapping(text):
    if text is None or isinstance(text, dict):
        return text
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping, got {text!r}")
    return value


SEED = Number(int, low=0, high=2**32 - 1)   # numpy's seed range (accelerate's set_seed seeds numpy)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Trajectory Distribution Matching: distil a diffusion "
                                "model into a few-step student from prompts alone.")
    a = p.add_argument
    a("--config", default=None, help="YAML file whose keys are these flag names.")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL,
                   help="Teacher pipeline: hub id or local diffusers folder.")
    g.add_argument("--revision", default=None, help="Hub revision of the teacher.")
    g.add_argument("--variant", default=None, help="Weight variant of the teacher, e.g. fp16.")
    g.add_argument("--backbone", default="auto", help="Backbone adapter; auto reads model_index.json.")
    g.add_argument("--backbone_options", type=yaml_mapping, default=None,
                   help="Adapter-specific options as a YAML/JSON mapping (e.g. the toy mixture).")
    g.add_argument("--train_mode", **choice("lora", "full"), default="lora",
                   help="lora: student and fake score are LoRAs on the frozen teacher; full: "
                   "full copies initialised from the teacher (the authors' PixArt-α demo "
                   "command).")
    g.add_argument("--lora_rank", type=Number(int, low=1), default=64,
                   help="LoRA rank of student and fake score.")
    g.add_argument("--lora_alpha", type=Number(float, above=0), default=None,
                   help="Default: equal to --lora_rank.")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute activations in backward to save memory.")
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the networks.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="Use xformers attention if installed (else a warning and PyTorch SDPA).")
    g = p.add_argument_group("TDM")
    g.add_argument("--num_steps", type=Number(int, low=1), default=4,
                   help="K, the student's number of steps.")
    g.add_argument("--total_steps", type=Number(int, low=1), default=900,
                   help="T: grid τ_k = k·T/K − 1 (900 → 899, 674, 449, 224).")
    g.add_argument("--timesteps", type=int_list, default=None,
                   help="Explicit grid, first step first, e.g. 999,856,665,399.")
    g.add_argument("--unify_steps", type=int_list, default=None,
                   help="TDM-unify: step counts to train one student for, e.g. 1,2,4 (K drawn per "
                   "iteration, grid k·T/K − 1 per K; student and fake score conditioned on K).")
    g.add_argument("--fake_step_condition", action="store_true",
                   help="Condition the fake score on the step index k (advised in mode 2).")
    g.add_argument("--cfg", type=Number(float, above=0, hint=" (1 disables guidance)"), default=4.5,
                   help="Teacher guidance scale in the target.")
    g.add_argument("--guidance_embedding", default="auto", choices=tuple(GUIDANCE_EMBEDDING),
                   type=Choice(tuple(GUIDANCE_EMBEDDING),   # YAML reads on/off as booleans
                               yaml_values={None: "auto", True: "on", False: "off"}),
                   help="How the teacher is guided: through its guidance embedding, one call with "
                   "--cfg as input (guidance-distilled models: FLUX.1-dev), or by classifier-free "
                   "guidance; auto: the embedding where the model has one.")
    g.add_argument("--student_guidance", type=Number(float, low=0), default=None,
                   help="Guidance-embedded models: the fixed guidance input of student and fake "
                   "score, and the guidance_scale to sample the student with (default 1.0).")
    g.add_argument("--use_separate", action="store_true",
                   help="Mode 1: each step's diffusion interval is its own.")
    g.add_argument("--use_randmid", action="store_true", help="Random end point of the ODE move.")
    g.add_argument("--use_huber", action="store_true", help="Element-wise pseudo-Huber (c=1e-3).")
    g.add_argument("--loss", **choice(*StudentLoss.kinds), default=None,
                   help="Generator loss; default mse, or huber with --use_huber. huber_norm is "
                   "the paper's norm-level pseudo-Huber.")
    g.add_argument("--share_step_draw", action="store_true",
                   help="One step index k per sample for both updates (shallower rollouts).")
    g.add_argument("--full_rollout", action="store_true",
                   help="Roll every sample out to the last step (reference for the lazy rollout).")
    g.add_argument("--importance_weight", action=Switch, default=True,
                   help="w_IS in the fake-score loss; --no_importance_weight: w_IS = 1 (ablation).")
    g.add_argument("--snr_gamma", type=Number(float, above=0), default=5.0,
                   help="γ of the min-SNR-γ fake-score weight.")
    g = p.add_argument_group("data")
    g.add_argument("--prompts", default=os.path.join(ASSETS, "prompts.txt"),
                   help=".txt (one prompt a line), .jsonl/.json/.csv/.parquet, a dataset folder "
                   "or a datasets hub id.")
    g.add_argument("--caption_column", default=None,
                   help="Column of the prompts; default: the first of prompt, caption, text.")
    g.add_argument("--cache_text_embeddings", action="store_true",
                   help="Encode every prompt once into a safetensors cache, then move the text "
                   "encoder off the accelerator.")
    g.add_argument("--text_embeddings_dir", default=None,
                   help="Folder of the cache; default: OUTPUT_DIR/text_embeddings.")
    g.add_argument("--resolution", type=Number(int, low=1), default=512,
                   help="Image size of the student samples.")
    g.add_argument("--num_frames", type=Number(int, low=1), default=None,
                   help="Frames of a video sample (video backbones); default: the backbone's.")
    g.add_argument("--max_sequence_length", type=Number(int, low=1), default=None,
                   help="Text tokens; default: the backbone's (PixArt: 120).")
    g.add_argument("--dataloader_num_workers", type=Number(int, low=0), default=0,
                   help="Prompt loader workers.")
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=Number(int, low=1), default=2, help="Per device.")
    g.add_argument("--gradient_accumulation_steps", type=Number(int, low=1), default=1,
                   help="Iterations per optimiser step (both networks).")
    g.add_argument("--max_train_steps", type=Number(int, low=1), default=500,
                   help="Optimiser steps (the paper: 500 for PixArt-α; the authors' PixArt-α demo "
                   "command: 10001).")
    g.add_argument("--learning_rate", type=Number(float, above=0), default=2e-5,
                   help="Fake-score lr; the student's is learning_rate × --generator_lr_ratio.")
    g.add_argument("--generator_lr_ratio", type=Number(float, above=0), default=0.2,
                   help="Generator lr = learning_rate × this (the authors' demo command: 1/5).")
    g.add_argument("--fake_score_updates", type=Number(int, low=1), default=1,
                   help="Fake-score updates per student update, each on a fresh rollout and draw "
                   "(two time-scale updates: ψ follows θ more closely; docs/method.md §4).")
    g.add_argument("--lr_scheduler", type=Choice(lr_scheduler_names), default="constant",
                   help="diffusers get_scheduler name; applies to the student only.")
    g.add_argument("--lr_warmup_steps", type=Number(int, low=0), default=0,
                   help="Generator LR warm-up steps.")
    g.add_argument("--lr_num_cycles", type=Number(int, low=1), default=1,
                   help="Cycles of cosine_with_restarts.")
    g.add_argument("--lr_power", type=Number(float, above=0), default=1.0,
                   help="Power of the polynomial schedule.")
    g.add_argument("--adam_beta1", type=Number(float, low=0, below=1), default=0.0,
                   help="AdamW β1 of both optimisers.")
    g.add_argument("--adam_beta2", type=Number(float, low=0, below=1), default=0.95,
                   help="AdamW β2 of both optimisers.")
    g.add_argument("--adam_weight_decay", type=Number(float, low=0), default=1e-2,
                   help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=Number(float, above=0), default=1e-8, help="AdamW ε.")
    g.add_argument("--max_grad_norm", type=Number(float, low=0), default=1.0,
                   help="Gradient clipping of the student (0 disables).")
    g.add_argument("--use_8bit_adam", action="store_true",
                   help="bitsandbytes AdamW8bit for both (GPU; pip install bitsandbytes).")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer.")
    g.add_argument("--mixed_precision", **choice("no", "fp16", "bf16"), default=None,
                   help="Default: as accelerate is configured.")
    g.add_argument("--use_ema", action="store_true",
                   help="Keep an exponential moving average of the student (validation samples "
                   "use it; see --export_ema).")
    g.add_argument("--ema_decay", type=Number(float, low=0, below=1), default=0.999,
                   help="EMA decay per step.")
    g.add_argument("--ema_start_step", type=Number(int, low=0), default=0,
                   help="The EMA copies the student until this step, then averages.")
    g.add_argument("--export_ema", action="store_true",
                   help="Export the EMA of the student instead of its last weights (needs --use_ema).")
    g.add_argument("--max_nonfinite", type=Number(int, low=1), default=10,
                   help="Stop (with a checkpoint) after this many iterations in a row whose losses "
                   "or gradients were not finite; such updates are skipped.")
    g.add_argument("--ddp_timeout", type=Number(int, above=0), default=1800,
                   help="Seconds a collective operation (several processes) may wait for the other "
                   "processes before this one stops with an error instead of hanging.")
    g.add_argument("--seed", type=SEED, default=None,
                   help="Seed of initialisation, data order and noise.")
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", default="tdm-output",
                   help="Checkpoints, samples/, logs, config.yaml and the exported student.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Start a new run in an --output_dir that holds another run's checkpoints or "
                   "export: that run's checkpoints, export, samples, logs and config are deleted, "
                   "once every check has passed.")
    g.add_argument("--export_format", **choice("diffusers", "kohya"), default="diffusers",
                   help="LoRA export; kohya also writes pytorch_lora_weights_kohya.safetensors "
                   "(UNet families SD1.x/SDXL, --train_mode lora).")
    g.add_argument("--logging_dir", default="logs", help="Tracker folder inside --output_dir.")
    g.add_argument("--report_to", type=Choice(tracker_names), default="tensorboard",
                   help="tensorboard, wandb, all or none.")
    g.add_argument("--tracker_project_name", default="tdm", help="Run name for the tracker.")
    g.add_argument("--checkpointing_steps", type=Number(int, low=0), default=500,
                   help="Save checkpoint-N/ every N steps (0 disables).")
    g.add_argument("--checkpoints_total_limit", type=Number(int, low=1), default=None,
                   help="Keep at most this many checkpoints (oldest deleted first).")
    g.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder or `latest`.")
    g.add_argument("--validation_steps", type=Number(int, low=0), default=100,
                   help="Write a K-step sample grid every N steps (0 disables).")
    g.add_argument("--validation_prompts", nargs="+", default=None,
                   help="Prompts of the validation grid; default: the first four lines of "
                   "assets/validation_prompts.txt.")
    g.add_argument("--validation_teacher_steps", type=Number(int, low=0), default=25,
                   help="At each validation, compare the student's samples with the teacher's "
                   "DDIM samples of this many steps from the same noise and prompts (computed "
                   "once): val_teacher_mad_k{K} in train_log.jsonl; 0 disables.")
    g.add_argument("--log_prompts", action="store_true",
                   help="Write every rank's prompts of each step to OUTPUT_DIR/train_log.jsonl.")
    g.add_argument("--validation_seed", type=SEED, default=0, help="Seed of the validation noise.")
    return p


def _explicit_flags(parser: argparse.ArgumentParser, argv: List[str]) -> set:
    return {a.dest for a in parser._actions
            if any(opt == arg or arg.startswith(opt + "=") for opt in a.option_strings for arg in argv)}


def load_yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """The flags of a YAML file, each converted and checked as on the command line."""
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise UsageError(f"--config {path}: not a readable YAML file ({first_line})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    flags = {option[2:]: a for a in parser._actions if a.dest != "help"
             for option in a.option_strings if option.startswith("--")}   # a key is a flag's name
    converted = {}
    for key, value in values.items():
        if key not in flags:
            raise UsageError(f"--config {path}: unknown key {key!r}{did_you_mean(key, flags)}")
        action = flags[key]
        try:
            value = yaml_value(action, value)
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"--config {path}: {flag_error(f'key {key!r}', error)}") from None
        negative = isinstance(action, Switch) and action.negative(f"--{key}")   # no_name: true
        converted[action.dest] = not value if negative else value
    return converted


class RunConfig(argparse.Namespace):
    """Every flag and every derived value of a run (loss, step grid, K, validation prompts),
    resolved once by `parse_args` and read-only afterwards: nothing downstream rewrites it."""

    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"the run config is read-only ({name}); derive values in "
                                 "tdm.config.resolve or use RunConfig.replace")
        super().__setattr__(name, value)

    def replace(self, **changes) -> "RunConfig":
        """A variant of this run: the same flags with `changes` applied (flag names → values),
        checked and resolved anew, so derived values (grid, K …) follow the changed flags."""
        unknown = set(changes) - set(self._flags)
        if unknown:
            raise ValueError(f"not flags: {sorted(unknown)}")
        return _resolved(RunConfig(**{**self._flags, **changes}), self._explicit | set(changes))


def _resolved(args: RunConfig, given: set) -> RunConfig:
    """Check the flags, derive every value once, and freeze; the flags as given are kept for
    `replace`."""
    flags = dict(vars(args))
    check_args(args, given)
    resolve(args)
    args._flags, args._explicit = flags, frozenset(given)
    object.__setattr__(args, "_frozen", True)
    return args


def parse_args(argv: Optional[List[str]] = None) -> RunConfig:
    """Flags (a YAML --config supplies defaults, the command line wins) → checked → resolved
    into the run config."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv, namespace=RunConfig())
    given = _explicit_flags(parser, argv)
    if args.config:
        yaml_values = load_yaml_defaults(parser, args.config)
        given |= set(yaml_values)
        parser.set_defaults(**yaml_values)
        args = parser.parse_args(argv, namespace=RunConfig())  # command-line flags win over the YAML
    return _resolved(args, given)


def resolve(args) -> None:
    """The derived values, each computed here once: loss kind, LoRA alpha, K and the step grid
    (explicit --timesteps, or k·T/K − 1; TDM-unify: the deepest K), validation prompts."""
    args.guidance_embedding = GUIDANCE_EMBEDDING[args.guidance_embedding]   # Backbone.set_guidance's
    if args.loss is None:
        args.loss = "huber" if args.use_huber else "mse"
    if args.lora_alpha is None:
        args.lora_alpha = float(args.lora_rank)
    if args.unify_steps:
        args.unify_steps = sorted(args.unify_steps)
        args.num_steps = max(args.unify_steps)   # the default grid (validation, inference) is the deepest
    if args.timesteps:
        args.num_steps = len(args.timesteps)
    args.timesteps = step_timesteps(args)
    if args.validation_prompts is None:
        from .data import load_prompts

        args.validation_prompts = load_prompts(os.path.join(ASSETS, "validation_prompts.txt"))[:4]


def step_timesteps(args) -> List[int]:
    if args.timesteps:
        return list(args.timesteps)
    from .trajectory import StepGrid

    return StepGrid.uniform(args.num_steps, args.total_steps).timesteps


def check_args(args, given=()) -> None:
    """Refuse bad flag values (UsageError, one line); changes nothing. `given`: the flags set
    explicitly (command line or YAML). Each flag's own range and names are its type's (tdm.checks),
    checked again here for values set in code; this adds what involves several flags."""
    check_values(args, build_parser())
    check_tracker_installed(args.report_to)
    num_steps = args.num_steps
    if args.unify_steps:
        ks = args.unify_steps
        if args.timesteps:
            raise UsageError("--unify_steps uses a grid k·T/K − 1 per K on --total_steps; "
                             "drop --timesteps")
        if min(ks) < 1 or len(set(ks)) != len(ks):
            raise UsageError(f"--unify_steps must be distinct step counts >= 1, got {ks}")
        num_steps = max(ks)
    if args.timesteps:
        ts = args.timesteps
        if any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 0:
            raise UsageError(f"--timesteps must be strictly decreasing and >= 0, got {ts}")
        if len(ts) != args.num_steps and "num_steps" in given:
            raise UsageError(f"--timesteps has {len(ts)} steps but --num_steps is {args.num_steps}")
    elif args.total_steps < num_steps:
        raise UsageError(f"--total_steps ({args.total_steps}) must be >= --num_steps ({num_steps})")
    if args.fake_score_updates > 1 and args.gradient_accumulation_steps > 1:
        raise UsageError("--fake_score_updates > 1 steps the fake score several times per iteration; "
                         "it cannot accumulate gradients: drop --gradient_accumulation_steps")
    if args.export_ema and not args.use_ema:
        raise UsageError("--export_ema needs --use_ema")
    if args.overwrite_output_dir and args.resume_from_checkpoint == "latest":
        raise UsageError("--overwrite_output_dir starts a new run, --resume_from_checkpoint latest "
                         "continues one; drop one of the two flags")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest" \
            and not os.path.isdir(args.resume_from_checkpoint):
        raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder "
                         "(give a checkpoint-N folder or `latest`)")


def check_output_dir(output_dir: str) -> None:
    """Fail now, not after hours of training, if outputs cannot be written (creates nothing)."""
    check_writable_folder("--output_dir", output_dir)


def check_distributed(distributed_type: str, train_mode: str, use_ema: bool = False) -> None:
    """Strategies the two-network loop runs under: DDP (lora/full) and FSDP (full only)."""
    if distributed_type == "DEEPSPEED":
        raise UsageError("DeepSpeed is not supported: TDM trains two networks with two optimisers and "
                         "accelerate drives DeepSpeed through one engine; for sharding use "
                         "--config_file configs/accelerate/fsdp.yaml with --train_mode full")
    if distributed_type == "FSDP" and train_mode != "full":
        raise UsageError("FSDP shards full fine-tunes only: use --train_mode full, or launch LoRA "
                         "training without the FSDP config (LoRA keeps one frozen base per GPU)")
    if distributed_type == "FSDP" and use_ema:
        raise UsageError("--use_ema is not supported under FSDP (each rank holds a shard of the "
                         "student); drop --use_ema or train without the FSDP config")


def check_fsdp_launch(environ=os.environ) -> None:
    """Before the Accelerator is built: an FSDP launch config this loop cannot run is one line,
    not accelerate's traceback (CPU processes) or a silent fallback to plain DDP."""
    if environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("1", "true"):
        return
    import torch

    accelerator = getattr(torch, "accelerator", None)   # CUDA, XPU, NPU, … (torch ≥ 2.6)
    has_device = accelerator.is_available() if accelerator else torch.cuda.is_available()
    if environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not has_device:
        raise UsageError("the FSDP launch config needs GPUs (accelerate runs no FSDP on CPU "
                         "processes); launch without --config_file configs/accelerate/fsdp.yaml")
    if environ.get("FSDP_VERSION", "1") != "1":
        raise UsageError("fsdp_version 2 is not supported (it needs each model prepared together "
                         "with its optimiser; TDM prepares both networks first): use fsdp_version: 1 "
                         "as in configs/accelerate/fsdp.yaml")


def check_8bit_adam() -> None:
    try:
        import bitsandbytes as bnb

        bnb.optim.AdamW8bit  # noqa: B018
    except Exception as error:  # ImportError, or a build without optimisers for this machine
        raise UsageError(f"--use_8bit_adam: bitsandbytes cannot run here ({error}); install a "
                         "bitsandbytes build for this machine or drop the flag") from None


def save_resolved_config(args, path: str) -> None:
    """config.yaml of a run: every flag and derived value, written once at the start."""
    values = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "config"}
    with open(path, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)
