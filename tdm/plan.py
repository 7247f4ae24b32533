"""Plan a run before launching it: peak GPU memory by kind, FLOPs and forward rows of one iteration.

The family's networks are built at full size without weights on a simulated accelerator
(tdm.simulate: fake tensors, from the configs of the model folder, or of the published model
in tdm/published/ when the hub id is one of them), and `train_tdm.build` + `train_tdm.tdm_iteration`
run on them unchanged: the same networks, dtypes, autocast, LoRA, checkpointing and rollout as
training. Memory is what CUDA's max_memory_allocated would count: live tensors on the device,
each rounded to the allocator's 512-byte blocks, including the frozen text encoders and VAE that
training keeps on the device. Not planned: the CUDA context and library workspaces (outside the
allocator's count), validation sampling and checkpoint writing, and several processes (one
process's memory; `num_processes` adds DDP's gradient buckets in full mode).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .simulate import (ALLOCATOR_BLOCK, SIMULATED, MemoryTrace, OptimiserFootprint,
                       SimulatedDevice, accelerate_on, cuda_autocast, weightless_loading)

GiB = 2**30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# kinds of device memory, as the plan reports them
DENOISER, TRAINABLE, OTHER = "denoiser weights", "trainable weights", "text encoders, VAE, other"
GRADIENTS, OPTIMISER, ACTIVATIONS = "gradients", "optimiser states", "activations, temporaries"
LOADING, DDP_BUCKETS = "loading transients", "DDP gradient buckets"
KINDS = (OTHER, DENOISER, TRAINABLE, GRADIENTS, OPTIMISER, ACTIVATIONS, LOADING, DDP_BUCKETS)


@dataclass
class Plan:
    """One planned run: peak device memory (bytes) and its kinds at the peak, the memory after
    loading, the peak of the iterations alone (from the first one on), TFLOP and forward rows
    per sample of one iteration (one batch of train_batch_size on one process)."""

    settings: dict
    peak: int
    at_peak: Dict[str, int]
    loaded: Dict[str, int]
    training_peak: int
    tflop: float
    rows: Dict[str, float]
    parameters: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def peak_gib(self) -> float:
        return self.peak / GiB

    def to_dict(self) -> dict:
        return asdict(self)


# flags that change neither a run's memory nor its compute per iteration (the rest is the cache key)
NOT_PLANNED = {"config", "prompts", "caption_column", "text_embeddings_dir", "dataloader_num_workers",
               "output_dir", "logging_dir", "report_to", "tracker_project_name", "max_train_steps",
               "learning_rate", "generator_lr_ratio", "lr_scheduler", "lr_warmup_steps",
               "lr_num_cycles", "lr_power", "adam_beta1", "adam_beta2", "adam_weight_decay",
               "adam_epsilon", "allow_tf32", "ema_decay", "ema_start_step", "export_ema",
               "export_format", "max_nonfinite", "ddp_timeout", "checkpointing_steps",
               "checkpoints_total_limit", "resume_from_checkpoint", "validation_steps",
               "validation_prompts", "validation_seed", "log_prompts", "torch_compile",
               "enable_xformers_memory_efficient_attention"}


def settings_of(args, num_processes: int = 1) -> dict:
    """Every resolved flag that can change a run's memory or compute (the plan's cache key)."""
    return {**{k: v for k, v in sorted(vars(args).items())
               if not k.startswith("_") and k not in NOT_PLANNED}, "num_processes": num_processes}


def model_folder(model: str, revision: Optional[str] = None) -> str:
    """Where the configs of `model` are read: a local folder as it is, a published model of
    tdm/published/ from the repository (no network), any other hub id from the hub (configs
    only: no weight file is read)."""
    from .published import published_folder

    if os.path.isdir(model):
        return model
    return published_folder(model, revision) or model


def _simulated_args(args, folder: str, scratch: str):
    """The run's flags for build(): the model's config folder, a scratch output folder, one batch
    of the run's prompts (of assets/prompts.txt where they cannot be read here), and nothing
    written during training (no cache, no validation, no checkpoints); 8-bit Adam is planned by
    its footprint (tdm.simulate.OptimiserFootprint)."""
    from .config import UsageError, build_parser
    from .data import load_prompts

    try:
        prompts = load_prompts(args.prompts, args.caption_column)
    except (UsageError, OSError, ValueError):   # the run's prompts live on another machine
        prompts = load_prompts(build_parser().get_default("prompts"))
    path = os.path.join(scratch, "prompts.txt")
    with open(path, "w") as f:
        f.write("\n".join((prompts * args.train_batch_size)[:args.train_batch_size]) + "\n")
    return args.replace(pretrained_model_name_or_path=folder, output_dir=os.path.join(scratch, "run"),
                        prompts=path, caption_column=None, cache_text_embeddings=False,
                        use_8bit_adam=False, report_to="none", validation_steps=0,
                        checkpointing_steps=0, resume_from_checkpoint=None, torch_compile=False,
                        enable_xformers_memory_efficient_attention=False)


def _label(trace: MemoryTrace, networks) -> None:
    """Name what build() loaded, and let gradients name themselves when they are accumulated."""
    trainable = [*networks.student_params, *networks.fake_score_params]
    for module in networks.modules():
        for tensor in [*module.parameters(), *module.buffers()]:
            trace.relabel(tensor, DENOISER)
    for param in trainable:
        trace.relabel(param, TRAINABLE)
        param.register_post_accumulate_grad_hook(lambda p: trace.relabel(p.grad, GRADIENTS))


def _count_rows(networks, rows: Counter) -> list:
    """Forward rows by role (teacher, student, fake score) into `rows`; returns the hooks."""
    from .roles import TEACHER, role_scope

    def count(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        rows[role_scope(module).current[0] or TEACHER] += x.shape[0]

    return [m.register_forward_pre_hook(count, with_kwargs=True) for m in networks.modules()]


def _conv_backward_flops(grad_out, x, w, bias, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask, out_val=None, **_) -> int:
    """Each of a convolution's input and weight gradients costs its forward's FLOPs (torch's
    formula leaves the groups out of the weight gradient: a depthwise convolution's would count
    once per channel)."""
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x.shape), list(w.shape), list(grad_out.shape), transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


class FlopCount(TorchDispatchMode):
    """FLOPs of the ops run within, by torch's formulas (torch.utils.flop_counter), with the CPU
    flash-attention kernels that the simulated device runs counted as CUDA's flash attention is,
    and grouped convolutions' backward by `_conv_backward_flops`. (torch's FlopCounterMode also
    hooks every module for its per-module table; those hooks keep activations alive, which would
    distort the memory trace.)"""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

        aten = torch.ops.aten
        self.flops = 0
        self.formulas = {
            **flop_registry,
            aten.convolution_backward: _conv_backward_flops,
            aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *_, out_val=None, **__: sdpa_flop_count(q.shape, k.shape, v.shape),
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda g, q, k, v, *_, out_val=None, **__: sdpa_backward_flop_count(
                    g.shape, q.shape, k.shape, v.shape)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def ddp_bucket_bytes(args, parameters: Dict[str, int], num_processes: int) -> int:
    """DDP (several processes, full mode) allocates one bucket copy of each wrapped network's
    gradients (float32 student and fake score); LoRA mode averages by hand, without buckets."""
    if num_processes <= 1 or args.train_mode != "full":
        return 0
    return 4 * parameters["trainable"]


def plan(args, num_processes: int = 1, folder: Optional[str] = None, gpu_autocast: bool = True,
         allocator_block: int = ALLOCATOR_BLOCK) -> Plan:
    """Plan the run of `args` (a train_tdm RunConfig) on the simulated accelerator, from the
    configs of its model folder (tdm.simulate): build it, allocate the optimiser states (they
    exist from the first step on: the steady state) and run one iteration, measured (two when
    accumulating gradients: from the second on, both networks' gradients are held).
    `gpu_autocast` and `allocator_block` (bytes a storage is rounded up to): as CUDA does; off
    and 1, what a run on this CPU does (the tests compare the two)."""
    folder = folder or model_folder(args.pretrained_model_name_or_path, args.revision)
    with SimulatedDevice(), weightless_loading(), \
            cuda_autocast() if gpu_autocast else contextlib.nullcontext():
        return _run(args, folder, SIMULATED, allocator_block, num_processes)


def measure(args, folder: Optional[str] = None) -> Plan:
    """The plan's accounting on a real run of `args` on this CPU, weights read from the folder:
    what the plan is checked against (tests/test_plan.py). Its peak while loading is not
    comparable (reading files), its loaded memory and training peak are."""
    return _run(args, folder or args.pretrained_model_name_or_path, torch.device("cpu"), 1, 1,
                on_host=True)


def _run(args, folder: str, device: torch.device, allocator_block: int, num_processes: int,
         on_host: bool = False) -> Plan:
    """build() and the iterations under a MemoryTrace of `device`. `on_host`: the device is this
    CPU, so what build() left besides the run's resident tensors is host memory (scheduler
    tables, tokenizer output), not counted, and weights read from files are copied into memory
    of their own, as a GPU holds them (a mapped file's storage spans the whole file)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import train_tdm

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tdm-plan-") as scratch, accelerate_on(device), \
            MemoryTrace(device, allocator_block) as trace:
        with trace.labelled(OTHER):
            run = train_tdm.build(_simulated_args(args, folder, scratch))
            resident = list(_resident(run))
            for tensor in resident:   # loaded without an op (files mapped): count them too
                if on_host:
                    tensor.data = tensor.data.clone()
                trace.track(tensor)
            if on_host:
                trace.keep_only(resident)
        loaded, optimisers = _loaded(trace, run, args.use_8bit_adam)
        loading = trace.peak, trace.at_peak
        trace.reset_peak()
        rows, counter = _iterate(train_tdm, run, args, optimisers, trace)
        networks = run.networks
        parameters = {"denoiser": max(sum(p.numel() for p in m.parameters()) for m in networks.modules()),
                      "trainable": sum(p.numel() for p in [*networks.student_params,
                                                             *networks.fake_score_params])}
        training = trace.peak, trace.at_peak
    peak, at_peak = max(loading, training, key=lambda p: p[0])
    at_peak = {k: v for k, v in at_peak.items() if v}
    buckets = ddp_bucket_bytes(args, parameters, num_processes)
    if buckets:
        at_peak[DDP_BUCKETS] = buckets
    return Plan(settings=settings_of(args, num_processes), peak=peak + buckets, at_peak=at_peak,
                loaded=loaded, training_peak=training[0] + buckets, tflop=counter.flops / 1e12,
                rows={role: n / args.train_batch_size for role, n in sorted(rows.items())},
                parameters=parameters, seconds=time.perf_counter() - start)


def _resident(run):
    """The tensors build() left on the device: the networks', the backbone's models (text
    encoders, VAE; directly or in a pipeline), its path tables, the empty prompt's condition."""
    backbone = run.backbone
    modules = list(run.networks.modules())
    for value in vars(backbone).values():
        components = getattr(value, "components", None)
        for candidate in [value, *(components.values() if isinstance(components, dict) else ())]:
            if isinstance(candidate, torch.nn.Module):
                modules.append(candidate)
    for module in modules:
        yield from module.parameters()
        yield from module.buffers()
    yield from _tensors_in(vars(backbone.path).values())
    yield from (v for v in run.uncond.values() if isinstance(v, torch.Tensor))


def _tensors_in(values):
    """The tensors among `values`, inside dicts and tuples too (the path's tables per dtype)."""
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (dict, tuple, list)):
            yield from _tensors_in(value.values() if isinstance(value, dict) else value)


