"""Step conditions (docs/method.md §6): learned embeddings of the number of steps K (TDM-unify) and of
the step index k (the fake score in mode 2), added to the denoiser's timestep embedding.

    emb(t) ← emb(t) + Σ_name E_name[c_name],   E_name zero-initialised,

so a conditioned network starts as the unconditioned one (the teacher, at step 0). The tables
live on the denoiser module as `tdm_step_embedding` (so DDP/FSDP, optimisers and checkpoints see
them), one set per role (student, fake score) since in LoRA mode both roles share one base; a
forward hook on the backbone's timestep-embedding module adds the embedding of the role whose
call is running (tdm.roles: a scope of the call, re-entered by activation recompute).
Conditions travel in the condition dict under NUM_STEPS / STEP_INDEX (long tensors, one entry
per sample, or one entry for the whole batch).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Dict, Optional

import torch

from .roles import FAKE_SCORE, STUDENT, TEACHER, role_scope, unwrap  # noqa: F401 (roles)

NUM_STEPS, STEP_INDEX = "num_steps", "step_index"
ATTRIBUTE = "tdm_step_embedding"
STEP_EMBEDDING_NAME = "step_embedding.safetensors"


class StepEmbedding(torch.nn.Module):
    """Σ_name E_name[c_name] for one role; E_name has one zero-initialised row per value."""

    def __init__(self, dim: int, sizes: Dict[str, int]):
        super().__init__()
        self.tables = torch.nn.ModuleDict({name: torch.nn.Embedding(size, dim)
                                           for name, size in sizes.items()})
        for table in self.tables.values():
            torch.nn.init.zeros_(table.weight)

    def forward(self, cond: dict) -> torch.Tensor:
        missing = [name for name in self.tables if name not in cond]
        if missing:
            raise KeyError(f"step-conditioned denoiser called without its condition {missing}")
        return sum(table(cond[name]) for name, table in self.tables.items())


class StepEmbeddings(torch.nn.ModuleDict):
    """The step embeddings of every role on one denoiser, and the hook that adds the embedding of
    the role whose call is running (read from the network's role scope, tdm.roles)."""

    def __init__(self, site: str, roles: Dict[str, StepEmbedding]):
        super().__init__(roles)
        self.site = site

    def add_to(self, scope, module, inputs, output):
        call = scope.current
        if call is not None and call.rows:   # a call of several roles: each on its row block
            for role, start, stop, cond in call.rows:
                if role in self:
                    output[start:stop] += self[role](cond).to(output.dtype)
            return output
        role, cond = scope.step_condition()
        if role not in self:
            return output          # teacher, or a role without a step condition
        return output + self[role](cond).to(output.dtype)


def attach_step_embeddings(module: torch.nn.Module, site: str,
                           roles: Dict[str, Dict[str, int]]) -> Optional[StepEmbeddings]:
    """Give `module` fp32 step embeddings for each role ({role: {condition: table size}}) and
    hook them onto its timestep embedding `site`. No roles with tables: nothing is attached."""
    roles = {role: sizes for role, sizes in roles.items() if sizes}
    if not roles:
        return None
    target = module.get_submodule(site)
    dim = [m for m in target.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
    device = next(module.parameters()).device
    holder = StepEmbeddings(site, {role: StepEmbedding(dim, sizes) for role, sizes in roles.items()})
    module.add_module(ATTRIBUTE, holder.to(device))
    target.register_forward_hook(functools.partial(holder.add_to, role_scope(module)))
    return holder


def find_step_embeddings(module: torch.nn.Module) -> Optional[StepEmbeddings]:
    """The step embeddings of a (possibly DDP/FSDP/compile-wrapped) denoiser, if it has any."""
    return unwrap(module)._modules.get(ATTRIBUTE)


@contextlib.contextmanager
def detached(module: torch.nn.Module):
    """`module` without its step embeddings (for save_pretrained: a stock model file)."""
    holder = module._modules.pop(ATTRIBUTE, None)
    try:
        yield holder
    finally:
        if holder is not None:
            module.add_module(ATTRIBUTE, holder)


# -- export and inference ---------------------------------------------------------------------
def step_tables(num_steps: int, unify_steps, fake_step_condition: bool) -> Dict[str, Dict[str, int]]:
    """{role: {condition: table size}}: K for both roles under TDM-unify, k for the fake score
    with fake_step_condition. Rows 0..max K (row K is step count / index K; row 0 unused)."""
    size = max(unify_steps or [num_steps]) + 1
    student = {NUM_STEPS: size} if unify_steps else {}
    fake = dict(student)
    if fake_step_condition:
        fake[STEP_INDEX] = size
    return {STUDENT: student, FAKE_SCORE: fake}


def save_step_tables(tables: Dict[str, torch.Tensor], site: str, path: str) -> str:
    """A role's tables ({condition.weight: tensor}) as a small safetensors file; the hook site
    goes into the metadata so that inference can attach it to a stock model."""
    from safetensors.torch import save_file

    save_file({name: value.detach().float().cpu().contiguous() for name, value in tables.items()},
              path, metadata={"site": site})
    return path


def split_state(state: dict, role: str) -> tuple:
    """A full state dict → (stock model weights, {condition.weight: tensor} of `role`)."""
    prefix = f"{ATTRIBUTE}.{role}.tables."
    model = {k: v for k, v in state.items() if not k.startswith(ATTRIBUTE + ".")}
    steps = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return model, steps


def find_step_embedding_file(weights_location: str) -> Optional[str]:
    """step_embedding.safetensors beside a LoRA file or inside a full denoiser folder."""
    folder = weights_location if os.path.isdir(weights_location) else os.path.dirname(weights_location)
    path = os.path.join(folder, STEP_EMBEDDING_NAME)
    return path if os.path.isfile(path) else None


def apply_step_embedding(denoiser: torch.nn.Module, path: str, num_steps: int) -> list:
    """Condition a stock pipeline's denoiser on K = `num_steps` for every call (inference).
    Returns the step counts the embedding was trained for (rows that are not all zero)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        site = f.metadata()["site"]
    weights = load_file(path)
    table = weights[f"{NUM_STEPS}.weight"]
    holder = attach_step_embeddings(denoiser, site, {STUDENT: {NUM_STEPS: table.shape[0]}})
    holder[STUDENT].tables[NUM_STEPS].weight.data.copy_(table)
    set_num_steps(denoiser, num_steps)
    return [k for k in range(table.shape[0]) if table[k].abs().sum() > 0]


def set_num_steps(denoiser: torch.nn.Module, num_steps: Optional[int]) -> None:
    """Condition every later call of a step-conditioned student on K (stock pipelines call the
    model themselves, with CFG batches of any size: one row broadcasts); None: no condition
    (the network as plain diffusers runs it)."""
    if num_steps is None:
        role_scope(denoiser).fixed = None
        return
    device = next(find_step_embeddings(denoiser).parameters()).device
    role_scope(denoiser).fixed = (STUDENT, {NUM_STEPS: torch.tensor([num_steps], device=device)})
