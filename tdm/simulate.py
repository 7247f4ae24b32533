"""A simulated accelerator for planning runs: networks of any size without weights (fake tensors),
live device memory traced by kind, and the optimisers' memory as training has it on a GPU.

The simulated device is `SIMULATED` (cpu:1): every tensor on it is a FakeTensor (shape, dtype,
no data), so a 12 B-parameter network costs no memory here, while tensors of the host (the draws,
the tokenizer's ids, the RNG) stay real and the training code runs unchanged: it only sees
`accelerator.device`. Used by tdm/plan.py.
"""
from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections import Counter
from functools import partial

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorConverter, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SIMULATED = torch.device("cpu", 1)
ALLOCATOR_BLOCK = 512   # CUDA's caching allocator hands out multiples of 512 bytes


def _on_simulated(value) -> bool:
    if isinstance(value, FakeTensor):
        return True
    if isinstance(value, (torch.device, str)):
        try:
            return torch.device(value) == SIMULATED
        except RuntimeError:   # a string that is not a device
            return False
    return False


def _read_back(tensor: torch.Tensor):
    """What `.item()` of a device value gives: finite / true, so that no update is skipped."""
    if tensor.dtype == torch.bool:
        return True
    return 1.0 if tensor.dtype.is_floating_point else 1


class _UnmemoisedConverter(FakeTensorConverter):
    """Fresh fake outputs without a memo entry: the memo holds a weak reference to each, and torch
    refuses to swap a parameter that has one, which `module.to(...)` does with fake parameters."""

    def from_meta_and_device(self, fake_mode, t, device, pytype=None, dispatch_keys=None):
        return FakeTensor(fake_mode, t, device, pytype=pytype, dispatch_keys=dispatch_keys)


def _onto_simulated(constructor):
    """torch.tensor, as_tensor or asarray that honours device=SIMULATED: a CPU build drops a
    CPU device's index and returns a host tensor, so build it on the host and move it."""
    def constructed(*args, **kwargs):
        if not _on_simulated(kwargs.get("device") or torch.get_default_device()):
            return constructor(*args, **kwargs)
        requires_grad = kwargs.pop("requires_grad", False)
        host = constructor(*args, **{**kwargs, "device": "cpu"})
        # (not host.to(SIMULATED): fake mode folds a small host tensor's copy on the host)
        return torch.empty_like(host, device=SIMULATED).copy_(host).requires_grad_(requires_grad)
    return functools.wraps(constructor)(constructed)


DATA_CONSTRUCTORS = ("tensor", "as_tensor", "asarray")


