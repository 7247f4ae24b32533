"""Which role a denoiser module is running — teacher φ, student θ or fake score ψ — as a scope
of one call, and activation recompute that re-enters the scope its forward ran in.

In LoRA mode the three roles share one base network: the role selects the LoRA adapter (the
teacher: adapters off) and, where the network has them, the role's step embedding (docs/method.md §6).
A call without a role (a loaded student, a plain network) leaves the module as it is.
A role is never a setting that outlives a call:

    with role_scope(module).acting(role, cond):   # Denoiser.__call__
        out = module(...)

Outside a call the scope is empty. Gradient checkpointing recomputes a block's forward during
backward, possibly long after other roles ran (the student update calls the student, then the
teacher and the fake score, then runs backward). `RoleScope.checkpoint` is the model's
checkpoint function: it records the role when the block runs forward and re-enters exactly that
role for the recompute, so backward always rebuilds the activations the forward saw, whatever
ran in between. The same holds for:
- DDP: wrappers own no role; `role_scope` looks through them to the module.
- FSDP: with --gradient_checkpointing it recomputes through the model's own checkpoint
  function, i.e. this one (configs/accelerate/fsdp.yaml leaves FSDP's own activation
  checkpointing off: it would wrap blocks with torch's plain checkpoint).
- torch.compile: the role is Python state that dynamo guards on, so each role gets its own
  graph, traced under that role, and the recompute inside a compiled graph replays that trace.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

ATTRIBUTE = "tdm_role_scope"
# the roles; student and fake score are also the names of their LoRA adapters on a shared base
TEACHER, STUDENT, FAKE_SCORE = "teacher", "student", "fake_score"
WRAPPERS = ("module", "_fsdp_wrapped_module", "_orig_mod")   # DDP, FSDP, torch.compile


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside DDP/FSDP/compile wrappers (a few dictionary lookups per call)."""
    while True:
        inner = next((module._modules[w] for w in WRAPPERS if w in module._modules), None)
        if inner is None:
            return module
        module = inner


def role_lora_layers(module: torch.nn.Module) -> list:
    """The LoRA layers that carry role adapters (a loaded student's own adapter is not one)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)
            and {STUDENT, FAKE_SCORE} & set(getattr(m, "lora_A", {}))]


class RoleScope:
    """The role of the call in progress on one network (None outside calls), and the role
    adapter its LoRA layers have selected, switched only when a call needs another one."""

    def __init__(self, module: torch.nn.Module):
        self.layers = role_lora_layers(module)
        # the LoRA weights that train: peft's adapter switch turns their requires_grad off
        self.trainable = [p for layer in self.layers for p in layer.parameters() if p.requires_grad]
        self.current: Optional[tuple] = None     # (role, condition) during a call
        self.fixed: Optional[tuple] = None       # inference: the step condition of a stock call
        self._adapter = "unset"                  # what the LoRA layers have selected

    def step_condition(self) -> tuple:
        """(role, condition) whose step embedding a forward adds now: the call's role, or the
        fixed inference condition for calls without one (a stock pipeline, a loaded student)."""
        if self.current is not None and self.current[0] is not None:
            return self.current
        return self.fixed or (None, None)

    @contextlib.contextmanager
    def acting(self, role: Optional[str], cond: Optional[dict]):
        previous, self.current = self.current, (role, cond)
        self._select_adapter(role)
        try:
            yield
        finally:
            self.current = previous
            if previous is not None:
                self._select_adapter(previous[0])

    def _select_adapter(self, role: Optional[str]) -> None:
        if role is None or not self.layers or role == self._adapter:
            return
        for layer in self.layers:
            if role == TEACHER:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(role)
        # peft's switches also turn requires_grad off for the other adapters; a leaf whose flag is
        # off when backward reaches it silently gets no gradient, so the flags are put back.
        for param in self.trainable:
            param.requires_grad_(True)
        self._adapter = role

    def checkpoint(self, block, *args, **kwargs):
        """Gradient checkpointing of `block` whose recompute runs under the role of its forward
        (diffusers' checkpoint function, plus the recompute context). Under torch.compile the
        recompute is part of the graph traced under the forward's role, so no context is needed
        (dynamo takes a context_fn only for selective checkpointing)."""
        if torch.compiler.is_compiling():
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False,
                                                     **kwargs)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False,
                                                 context_fn=self._recompute_context, **kwargs)

    def _recompute_context(self):
        # called when the block runs forward: the role of that forward is captured here
        captured = self.current
        if captured is None:
            return contextlib.nullcontext(), contextlib.nullcontext()
        return contextlib.nullcontext(), self.acting(*captured)


def role_scope(module: torch.nn.Module) -> RoleScope:
    """The scope of a (possibly wrapped) network, created on first use."""
    inner = unwrap(module)
    scope = inner.__dict__.get(ATTRIBUTE)
    if scope is None:
        scope = RoleScope(inner)
        inner.__dict__[ATTRIBUTE] = scope
    return scope


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """The model's gradient checkpointing, with recompute under the forward's role (the only
    way this project turns checkpointing on: the library default recomputes under whatever
    role is active at backward time)."""
    scope = role_scope(module)
    module.enable_gradient_checkpointing(gradient_checkpointing_func=scope.checkpoint)

