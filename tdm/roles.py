"""Which role a denoiser module is running — teacher φ, student θ or fake score ψ — as a scope
of one call, and activation recompute that re-enters the scope its forward ran in.

In LoRA mode the three roles share one base network: the role selects the LoRA adapter (the
teacher: none) and, where the network has them, the role's step embedding (docs/method.md §6).
The adapter is data of the call, not module state: each call carries the weights it computes
with (tdm.call_weights: the role's adapters merged into the base, or per row block for a call of
several roles on one batch), and the adapted layers read them from the call.
A call without a role (a loaded student, a plain network) leaves the module as it is; on a
training network (`guard`, tdm.networks) it is an error, and so are peft's adapter switches or a
checkpoint function changed from outside the scope (peft's set_adapter, diffusers' own
enable_gradient_checkpointing, reentrant or FSDP activation checkpointing), verified at every
call and recompute. A role is never a setting that outlives a call:

    with role_scope(module).acting(role, cond):   # Denoiser.__call__
        out = module(...)

Outside a call the scope is empty. Gradient checkpointing recomputes a block's forward during
backward, possibly long after other roles ran (the student update calls the student, then the
teacher and the fake score, then runs backward). `RoleScope.checkpoint` is the model's
checkpoint function: it records the role when the block runs forward and re-enters exactly that
role for the recompute, so backward always rebuilds the activations the forward saw, whatever
ran in between, with the very weights the forward used. The same holds for:
- DDP: wrappers own no role; `role_scope` looks through them to the module.
- FSDP: with --gradient_checkpointing it recomputes through the model's own checkpoint
  function, i.e. this one (FSDP's own activation checkpointing would wrap blocks with torch's
  plain checkpoint: `guard` refuses it; configs/accelerate/fsdp.yaml leaves it off).
- torch.compile: the role is Python state that dynamo guards on, so each role gets its own
  graph, traced under that role, and the recompute inside a compiled graph replays that trace.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

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


class Call(NamedTuple):
    """One call of a network: its role and condition; for a call of several roles on row
    blocks of one batch, `rows` = ((role, start, stop, condition), ...); and the per-layer
    weights it computes with (tdm.call_weights; None: the layers' own)."""
    role: Optional[str]
    cond: Optional[dict]
    rows: tuple = ()
    weights: Optional[list] = None


JOINT = "joint"   # the role of a call of several roles on row blocks (Call.rows)


class RoleError(RuntimeError):
    """A training network used outside its role scope: the call would silently run another
    role's adapter, step embedding or activations."""


class RoleScope:
    """The call in progress on one network (None outside calls) and, where the network has
    them, what prepares each call's weights (`weights`, tdm.call_weights)."""

    def __init__(self, module: torch.nn.Module):
        self.layers = role_lora_layers(module)
        # the LoRA weights that train: peft's adapter switch turns their requires_grad off
        self.trainable = [p for layer in self.layers for p in layer.parameters() if p.requires_grad]
        self.current: Optional[Call] = None      # during a call
        self.fixed: Optional[tuple] = None       # inference: the step condition of a stock call
        self.weights = None                      # tdm.call_weights: MergedLoRA or WorkingCopies
        self.guarded = False                     # a training network: see guard()
        self._checkpointing: list = []           # its modules that can checkpoint (diffusers)
        self._peft_state: Optional[list] = None  # peft's adapter fields as guard() found them

    def guard(self, module: torch.nn.Module) -> None:
        """Make `module` (a training network, unwrapped) refuse what would run a wrong role
        silently: a call outside a role, and from then on, at every call and recompute, LoRA
        adapters or a checkpoint function set from outside this scope. Checkpoint wrappers put
        around its blocks (FSDP's activation checkpointing) are refused here."""
        wrapped = [name for name, m in module.named_modules() if type(m).__name__ == "CheckpointWrapper"]
        if wrapped:
            raise RoleError(f"activation checkpointing wraps {wrapped[0]} with torch's plain checkpoint, "
                            "which recomputes under whatever role is active in backward: use "
                            "--gradient_checkpointing (and fsdp_activation_checkpointing: false)")
        self._checkpointing = [m for m in module.modules() if hasattr(m, "gradient_checkpointing")]
        self._peft_state = self._peft_fields()
        if not self.guarded:
            module.register_forward_pre_hook(self._refuse_outside_a_role)
        self.guarded = True
        self._verify()

    def _refuse_outside_a_role(self, module, args):
        if self.current is None or self.current[0] is None:
            raise RoleError(f"{type(module).__name__} is a training network: call it through its "
                            "role's Denoiser (tdm.networks.Networks), not directly")

    def _peft_fields(self) -> list:
        # peft's own fields, as set_adapter / enable_adapters leave them (the properties cost 3×)
        return [(layer._disable_adapters, layer._active_adapter) for layer in self.layers]

    def _verify(self) -> None:
        """The checkpoint function is this scope's, peft's adapter fields are as they were built
        and the adapters still train: anything else was changed from outside (the calls compute
        with their own adapters whatever peft selects, but peft's switch turns training off)."""
        for m in self._checkpointing:
            if m.gradient_checkpointing and getattr(m, "_gradient_checkpointing_func", None) != self.checkpoint:
                raise RoleError(f"gradient checkpointing of {type(m).__name__} was enabled by another "
                                "route than tdm.roles.enable_gradient_checkpointing: its recompute would "
                                "run under whatever role is active in backward")
        if self._peft_state is None:
            return
        if self._peft_fields() != self._peft_state or not all(p.requires_grad for p in self.trainable):
            raise RoleError("the LoRA adapters of a training network were switched outside its role "
                            "scope: use the role's Denoiser")

    def step_condition(self) -> tuple:
        """(role, condition) whose step embedding a forward adds now: the call's role, or the
        fixed inference condition for calls without one (a stock pipeline, a loaded student)."""
        if self.current is not None and self.current.role is not None:
            return self.current.role, self.current.cond
        return self.fixed or (None, None)

    @contextlib.contextmanager
    def acting(self, role: Optional[str], cond: Optional[dict], rows: tuple = ()):
        """A call of `role` with condition `cond`; or with `rows` = ((role, start, stop, cond),
        ...) a call of several roles, each on its row block of the batch (role JOINT)."""
        if self.guarded:
            self._verify()
        if rows:
            role, cond = JOINT, None
        weights = self.weights.for_call(role, rows) if self.weights is not None else None
        with self._entered(Call(role, cond, rows, weights), verify=False):
            yield

    @contextlib.contextmanager
    def _entered(self, call: Call, verify: bool = True):
        if verify and self.guarded:
            self._verify()
        previous, self.current = self.current, call
        try:
            yield
        finally:
            self.current = previous

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
        # called when the block runs forward: the call of that forward (role, condition and
        # weights) is captured here and re-entered for the recompute
        captured = self.current
        if captured is None:
            return contextlib.nullcontext(), contextlib.nullcontext()
        return contextlib.nullcontext(), self._entered(captured)


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
    role is active at backward time; a guarded scope refuses it)."""
    scope = role_scope(module)
    module.enable_gradient_checkpointing(gradient_checkpointing_func=scope.checkpoint)


def guard(module: torch.nn.Module) -> None:
    """RoleScope.guard of a (possibly wrapped) training network."""
    role_scope(module).guard(unwrap(module))

