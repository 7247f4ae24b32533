"""Teacher φ, student θ and fake score ψ as three denoisers (x_t, t, c) -> (x̂0, ε̂).

full: three networks — a frozen teacher in the compute dtype, student and fake score as full
      fp32 copies initialised from it (the upstream demo), wrapped for data parallelism.
lora: ONE copy of the base weights. Teacher = the base without adapters; student and fake
      score = two named LoRA adapters on it. Each call computes with its role's adapter as data
      of that call and its recompute only (tdm.roles, tdm.call_weights), so each update trains
      only its own adapter, with the activations its own forward saw; the teacher and the fake
      score at the same x_t run as one batch (`joint_call`). Every network is guarded: a call
      outside a role, or an adapter or checkpoint function switched from outside, raises.
Each call prepares its trainable weights once (tdm.call_weights: merged LoRA, or one cast of all
full-mode weights under autocast), and attention runs tdm.attention's lean processor.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .attention import lean_attention
from .backbones.base import Backbone, Denoiser
from .call_weights import MergedLoRA, WorkingCopies
from .checkpoint import checkpointed_names, load_trainable, save_trainable
from .conditions import cat_conditions
from .roles import enable_gradient_checkpointing, guard, role_scope, unwrap
from .step_condition import (FAKE_SCORE, STEP_EMBEDDING_NAME, STUDENT, TEACHER,
                             attach_step_embeddings, detached, find_step_embeddings,
                             save_step_tables, split_state)


@dataclass
class Networks:
    teacher: Denoiser
    student: Denoiser         # the student update's gradient call (may run through DDP)
    fake_score: Denoiser      # the fake-score update's gradient call (may run through DDP)
    student_eval: Denoiser    # no-grad calls (rollout, validation): never through DDP, so
    fake_score_eval: Denoiser  # ranks may run different numbers of them
    student_params: List[torch.nn.Parameter]
    fake_score_params: List[torch.nn.Parameter]
    student_module: torch.nn.Module = None
    student_adapter: Optional[str] = None   # lora: the student's adapter on the shared base
    checkpointed: Dict[str, torch.nn.Module] = field(default_factory=dict)
    manual_gradient_sync: bool = False      # lora: the shared base is not DDP-wrapped
    sharded: bool = False                   # FSDP/DeepSpeed: accelerate saves the models itself
    wrapped: List[torch.nn.Module] = field(default_factory=list)   # DDP modules, for accumulate()

    def modules(self) -> List[torch.nn.Module]:
        """The distinct networks (one in lora mode, three in full mode)."""
        found = []
        for denoiser in (self.teacher, self.student_eval, self.fake_score_eval):
            if not any(denoiser.module is m for m in found):
                found.append(denoiser.module)
        return found

    def compile(self) -> None:
        """torch.compile every network's forward in place (--torch_compile)."""
        for module in self.modules():
            module.compile()

    def reduce_gradients(self, accelerator, params) -> None:
        """Average gradients over processes where DDP does not (lora mode)."""
        if not self.manual_gradient_sync or accelerator.num_processes == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            flat = torch.cat([g.flatten() for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= accelerator.num_processes
            torch.nn.utils.vector_to_parameters(flat, grads)

    def gather_student(self, accelerator) -> Optional[dict]:
        """Sharded: the student's full state dict (a collective; on the main process, empty
        elsewhere). None where the student module holds its own weights."""
        return accelerator.get_state_dict(self.wrapped[0]) if self.sharded else None

    def export(self, folder: str, backbone: Backbone, export_format: str = "diffusers",
               full_state: Optional[dict] = None) -> str:
        """The student for diffusers: a LoRA file (plus a kohya file on request), or a model
        folder of the denoiser (from `full_state` where the student is sharded).
        A step-conditioned student (TDM-unify) also writes its step embedding, beside the LoRA or
        inside the model folder, as step_embedding.safetensors; the model files stay stock."""
        from .lora import save_lora

        holder = find_step_embeddings(self.student_module)
        steps = ({f"{name}.weight": table.weight for name, table in holder[STUDENT].tables.items()}
                 if holder is not None and STUDENT in holder else {})
        if self.student_adapter:
            path = save_lora(self.student_module, folder, backbone.lora_prefix, self.student_adapter)
            if export_format == "kohya":
                from .kohya import KOHYA_WEIGHT_NAME, save_kohya_lora

                path = save_kohya_lora(self.student_module, os.path.join(folder, KOHYA_WEIGHT_NAME),
                                       self.student_adapter)
            step_folder = folder
        else:
            step_folder = path = os.path.join(folder, backbone.denoiser_subfolder)
            if full_state is not None:   # sharded: rebuild the student from the gathered state
                model_state, steps = split_state(full_state, STUDENT)
                module = backbone.load_denoiser(torch.float32)
                module.load_state_dict(model_state)
                module.save_pretrained(path)
            else:
                with detached(self.student_module):
                    self.student_module.save_pretrained(path)
        if steps:
            save_step_tables(steps, backbone.step_embedding_site, os.path.join(step_folder,
                                                                                STEP_EMBEDDING_NAME))
        return path

    def save(self, folder: str) -> None:
        for name, module in self.checkpointed.items():
            save_trainable(module, os.path.join(folder, f"{name}.safetensors"))

    def load(self, folder: str) -> None:
        for name, module in self.checkpointed.items():
            load_trainable(module, os.path.join(folder, f"{name}.safetensors"))


def _trainable(module) -> List[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def build_networks(backbone: Backbone, train_mode: str, weight_dtype, accelerator,
                   lora_rank: int = 64, lora_alpha: float = 64.0,
                   gradient_checkpointing: bool = False,
                   step_tables: Optional[Dict[str, Dict[str, int]]] = None) -> Networks:
    """`step_tables`: {role: {condition: size}} of the step embeddings (docs/method.md §6), if any."""
    step_tables = step_tables or {}
    if train_mode == "lora":
        networks = lora_networks(backbone, weight_dtype, accelerator.device, lora_rank, lora_alpha,
                                 gradient_checkpointing, step_tables)
        if accelerator.num_processes > 1:   # what DDP would do: every rank starts from rank 0's init
            for param in networks.student_params + networks.fake_score_params:
                torch.distributed.broadcast(param.data, src=0)
    else:
        networks = full_networks(backbone, weight_dtype, accelerator, gradient_checkpointing, step_tables)
    for module in networks.modules():
        lean_attention(unwrap(module))
    return networks


def full_networks(backbone: Backbone, weight_dtype, accelerator,
                  gradient_checkpointing: bool, step_tables: Optional[dict] = None) -> Networks:
    """Frozen teacher; student and fake score as full fp32 copies, DDP-wrapped by accelerate."""
    teacher = backbone.load_denoiser(weight_dtype).requires_grad_(False).eval().to(accelerator.device)
    copies = []
    for role in (STUDENT, FAKE_SCORE):
        net = backbone.load_denoiser(torch.float32).requires_grad_(True).train()
        attach_step_embeddings(net, backbone.step_embedding_site, {role: (step_tables or {}).get(role)})
        if gradient_checkpointing:
            enable_gradient_checkpointing(net)
        copies.append(net)
    student_wrapped, fake_score_wrapped = accelerator.prepare(*copies)
    student, fake_score = copies
    for net in (teacher, student_wrapped, fake_score_wrapped):   # only through their roles
        guard(net)
    sharded = accelerator.distributed_type.value == "FSDP"
    if not sharded:   # FSDP casts its shards itself (its mixed precision)
        for net in copies:
            role_scope(net).weights = WorkingCopies(role_scope(net), unwrap(net))
    # accelerate pairs the i-th prepared optimiser with the i-th model when it saves sharded
    # states: train_tdm.build prepares the student's optimiser first, then the fake score's.
    return Networks(
        teacher=backbone.denoiser(teacher, TEACHER),
        student=backbone.denoiser(student_wrapped, STUDENT),
        fake_score=backbone.denoiser(fake_score_wrapped, FAKE_SCORE),
        # sharded wrappers own the parameters (and must run every forward themselves)
        student_eval=backbone.denoiser(student_wrapped if sharded else student, STUDENT),
        fake_score_eval=backbone.denoiser(fake_score_wrapped if sharded else fake_score, FAKE_SCORE),
        student_params=_trainable(student_wrapped), fake_score_params=_trainable(fake_score_wrapped),
        student_module=student, checkpointed={} if sharded else dict(zip(checkpointed_names("full"), (student, fake_score))),
        wrapped=[student_wrapped, fake_score_wrapped], sharded=sharded)


def lora_networks(backbone: Backbone, weight_dtype, device, rank: int, alpha: float,
                  gradient_checkpointing: bool, step_tables: Optional[dict] = None) -> Networks:
    """One frozen base in the compute dtype with two fp32 LoRA adapters on it (and fp32 step
    embeddings per role, named like the adapters so that each optimiser finds its own)."""
    from .lora import attach_lora

    base = backbone.load_denoiser(weight_dtype)
    for adapter in (STUDENT, FAKE_SCORE):
        attach_lora(base, rank, alpha, backbone.lora_target_modules, adapter_name=adapter)
    base.to(device).train()
    attach_step_embeddings(base, backbone.step_embedding_site, step_tables or {})
    scope = role_scope(base)   # created once every adapter is attached: it reads the LoRA layers
    scope.weights = MergedLoRA(scope, scope.layers, (STUDENT, FAKE_SCORE))
    if gradient_checkpointing:
        enable_gradient_checkpointing(base)
    guard(base)   # the shared base runs only through its roles
    params = {name: [p for n, p in base.named_parameters() if f".{name}." in n and p.requires_grad]
              for name in (STUDENT, FAKE_SCORE)}
    student = backbone.denoiser(base, STUDENT)
    fake_score = backbone.denoiser(base, FAKE_SCORE)
    return Networks(teacher=backbone.denoiser(base, TEACHER),
                    student=student, fake_score=fake_score, student_eval=student,
                    fake_score_eval=fake_score,
                    student_params=params[STUDENT], fake_score_params=params[FAKE_SCORE],
                    student_module=base, student_adapter=STUDENT, checkpointed=dict(zip(checkpointed_names("lora"), (base,))),
                    manual_gradient_sync=True)


def joint_call(calls: list, x: torch.Tensor, t: torch.Tensor) -> Optional[list]:
    """[(x̂0, ε̂)] of each (denoiser, condition) in `calls` at the same (x, t): one forward of
    their shared network on x, t repeated once per call, each row block as its role
    (tdm.roles.Call.rows). None where they cannot share one: other networks, or conditions that
    differ in more than step conditions (which the step-embedding hook reads per block)."""
    from .step_condition import NUM_STEPS, STEP_INDEX

    denoisers = [d for d, _ in calls]
    if not all(isinstance(d, Denoiser) and unwrap(d.module) is unwrap(denoisers[0].module)
               and d.backbone is denoisers[0].backbone for d in denoisers):
        return None
    step_keys = {NUM_STEPS, STEP_INDEX}
    keys = [set(cond) - step_keys for _, cond in calls]
    if any(k != keys[0] for k in keys):
        return None
    first, backbone = denoisers[0], denoisers[0].backbone
    rows, start = [], 0
    for denoiser, cond in calls:
        size = next(iter(cond.values())).shape[0]
        rows.append((denoiser.role, start, start + size, cond))
        start += size
    cond = cat_conditions(*[{k: c[k] for k in keys[0]} for _, c in calls])
    x, t = torch.cat([x] * len(calls)), torch.cat([t] * len(calls))   # only once they share one
    with first.scope.acting(None, None, rows=tuple(rows)):
        out = backbone.model_output(first.module, x, t, cond)
    x0, eps = backbone.path.x0_eps(out, x, t, backbone.prediction_type)
    sizes = [stop - start for _, start, stop, _ in rows]
    return list(zip(x0.split(sizes), eps.split(sizes)))


def enable_xformers(nets, accelerator):
    """--enable_xformers_memory_efficient_attention: xformers where installed (optional, GPU only),
    else a one-line warning and PyTorch's SDPA."""
    try:
        import xformers  # noqa: F401   (optional: probed, not required)
    except ImportError:
        if accelerator.is_main_process:
            print("warning: xformers is not installed; using PyTorch SDPA attention", file=sys.stderr)
        return
    for net in nets:
        net.enable_xformers_memory_efficient_attention()