class SimulatedDevice(FakeTensorMode):
    """Ops that touch SIMULATED run on fake tensors; all others (host work) run for real. A
    device value read back on the host reads as true or finite (`_read_back`, `nonzero`).
    Within, torch.tensor/as_tensor/asarray honour device=SIMULATED (`_onto_simulated`)."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self.fake_tensor_converter.__class__ = _UnmemoisedConverter

    _entered = 0   # fake mode re-enters itself: the constructors are swapped on the first entry only

    def __enter__(self):
        if not self._entered:
            # torch's device contexts recognise constructors by identity, in a set made on first
            # use: made now, it holds torch's own, not the ones swapped in here
            torch.utils._device._device_constructors()
            self._constructors = {name: getattr(torch, name) for name in DATA_CONSTRUCTORS}
            for name, constructor in self._constructors.items():
                setattr(torch, name, _onto_simulated(constructor))
        self._entered += 1
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._entered -= 1
            if not self._entered:
                for name, constructor in self._constructors.items():
                    setattr(torch, name, constructor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(_on_simulated(v) for v in tree_leaves((args, kwargs))):
            return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            return _read_back(args[0])
        if func is torch.ops.aten.nonzero.default:   # every value reads as true (see _read_back)
            x = args[0]
            return torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        if func is torch.ops.aten._to_copy.default and not isinstance(args[0], FakeTensor):
            # a host tensor moving onto the device: a fresh fake one (fake mode would fold the copy
            # of a one-value tensor on the host, where a CPU device's index is dropped)
            x = args[0]
            empty = torch.ops.aten.empty.memory_format
            return super().__torch_dispatch__(empty, types, (list(x.shape),), {
                "dtype": kwargs.get("dtype") or x.dtype, "device": SIMULATED})
        return super().__torch_dispatch__(func, types, args, kwargs)


def _low_precision(value) -> bool:
    return (isinstance(value, torch.Tensor) and value.device == SIMULATED
            and value.dtype in (torch.float16, torch.bfloat16))


def _float32_inputs(fn):
    def wrapped(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            upcast = lambda v: v.float() if _low_precision(v) else v  # noqa: E731
            args, kwargs = [upcast(a) for a in args], {k: upcast(v) for k, v in kwargs.items()}
        return fn(*args, **kwargs)
    return functools.wraps(fn)(wrapped)


def _float32_result(fn):
    def wrapped(input, *args, **kwargs):
        if torch.is_autocast_enabled("cpu") and _low_precision(input) and kwargs.get("dtype") is None:
            kwargs = {**kwargs, "dtype": torch.float32}
        return fn(input, *args, **kwargs)
    return functools.wraps(fn)(wrapped)


# CUDA's autocast runs these in float32 (norms, upsampling; softmax accumulates in float32),
# where the CPU autocast of the simulated device leaves the low precision
# (aten/src/ATen/autocast_mode.cpp: the CUDA fp32 and fp32_set_opt_dtype lists)
CUDA_FLOAT32 = {"layer_norm": _float32_inputs, "group_norm": _float32_inputs,
                "interpolate": _float32_inputs, "softplus": _float32_inputs,
                "softmax": _float32_result, "log_softmax": _float32_result}


@contextlib.contextmanager
def cuda_autocast():
    """Within: autocast on the simulated device follows CUDA's lists for CUDA_FLOAT32, the ops
    whose precision decides activation memory (a float32 normalised copy is what the following
    layers save). torch.nn.functional's functions are wrapped for the duration, not a
    TorchFunctionMode: activation recompute in backward runs outside the mode stack."""
    F = torch.nn.functional
    saved = {name: getattr(F, name) for name in CUDA_FLOAT32}
    for name, rule in CUDA_FLOAT32.items():
        setattr(F, name, rule(saved[name]))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)


def _keep_in_float32(model: torch.nn.Module, names) -> None:
    """The modules a library keeps in float32 whatever the requested dtype (`_keep_in_fp32_modules`)."""
    for name, module in model.named_modules():
        if any(part in names for part in name.split(".")):
            module.float()


def _cast_state(model: torch.nn.Module, dtype, keep=()) -> None:
    """What diffusers' from_pretrained casts to `dtype`: the state dict's floating tensors
    (parameters, persistent buffers), float32 where a name part is in `keep`; buffers computed
    at construction (positional tables) keep their dtype."""
    for name, module in model.named_modules():
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None or not tensor.is_floating_point() or key in module._non_persistent_buffers_set:
                continue
            target = torch.float32 if any(p in keep for p in f"{name}.{key}".split(".")) else dtype
            if key in module._parameters:
                tensor.data = tensor.data.to(target)
            else:
                module._buffers[key] = tensor.to(target)


def _materialise(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and buffer of a meta-device `model` as an empty tensor of its dtype on
    SIMULATED (tied tensors stay tied)."""
    made = {}

    def empty(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            new = torch.empty(t.shape, dtype=t.dtype, device=SIMULATED)
            made[id(t)] = torch.nn.Parameter(new, t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
        return made[id(t)]

    for module in model.modules():
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                (module._parameters if key in module._parameters else module._buffers)[key] = empty(tensor)
    return model


def _diffusers_model(cls, path, subfolder=None, dtype=None, torch_dtype=None, revision=None, **_):
    """diffusers' from_pretrained without weights: the architecture of the config, cast as
    diffusers loads it (`_cast_state`), on SIMULATED only in its final dtypes (diffusers reads the
    weights in those dtypes, so a GPU never holds a float32 copy of a bfloat16 model)."""
    config = cls.load_config(path, subfolder=subfolder, revision=revision)
    with torch.device("meta"):
        model = cls.from_config(config)
    dtype = dtype or torch_dtype
    if dtype is not None:
        _cast_state(model, dtype, cls._keep_in_fp32_modules or ())
    return _materialise(model).eval()


def _transformers_model(cls, path, *_, subfolder="", dtype=None, torch_dtype=None, revision=None,
                        **__):
    """transformers' from_pretrained without weights; `_keep_in_fp32_modules` stay float32 under
    float16 (and `_keep_in_fp32_modules_strict` under bfloat16 too), as transformers loads them."""
    kwargs = {"revision": revision} if revision else {}
    config = cls.config_class.from_pretrained(path, subfolder=subfolder, **kwargs)
    dtype = dtype or torch_dtype or torch.float32
    with torch.device(SIMULATED):
        model = cls._from_config(config, dtype=dtype)
    if dtype == torch.float16:
        _keep_in_float32(model, cls._keep_in_fp32_modules or ())
    if dtype in (torch.float16, torch.bfloat16):
        _keep_in_float32(model, cls._keep_in_fp32_modules_strict or ())
    return model.eval()


@contextlib.contextmanager
def weightless_loading():
    """Within: `from_pretrained` of every diffusers and transformers model builds the architecture
    of its config on SIMULATED and reads no weight file (the folder needs only its configs)."""
    from diffusers.models.modeling_utils import ModelMixin
    from transformers.modeling_utils import PreTrainedModel

    saved = ModelMixin.__dict__["from_pretrained"], PreTrainedModel.__dict__["from_pretrained"]
    ModelMixin.from_pretrained = classmethod(_diffusers_model)
    PreTrainedModel.from_pretrained = classmethod(_transformers_model)
    try:
        yield
    finally:
        ModelMixin.from_pretrained, PreTrainedModel.from_pretrained = saved


@contextlib.contextmanager
def accelerate_on(device: torch.device):
    """accelerate's process state on `device` (ACCELERATE_TORCH_DEVICE), fresh on entry and on exit
    (the state is a process-wide singleton)."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    previous = os.environ.get("ACCELERATE_TORCH_DEVICE")
    os.environ["ACCELERATE_TORCH_DEVICE"] = str(device)
    reset()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_TORCH_DEVICE")
        else:
            os.environ["ACCELERATE_TORCH_DEVICE"] = previous
        reset()


class MemoryTrace(TorchDispatchMode):
    """Bytes of the live tensor storages on `device` by kind, and their peak, as CUDA's
    max_memory_allocated counts them (each storage rounded up to `block` bytes). A storage counts
    from the op that makes it until it is freed; it takes the kind current at its birth (`kind`),
    which `relabel` can change later (a gradient is born in backward)."""

    def __init__(self, device: torch.device, block: int = 1):
        super().__init__()
        self.device, self.block = device, block
        self.kind = "other"
        self.current = Counter()
        self.peak, self.at_peak = 0, {}
        self._live = {}   # id(storage) -> [bytes, kind, weakref]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.device == self.device:
                self.track(value)
        return out

    def track(self, tensor: torch.Tensor, kind: str = None) -> None:
        """Count `tensor`'s storage (once) as `kind` (default: the current kind)."""
        storage = tensor.untyped_storage()
        if id(storage) in self._live:
            return
        size = -(-storage.nbytes() // self.block) * self.block
        entry = [size, kind or self.kind, None]
        entry[2] = weakref.ref(storage, partial(self._freed, id(storage), entry))
        self._live[id(storage)] = entry
        self._add(entry[1], size)

    def keep_only(self, tensors) -> None:
        """Stop counting every storage but those of `tensors` (host tensors of a run on the CPU,
        which a GPU run would keep off the device)."""
        keep = {id(t.untyped_storage()) for t in tensors}
        for key in [k for k in self._live if k not in keep]:
            size, kind, _ = self._live.pop(key)
            self.current[kind] -= size
        self.reset_peak()

    def relabel(self, tensor: torch.Tensor, kind: str) -> None:
        entry = self._live.get(id(tensor.untyped_storage()))
        if entry is not None and entry[1] != kind:
            self.current[entry[1]] -= entry[0]
            entry[1] = kind
            self.current[kind] += entry[0]

    @contextlib.contextmanager
    def labelled(self, kind: str):
        """Storages born within count as `kind`."""
        previous, self.kind = self.kind, kind
        try:
            yield
        finally:
            self.kind = previous

    def reset_peak(self) -> None:
        """Peak from now on (what is live now is its floor)."""
        self.peak, self.at_peak = self.total, dict(self.current)

    @property
    def total(self) -> int:
        return sum(self.current.values())

    def _add(self, kind: str, size: int) -> None:
        self.current[kind] += size
        total = self.total
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.current)

    def _freed(self, key, entry, _ref) -> None:
        if self._live.get(key) is entry:
            del self._live[key]
            self.current[entry[1]] -= entry[0]


class OptimiserFootprint(torch.optim.Optimizer):
    """The memory of the optimiser a GPU run uses, allocated at the first step, without the
    update (values are fake): fused AdamW keeps two states in each parameter's dtype and a
    float32 step and updates in place; bitsandbytes' AdamW8bit (`eight_bit`) keeps two uint8
    states with a float32 absmax per block of 256 values, and 32-bit states for tensors of under
    4096 values. `allocate` makes them all at once."""

    def __init__(self, params, eight_bit: bool = False):
        super().__init__(params, {})
        self.eight_bit = eight_bit

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not self.state[p]:
                    self.state[p] = self._states(p)

    @torch.no_grad()
    def allocate(self) -> None:
        """Every parameter's states now, as after the first step of training."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p] = self._states(p)

    def _states(self, p: torch.nn.Parameter) -> dict:
        if self.eight_bit and p.numel() >= 4096:
            blocks = -(-p.numel() // 256)
            return {"state1": torch.zeros_like(p, dtype=torch.uint8),
                    "state2": torch.zeros_like(p, dtype=torch.uint8),
                    "absmax1": torch.zeros(blocks, device=p.device),
                    "absmax2": torch.zeros(blocks, device=p.device)}
        dtype = torch.float32 if self.eight_bit else p.dtype
        return {"step": torch.zeros((), device=p.device),
                "exp_avg": torch.zeros_like(p, dtype=dtype),
                "exp_avg_sq": torch.zeros_like(p, dtype=dtype)}