def _loaded(trace: MemoryTrace, run, eight_bit: bool):
    """After build(): name what it loaded, allocate the optimiser states (from the first step on
    they exist: the steady state), and return (memory by kind after loading, optimisers)."""
    _label(trace, run.networks)
    loaded = {k: v for k, v in trace.current.items() if v}
    if trace.peak > trace.total:   # loading peaked above what stays: name what it held
        trace.at_peak = {**loaded, LOADING: trace.peak - trace.total}
    footprints = [OptimiserFootprint(params, eight_bit)
                  for params in (run.networks.fake_score_params, run.networks.student_params)]
    # prepared before the states exist, as in training (accelerate copies existing states)
    optimisers = [run.accelerator.prepare_optimizer(footprint) for footprint in footprints]
    with trace.labelled(OPTIMISER):
        for footprint in footprints:
            footprint.allocate()
    return loaded, optimisers


def _iterate(train_tdm, run, args, optimisers, trace: MemoryTrace):
    """train_tdm's iteration on one batch: once, or twice when accumulating (the second holds
    both networks' gradients); the last counted (forward rows by role, FLOPs)."""
    trace.kind = ACTIVATIONS
    # one batch of the loader's prompts, not drawn through it: a loader that ends would make
    # accelerate step at each iteration instead of accumulating
    prompts = list(run.dataloader.dataset)[:args.train_batch_size]
    encode = run.encode
    if args.cache_text_embeddings:   # the cache's conditions, then the encoders leave the device
        cond = run.encode(prompts)
        run.backbone.offload_text_encoders()
        encode = lambda _: cond  # noqa: E731
    rows, counter = Counter(), FlopCount()
    iterations = 1 if args.gradient_accumulation_steps == 1 else 2
    for i in range(iterations):
        last = i == iterations - 1
        hooks = _count_rows(run.networks, rows) if last else []
        with counter if last else contextlib.nullcontext():
            train_tdm.tdm_iteration(run.accelerator, run.tdm, run.networks, encode(prompts),
                                    run.uncond, run.latent_shape, optimisers[0], optimisers[1],
                                    run.lr_scheduler, args.max_grad_norm, args.fake_score_updates)
        if run.accelerator.sync_gradients and run.ema is not None:
            run.ema.update(i + 1)
        for hook in hooks:
            hook.remove()
    return rows, counter


