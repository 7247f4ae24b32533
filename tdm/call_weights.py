"""The weights each call of a training network computes with, prepared once per call instead of
once per layer and use: fewer device operations per iteration (docs/benchmarks.md, device
operations per iteration).

LoRA (`MergedLoRA`): the adapter is data of the call, not module state (tdm.roles.Call).
- A call with gradient (the update of its role) computes with W' = W + s·B·A, merged at the start
  of the call for all layers of a shape at once (one batched matmul; its backward gives A and B
  their gradients from W''s) and reused by the call's recompute: the forward then costs what the
  base costs.
- A call without gradient (the rollout) adds s·B·A·x to the base's output as peft does (the same
  roundings in bf16: the rollout decides where every later network is evaluated).
- A call of several roles on row blocks of one batch (`Call.rows`: the teacher's CFG rows and the
  fake score's) adds s·B·A·x to each adapted block, fused into one multiply-add.
Full fine-tuning (`WorkingCopies`): under autocast the trainable Linear and Conv weights are cast
to the autocast dtype together, once per call (their gradients once per backward), where autocast
casts each weight at each use and each gradient back; the values are autocast's own.
Without autocast (fp32, float64) the trainable weights are used as they are.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import torch

from .roles import TEACHER, RoleError

MATMUL_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in on `tensor`'s device now: autocast's, else the tensor's."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def flat_copy(tensors: List[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """All `tensors` in one flat tensor of `dtype` (one copy, one cast; both differentiable)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return flat if flat.dtype == dtype else flat.to(dtype)


def pieces(flat: torch.Tensor, shapes: List[torch.Size]) -> List[torch.Tensor]:
    """Views of consecutive pieces of `flat` in the given shapes."""
    sizes = [shape.numel() for shape in shapes]
    return [piece.view(shape) for piece, shape in zip(flat.split(sizes), shapes)]


def layer_output(layer: torch.nn.Module, x: torch.Tensor, weight, bias) -> torch.Tensor:
    """A Linear or Conv layer's forward with the given weight and bias."""
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)


class MergedLoRA:
    """The role adapters of a shared base (peft LoRA layers, adapters named by role) as data of
    each call. Each adapted layer's forward is replaced by one that reads its weights from the
    call in progress."""

    def __init__(self, scope, layers: list, roles: tuple):
        self.layers, self.roles = layers, roles
        for layer in layers:
            check_plain_lora(layer, roles)
        # layers whose base, A and B have the same shapes (and the same scale) merge together
        groups: Dict[tuple, List[int]] = {}
        for i, layer in enumerate(layers):
            key = tuple((layer.base_layer.weight.shape, layer.lora_A[role].weight.shape,
                         layer.lora_B[role].weight.shape, layer.scaling[role]) for role in roles)
            groups.setdefault(key, []).append(i)
        self.groups = list(groups.values())
        self.order = [i for group in self.groups for i in group]   # layer indices, group by group
        for index, layer in enumerate(layers):
            layer.forward = functools.partial(lora_layer_forward, scope, index, layer)

    def for_call(self, role: Optional[str], rows: tuple):
        """Per layer: the merged weight (a call of one role with gradient), a list of adapted
        blocks (role, start, stop, A, B, s) (without gradient: one block for all rows; a call of
        several roles: one per adapted row block), or None (the teacher)."""
        if rows:
            blocks = [(r, start, stop) for r, start, stop, _ in rows if r != TEACHER]
            adapters = {r: self.adapters(r)[0] for r, _, _ in blocks}
            return [[(r, start, stop, *adapters[r][i], self.layers[i].scaling[r]) for r, start, stop in blocks]
                    for i in range(len(self.layers))]
        if role is None or role == TEACHER:
            return None
        adapters, stacks = self.adapters(role)
        if not torch.is_grad_enabled():
            return [[(role, 0, None, A, B, layer.scaling[role])] for (A, B), layer in zip(adapters, self.layers)]
        return self.merged(role, stacks)

    def adapters(self, role: str) -> Tuple[list, list]:
        """The role's adapters in the compute dtype, cast together: [(A, B)] per layer, and per
        group of layers (A stacked, B stacked) as [n, r, in] and [n, out, r] (views, no copy)."""
        base = self.layers[0].base_layer.weight
        masters = [self.layers[i].lora_A[role].weight for i in self.order]
        masters += [self.layers[i].lora_B[role].weight for i in self.order]
        flat = flat_copy(masters, compute_dtype(base) if base.is_floating_point() else base.dtype)
        half = sum(m.numel() for m in masters[:len(self.order)])
        a_flat, b_flat = flat[:half], flat[half:]
        per_layer, stacks, start = [None] * len(self.layers), [], 0
        a_sizes = [len(g) * self.layers[g[0]].lora_A[role].weight.numel() for g in self.groups]
        b_sizes = [len(g) * self.layers[g[0]].lora_B[role].weight.numel() for g in self.groups]
        for group, a, b in zip(self.groups, a_flat.split(a_sizes), b_flat.split(b_sizes)):
            A0, B0 = self.layers[group[0]].lora_A[role].weight, self.layers[group[0]].lora_B[role].weight
            A_stack, B_stack = a.view(len(group), *A0.shape), b.view(len(group), *B0.shape)
            stacks.append((A_stack, B_stack))
            for i, A, B in zip(group, A_stack.unbind(0), B_stack.unbind(0)):
                per_layer[i] = (A, B)
        return per_layer, stacks

    def merged(self, role: str, stacks: list) -> list:
        """W + s·B·A for every layer in the base's dtype: per group one stack of the bases and one
        batched matmul (its backward: one for the As, one for the Bs)."""
        merged = [None] * len(self.layers)
        for group, (A, B) in zip(self.groups, stacks):
            W = torch.stack([self.layers[i].base_layer.weight.flatten(1) for i in group])
            s = self.layers[group[0]].scaling[role]
            out = torch.baddbmm(W, B.flatten(2).to(W.dtype), A.flatten(2).to(W.dtype), alpha=s)
            for i, layer_weight in zip(group, out.unbind(0)):   # its backward: one stack
                merged[i] = layer_weight.view(self.layers[i].base_layer.weight.shape)
        return merged