# ---------------------------------------------------------------------------------------------
# cards, and the smallest change that fits one
# ---------------------------------------------------------------------------------------------
# The memory the driver reports for a common card of each size (GiB): RTX 4090, RTX 6000 Ada,
# H100 80GB, H200.
CARDS = {"24 GB": 23.99, "48 GB": 47.99, "80 GB": 79.65, "141 GB": 140.4}
RESERVED_GIB = 1.0   # outside the allocator's count: CUDA context, cuBLAS and cuDNN workspaces
HEADROOM = 1.10      # the caching allocator's fragmentation, and the plan's error (docs/families.md)


def fits(peak: int, capacity: int) -> bool:
    """Whether a run whose plan peaks at `peak` bytes fits a device of `capacity` bytes."""
    return peak * HEADROOM + RESERVED_GIB * GiB <= capacity


def cards_fitted(peak: int) -> Dict[str, bool]:
    return {card: fits(peak, int(gib * GiB)) for card, gib in CARDS.items()}


def changes_to_try(args) -> list:
    """Flag changes that lower a run's memory, least intrusive first, each with those before it:
    text embeddings cached (the encoders leave the GPU), gradient checkpointing, 8-bit Adam, the
    per-process batch halved with twice the accumulation (the same effective batch), then LoRA
    from the original batch on (full mode only), halving again."""
    ladder, changes = [], {}

    def add(**change):
        changes.update(change)
        ladder.append(dict(changes))

    for flag in ("cache_text_embeddings", "gradient_checkpointing", "use_8bit_adam"):
        if not getattr(args, flag):
            add(**{flag: True})

    def halve():
        batch, accumulation = args.train_batch_size, args.gradient_accumulation_steps
        while batch > 1:
            batch, accumulation = (batch + 1) // 2, accumulation * 2
            add(train_batch_size=batch, gradient_accumulation_steps=accumulation)

    halve()
    if args.train_mode == "full":
        add(train_mode="lora", train_batch_size=args.train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps)
        halve()
    return ladder


def as_flags(change: dict) -> str:
    return " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in change.items())


def smallest_changes(args, base: Plan, num_processes: int = 1, planner=None) -> Dict[str, tuple]:
    """card -> (flag changes, plan) of the first change of `changes_to_try` that fits each card
    the run does not fit as it is ((None, None) where none does). Plans only as far as needed."""
    planner = planner or cached_plan
    todo = [card for card, ok in cards_fitted(base.peak).items() if not ok]
    found = {}
    for change in changes_to_try(args):
        if not todo:
            break
        planned = planner(args.replace(**change), num_processes)
        for card in [c for c in todo if fits(planned.peak, int(CARDS[c] * GiB))]:
            found[card] = (change, planned)
            todo.remove(card)
    return {**found, **{card: (None, None) for card in todo}}


# ---------------------------------------------------------------------------------------------
# the plan cache, and train_tdm.py's warning
# ---------------------------------------------------------------------------------------------
def _code_version() -> str:
    """A digest of the code a plan depends on: train_tdm.py and tdm/ (configs of published
    models included), so a plan is redone when either changes."""
    digest = hashlib.sha256()
    paths = [os.path.join(ROOT, "train_tdm.py")]
    for folder, _, names in os.walk(os.path.join(ROOT, "tdm")):
        paths += [os.path.join(folder, n) for n in names if n.endswith((".py", ".json"))]
    for path in sorted(paths):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def cache_path(args, num_processes: int = 1) -> str:
    """Where the plan of these settings is kept: $XDG_CACHE_HOME/tdm/plans (default ~/.cache)."""
    key = json.dumps({"settings": settings_of(args, num_processes), "code": _code_version()},
                     sort_keys=True, default=str)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "tdm", "plans", hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def cached_plan(args, num_processes: int = 1) -> Plan:
    """The plan of `args` from the cache, or planned now and cached."""
    path = cache_path(args, num_processes)
    if os.path.isfile(path):
        with open(path) as f:
            return Plan(**json.load(f))
    planned = plan(args, num_processes)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scratch = f"{path}.{os.getpid()}.tmp"
    with open(scratch, "w") as f:
        json.dump(planned.to_dict(), f, default=str)
    os.replace(scratch, path)
    return planned