def check_plain_lora(layer, roles: tuple) -> None:
    """The per-call weights compute plain LoRA only: no dropout, DoRA, LoRA bias or variants."""
    for role in roles:
        if (not isinstance(layer.lora_dropout[role], torch.nn.Identity) or layer.use_dora.get(role)
                or getattr(layer, "lora_bias", {}).get(role) or role in getattr(layer, "lora_variant", {})
                or not isinstance(layer.base_layer, MATMUL_LAYERS)):
            raise ValueError(f"{type(layer).__name__}: only plain LoRA on Linear/Conv layers runs as "
                             "data of the call (no dropout, DoRA or LoRA bias)")


def lora_layer_forward(scope, index: int, layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """An adapted layer in a call: the base with the call's merged weight, or the base plus
    s·B·A·x on each adapted row block; the base alone for the teacher."""
    if args or kwargs:
        raise TypeError(f"{type(layer).__name__} takes one input here, got more")
    base = layer.base_layer
    weights = weights_of_call(scope, layer)[index]
    if weights is None:
        return base(x)
    if isinstance(weights, torch.Tensor):
        return layer_output(base, x, weights, base.bias)
    y = base(x)
    if not scope.current.rows:   # one role on all rows, as peft computes it
        (role, _, _, A, B, s), = weights
        delta = layer_output(layer.lora_B[role], layer_output(layer.lora_A[role], x, A, None), B, None)
        return y + (delta * s if s != 1 else delta)
    for role, start, stop, A, B, s in weights:
        add_lora(y[start:stop], x[start:stop], layer.lora_A[role], layer.lora_B[role], A, B, s)
    return y


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_A, lora_B, A, B, s: float) -> None:
    """y += s·B·A·x in place (a Linear: one matmul for A, one fused multiply-add for B)."""
    if isinstance(lora_A, torch.nn.Linear):
        h = x.reshape(-1, x.shape[-1]) @ A.t()
        y.view(-1, y.shape[-1]).addmm_(h, B.t(), alpha=s)
        return
    delta = layer_output(lora_B, layer_output(lora_A, x, A, None), B, None)
    y += delta * s if s != 1 else delta


class _LayersOwn:
    def __getitem__(self, index):
        return None


LAYERS_OWN = _LayersOwn()   # the weights of a call that brings none: each layer's own


def weights_of_call(scope, layer):
    """The per-layer weights of the call in progress; a layer of a training network called
    outside any call is an error."""
    call = scope.current
    if call is None:
        raise RoleError(f"{type(layer).__name__} of a training network called outside a role")
    return call.weights if call.weights is not None else LAYERS_OWN


class WorkingCopies:
    """Full fine-tuning under autocast: the trainable Linear and Conv weights and biases of a
    network in the autocast dtype, cast together once per call (their gradients once per
    backward), where autocast casts each at each use. Each layer's forward reads its copy."""

    def __init__(self, scope, module: torch.nn.Module):
        self.layers = [m for m in module.modules()
                       if isinstance(m, MATMUL_LAYERS) and m.weight.requires_grad]
        self.masters = [p for layer in self.layers for p in (layer.weight, layer.bias) if p is not None]
        for index, layer in enumerate(self.layers):
            layer.forward = functools.partial(working_layer_forward, scope, index, layer)

    def for_call(self, role: Optional[str], rows: tuple):
        """Per layer (weight, bias) in the autocast dtype; None without autocast."""
        if not self.masters or compute_dtype(self.masters[0]) == self.masters[0].dtype:
            return None
        copies = iter(pieces(flat_copy(self.masters, compute_dtype(self.masters[0])),
                             [m.shape for m in self.masters]))
        return [(next(copies), next(copies) if layer.bias is not None else None) for layer in self.layers]


def working_layer_forward(scope, index: int, layer, x: torch.Tensor) -> torch.Tensor:
    weights = weights_of_call(scope, layer)[index]
    if weights is None:
        return type(layer).forward(layer, x)
    return layer_output(layer, x, *weights)