def plan_in_subprocess(args, num_processes: int = 1, timeout: int = 3600) -> Plan:
    """cached_plan in a fresh interpreter (planning resets accelerate's process-wide state, which
    a running training must keep): the run's flags as a YAML config."""
    import subprocess

    import yaml

    cached = read_cached_plan(args, num_processes)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix="tdm-plan-") as scratch:
        config = os.path.join(scratch, "run.yaml")
        with open(config, "w") as f:
            yaml.safe_dump({**{k: v for k, v in args._flags.items() if k != "config"},
                            "mixed_precision": args.mixed_precision}, f)
        proc = subprocess.run([sys.executable, "-m", "tdm.plan", "--config", config, "--json",
                               "--num_processes", str(num_processes)],
                              capture_output=True, text=True, timeout=timeout, env=planner_environment())
    if proc.returncode:
        raise RuntimeError((proc.stderr.strip() or "no output").splitlines()[-1])
    return Plan(**json.loads(proc.stdout.strip().splitlines()[-1]))


def read_cached_plan(args, num_processes: int = 1) -> Optional[Plan]:
    """The cached plan of `args`, or None: never plans in this process."""
    try:
        with open(cache_path(args, num_processes)) as f:
            return Plan(**json.load(f))
    except FileNotFoundError:
        return None


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE")
LAUNCHER_PREFIXES = ("MASTER_", "TORCHELASTIC_", "ACCELERATE_", "FSDP_")


def planner_environment() -> dict:
    """The environment of the planning subprocess: this one without what a launcher
    (accelerate, torchrun) set for the run's processes, so the planner joins no process group
    and starts no distributed backend, and without GPUs (it plans on a simulated device)."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES and not k.startswith(LAUNCHER_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def memory_warning(planned: Plan, capacity: int, device: str = "this GPU") -> Optional[str]:
    """One line when `planned` does not fit a device of `capacity` bytes, else None."""
    if fits(planned.peak, capacity):
        return None
    return (f"warning: this run is planned to peak at {planned.peak_gib:.1f} GiB per process, more "
            f"than {device} can give it ({capacity / GiB:.1f} GiB, {RESERVED_GIB:.0f} GiB reserved, "
            f"{HEADROOM - 1:.0%} headroom); scripts/plan.py with the same flags names the smallest "
            "change that fits")


def warn_if_over_memory(args, accelerator) -> None:
    """train_tdm.build, before any weight is loaded: the memory_warning of this run on a CUDA
    device (main process; planned once per config in a subprocess, then cached; a launch of
    several processes only reads a cached plan)."""
    if accelerator.device.type != "cuda" or not accelerator.is_main_process:
        return
    args = args.replace(mixed_precision=accelerator.mixed_precision)   # as accelerate resolved it
    processes = accelerator.num_processes
    if not os.path.isfile(cache_path(args, processes)):
        if processes > 1:   # the other ranks would wait for the plan in their first collective
            logging.getLogger("tdm").info(
                "no memory plan cached for this run: scripts/plan.py with the same flags and "
                f"--num_processes {processes} plans it (minutes, on the CPU) before a launch")
            return
        logging.getLogger("tdm").info("planning this run's memory on the CPU (once per config)")
    try:
        planned = plan_in_subprocess(args, processes)
    except Exception as error:   # advice only: a plan that cannot be made never stops training
        print(f"warning: could not plan this run's memory ({error})", file=sys.stderr)
        return
    capacity = torch.cuda.get_device_properties(accelerator.device).total_memory
    line = memory_warning(planned, capacity, torch.cuda.get_device_name(accelerator.device))
    if line:
        print(line, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# command line: scripts/plan.py
# ---------------------------------------------------------------------------------------------
def _what(settings: dict) -> str:
    """The planned run in a few words: model, mode, batch, size, precision, memory savers."""
    s = settings
    batch = f"batch {s['train_batch_size']}" + (
        f" × {s['gradient_accumulation_steps']} accumulated" if s["gradient_accumulation_steps"] > 1 else "")
    size = f"{s['resolution']} px" + (f" {s['backbone_options']}" if s.get("backbone_options") else "")
    parts = [s["pretrained_model_name_or_path"], s["train_mode"], batch, size,
             f"{s['num_frames']} frames" if s.get("num_frames") else None,
             {"no": "fp32", None: "fp32"}.get(s["mixed_precision"], s["mixed_precision"]),
             "gradient checkpointing" if s["gradient_checkpointing"] else "no checkpointing",
             "8-bit Adam" if s["use_8bit_adam"] else "AdamW",
             "cached text embeddings" if s["cache_text_embeddings"] else None,
             f"{s['num_processes']} processes" if s["num_processes"] > 1 else None]
    return ", ".join(str(p) for p in parts if p)


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


def describe(planned: Plan, label: str = "") -> str:
    """The plan as text: the run, peak memory by kind, compute, forward rows, parameters."""
    rows, params = planned.rows, planned.parameters
    lines = [f"plan{' of ' + label if label else ''}: {_what(planned.settings)}",
             f"peak GPU memory {_size(planned.peak)} per process (the CUDA context and library "
             "workspaces come on top); at the peak:"]
    lines += [f"  {kind:<28} {_size(planned.at_peak[kind]):>11}" for kind in KINDS if kind in planned.at_peak]
    lines.append(f"compute: {planned.tflop:.1f} TFLOP per iteration (one batch on one process); "
                 f"forward rows per sample {sum(rows.values()):.2f} = "
                 + " + ".join(f"{rows[k]:.2f} {k.replace('_', ' ')}"
                              for k in ("teacher", "student", "fake_score") if k in rows))
    lines.append(f"parameters: denoiser {params['denoiser'] / 1e6:.0f} M, trained "
                 f"{params['trainable'] / 1e6:.1f} M (student and fake score)")
    return "\n".join(lines)


def _parse(argv):
    import argparse

    from .config import parse_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("--num_processes", type=int, default=1,
                   help="Processes (GPUs) of the launch: full mode adds DDP's gradient buckets.")
    p.add_argument("--json", action="store_true", help="Print the plan as one JSON line.")
    p.add_argument("--no_suggest", action="store_true",
                   help="Do not plan the changes that would fit the cards the run does not fit.")
    p.add_argument("-h", "--help", action="store_true")
    own, rest = p.parse_known_args(argv)
    if own.help:
        p.print_help()
        print("\nEvery other flag is train_tdm.py's (docs/flags.md), e.g. --config, "
              "--train_batch_size, --train_mode, --gradient_checkpointing, --mixed_precision.")
        raise SystemExit(0)
    if own.num_processes < 1:
        from .config import UsageError

        raise UsageError(f"--num_processes must be >= 1, got {own.num_processes}")
    return own, parse_args(rest)


def main(argv=None) -> int:
    """scripts/plan.py: plan a run of train_tdm.py's flags and say which cards it fits."""
    from .config import UsageError

    try:
        own, args = _parse(sys.argv[1:] if argv is None else argv)
        if args.mixed_precision is None:   # as accelerate is configured, as train_tdm.py reads it
            args = args.replace(mixed_precision=os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
        planned = cached_plan(args, own.num_processes)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if own.json:
        print(json.dumps(planned.to_dict(), default=str))
        return 0
    print(describe(planned, args.config or ""))
    fitted = cards_fitted(planned.peak)
    print("cards (GiB the driver reports): " + ", ".join(
        f"{card} ({CARDS[card]:.0f}) {'fits' if ok else 'does not fit'}" for card, ok in fitted.items()))
    if own.no_suggest or all(fitted.values()):
        return 0
    for card, (change, fitting) in smallest_changes(args, planned, own.num_processes).items():
        print(f"  {card}: " + (f"fits with {as_flags(change)} (planned {_size(fitting.peak)})"
                               if change else "no change of scripts/plan.py's list fits"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
