"""Run one training iteration through the script's own entry points (train_tdm.build and
train_tdm.tdm_iteration) and the plain reference of tests/reference.py on the same weights and
the random values the training code drew, and compare losses, gradients and the weights after
the optimiser steps."""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Dict, List, Optional

import torch

from reference import (Draw, Draws, Record, concat_draws, plain_networks, reference_iteration,
                       settings_from_flags)

PROMPTS = ["a red cat on a mat", "a blue boat at sea", "a green tree in a field",
           "a yellow bird on a wire", "a small house by a lake", "an old car in the rain",
           "a bowl of fruit", "a castle on a hill"]
TOY_PROMPTS = ["0", "1", "2", "3", "", "1", "2", "0"]
# float64 proofs: the worst error measured is 1.5e-12 of a tensor's scale (test_equivalence.py)
RTOL_FP64 = 1e-9
TOY_OPTIONS = {"mixture": {"circle": {"modes": 4, "radius": 2.0}, "std": 0.1, "conditional": True},
               "network": {"hidden": 32, "depth": 2, "time_channels": 16},
               "teacher": {"steps": 5, "batch_size": 64}}


def toy_model(folder: str) -> str:
    """The toy2d model folder of TOY_OPTIONS: its teacher pre-trained there (the explicit step
    before training), or reused."""
    from tdm.toy.teacher import ensure_teacher

    return ensure_teacher(folder, TOY_OPTIONS)


def reset_accelerate() -> None:
    """Each build starts a fresh accelerate state (it is a process-wide singleton)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train_args(model: str, out: str, flags=(), family: str = "pixart", prompts=PROMPTS):
    """train_tdm.py's flags for a tiny model (any flag of `flags` overrides the defaults)."""
    from tdm.config import parse_args

    os.makedirs(out, exist_ok=True)
    prompts_file = os.path.join(out, "prompts.txt")
    text = "\n".join(p if p else "0" for p in prompts) + "\n"
    if not os.path.isfile(prompts_file) or open(prompts_file).read() != text:
        with open(prompts_file, "w") as f:   # written once: launched ranks only read it
            f.write(text)
    base = ["--pretrained_model_name_or_path", model, "--output_dir", os.path.join(out, "run"),
            "--prompts", prompts_file, "--resolution", "32", "--seed", "0", "--lora_rank", "4",
            "--learning_rate", "1e-3", "--report_to", "none", "--train_batch_size", "2",
            "--mixed_precision", "no", "--cfg", "3.0"]
    if family == "toy2d":
        base += ["--backbone", "toy2d", "--backbone_options", json.dumps(TOY_OPTIONS)]
    if family == "cogvideox":
        base += ["--num_frames", "9"]
    if family == "wan":
        base += ["--num_frames", "5"]
    return parse_args(base + list(flags))


def perturb(params, seed: int, scale: float) -> None:
    """Move the trainable weights off their initialisation (LoRA B = 0, step tables = 0, student
    = fake = teacher), so that every role computes something different."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_((scale * torch.randn(p.shape, generator=g)).to(p.dtype))


def role_modules(networks):
    """(student module, fake-score module), unwrapped; the same module twice in lora mode."""
    from tdm.roles import unwrap

    return unwrap(networks.student_eval.module), unwrap(networks.fake_score_eval.module)


def named(module, params) -> Dict[str, torch.nn.Parameter]:
    ids = {id(p) for p in params}
    return {n: p for n, p in module.named_parameters() if id(p) in ids}


@contextlib.contextmanager
def default_dtype(dtype: Optional[torch.dtype]):
    """torch's default dtype for the duration (None: unchanged). In float64 every tensor an
    iteration creates (noise, draws, guidance values) is float64, as the networks are."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def float64_networks():
    """train_tdm.build with every denoiser loaded in float64 (before data-parallel wrappers see
    it, so DDP's gradient buckets are float64 too) and float64 as torch's default dtype."""
    import tdm.backbones

    load_backbone = tdm.backbones.load_backbone

    def load_float64_backbone(*args, **kwargs):
        backbone = load_backbone(*args, **kwargs)
        load_denoiser = backbone.load_denoiser
        backbone.load_denoiser = lambda dtype=None: load_denoiser(torch.float64)
        return backbone

    tdm.backbones.load_backbone = load_float64_backbone
    try:
        with default_dtype(torch.float64):
            yield
    finally:
        tdm.backbones.load_backbone = load_backbone


def record_draws(tdm) -> List[dict]:
    """What the training code draws in each iteration — z, K, both draws, both diffusion noises —
    read by wrapping the methods of the run's own TDM instance (the tests' side: no hook in
    tdm/). One entry per iteration, in the order drawn."""
    iterations = []
    start, draw_num_steps, draw, randn = tdm.start, tdm.draw_num_steps, tdm.draw, tdm.randn

    def recorded_start(*args, **kwargs):
        iterations.append({"noise": []})
        return start(*args, **kwargs)

    def recorded_num_steps():
        iterations[-1]["K"] = draw_num_steps()
        return iterations[-1]["K"]

    def recorded_draw(*args, **kwargs):
        pair = draw(*args, **kwargs)
        fields = ("k", "t_g", "t_e", "t")
        iterations[-1]["draws"] = [Draw(*(getattr(d, f).detach().cpu().clone() for f in fields))
                                   for d in pair]
        return pair

    def recorded_randn(*args, **kwargs):
        noise = randn(*args, **kwargs)
        iterations[-1]["noise"].append(noise.detach().cpu().clone())
        return noise

    tdm.start, tdm.draw_num_steps, tdm.draw, tdm.randn = (recorded_start, recorded_num_steps,
                                                          recorded_draw, recorded_randn)
    return iterations


def as_draws(iteration: dict) -> Draws:
    """One recorded start: z first, then the fake-score update's n, then the student's; a start
    for a fake-score update only (--fake_score_updates) has no student draw and no third noise."""
    assert len(iteration["noise"]) in (2, 3), f"{len(iteration['noise'])} noise draws in one start"
    z, fake_score_noise, *student_noise = iteration["noise"]
    fake_score_draw, student_draw = iteration["draws"]
    if not student_noise:
        return Draws(iteration["K"], z, fake_score_draw, None, fake_score_noise, None)
    return Draws(iteration["K"], z, fake_score_draw, student_draw, fake_score_noise, student_noise[0])


class Production:
    """The training code's iteration, with its gradients read just before each optimiser step
    (after data-parallel averaging and clipping). `float64`: the networks are built in float64
    (and the fp32 LoRA weights cast), the text conditions cast, and the iteration runs with
    float64 as torch's default dtype, so that its verdict cannot depend on a CPU's, a BLAS's or
    a batch size's rounding."""

    def __init__(self, args, perturb_scale: float = None, float64: bool = False):
        import train_tdm
        from tdm.conditions import condition_to

        reset_accelerate()
        self.args = args
        self.dtype = dtype = torch.float64 if float64 else None
        with float64_networks() if float64 else contextlib.nullcontext():
            self.run = train_tdm.build(args)
        nets = self.run.networks
        if float64:
            for module in nets.modules():
                module.double()
        self.encode = lambda prompts: condition_to(self.run.encode(prompts), dtype=dtype)
        self.uncond = condition_to(self.run.uncond, dtype=dtype)
        student_module, fake_module = role_modules(nets)
        self.student = named(student_module, nets.student_params)
        self.fake_score = named(fake_module, nets.fake_score_params)
        assert len(self.student) == len(nets.student_params) and len(self.fake_score) == len(nets.fake_score_params)
        scale = perturb_scale or (0.05 if args.train_mode == "lora" else 0.01)
        perturb(self.student.values(), 1, scale)
        perturb(self.fake_score.values(), 2, scale)
        self.before = {id(p): p.detach().clone() for p in [*self.student.values(), *self.fake_score.values()]}
        self.student_state = {k: v.detach().clone() for k, v in student_module.state_dict().items()}
        self.fake_score_state = {k: v.detach().clone() for k, v in fake_module.state_dict().items()}
        self.recorded = record_draws(self.run.tdm)
        self.grads = {}
        for role, optimizer, params in (("fake_score", self.run.fake_score_optimizer, self.fake_score),
                                        ("student", self.run.student_optimizer, self.student)):
            optimizer.optimizer.register_step_pre_hook(
                lambda opt, a, kw, role=role, params=params: self.grads.__setitem__(
                    role, {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}))

    @property
    def draws(self) -> List[Draws]:
        """The random values of every iteration so far (reference: the first ones)."""
        return [as_draws(iteration) for iteration in self.recorded]

    def iterate(self, micro_batches: List[List[str]]) -> Record:
        import train_tdm

        run = self.run
        for prompts in micro_batches:
            with default_dtype(self.dtype):
                fake_score_loss, student_loss, skipped = train_tdm.tdm_iteration(
                    run.accelerator, run.tdm, run.networks, self.encode(prompts), self.uncond,
                    run.latent_shape, run.fake_score_optimizer, run.student_optimizer,
                    run.lr_scheduler, self.args.max_grad_norm, self.args.fake_score_updates)
            assert skipped == 0
        change = lambda ps: {n: p.detach() - self.before[id(p)] for n, p in ps.items()}  # noqa: E731
        return Record(fake_score_loss.item(), student_loss.item(), self.grads["fake_score"],
                      self.grads["student"], change(self.fake_score), change(self.student))


def iterations(starts: List[Draws]) -> List[tuple]:
    """Recorded starts grouped per iteration: ([fake-score-only starts], the full start)."""
    grouped, extra = [], []
    for draws in starts:
        if draws.student_draw is None:
            extra.append(draws)
        else:
            grouped.append((extra, draws))
            extra = []
    return grouped


def reference(production: Production, shard_prompts: List[List[List[str]]],
              autocast_dtype=None, shard_draws: Optional[List[List[Draws]]] = None) -> Record:
    """The plain iteration on the production's initial weights and with the random values its
    first iterations drew (run it after `production.iterate`). `shard_prompts[s][i]`: the prompts
    of micro-batch i on process s (one process: a single shard), `shard_draws[s][i]` its draws
    (default: this production's); the shards of each micro-batch are concatenated into one batch."""
    args, run = production.args, production.run
    shard_draws = shard_draws or [production.draws]
    assert all(len(shard) >= len(shard_prompts[0]) for shard in shard_draws), \
        "no draws recorded for every micro-batch: run production.iterate before the reference"
    with default_dtype(production.dtype):
        return _reference(production, args, run, shard_prompts, shard_draws, autocast_dtype)


def _reference(production, args, run, shard_prompts, shard_draws, autocast_dtype) -> Record:
    backbone = run.backbone
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        run.accelerator.mixed_precision, torch.float32)
    plain = plain_networks(backbone, args.pretrained_model_name_or_path, run.latent_shape,
                           args.train_mode, weight_dtype, production.student_state,
                           production.fake_score_state, args.lora_rank, args.lora_alpha,
                           float64=production.dtype == torch.float64)
    micro_batches = []
    shard_iterations = [iterations(shard) for shard in shard_draws]
    for i in range(len(shard_prompts[0])):
        prompts = [p for shard in shard_prompts for p in shard[i]]
        draws = concat_draws([shard[i][1] for shard in shard_iterations])
        extra = [concat_draws([shard[i][0][j] for shard in shard_iterations])
                 for j in range(len(shard_iterations[0][i][0]))]
        micro_batches.append((backbone.encode_prompts(prompts), backbone.encode_prompts([""]), draws, extra))
    return reference_iteration(plain, settings_from_flags(args._flags), micro_batches,
                               args.learning_rate, args.learning_rate * args.generator_lr_ratio,
                               args.max_grad_norm, autocast_dtype)


def tensor_errors(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Per tensor (same names), in float64: max |actual − expected| over the tensor's scale, its
    largest magnitude, or a hundredth of the largest magnitude of them all for tensors that are
    about zero by cancellation, such as the gradient of an attention key projection or bias,
    which softmax's shift invariance cancels (rounding then reaches far more of their own size)."""
    assert sorted(actual) == sorted(expected), "names differ"
    overall = max(want.double().abs().max().item() for want in expected.values())
    errors = {}
    for name, want in expected.items():
        want = want.double()
        scale = max(want.abs().max().item(), 1e-2 * overall)
        errors[name] = (actual[name].double() - want).abs().max().item() / scale
    return errors


def assert_tensors_equal(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
                         rtol: float, what: str) -> None:
    """Every tensor within `rtol` of its scale (tensor_errors)."""
    name, error = max(tensor_errors(actual, expected).items(), key=lambda item: item[1])
    assert error <= rtol, f"{what} {name}: max error {error:.3g} of its scale (rtol {rtol})"


def grad_norm(grads: Dict[str, torch.Tensor]) -> float:
    return float(sum(g.double().pow(2).sum() for g in grads.values()).sqrt())


def record_errors(actual: Record, expected: Record) -> Dict[str, float]:
    """The worst relative error of each part of a record: losses, gradients element by element
    (tensor_errors) and each optimiser step as a whole (relative L2: Adam divides each gradient
    element by its own magnitude, so an element whose gradient is ~0 can step anywhere in ±lr)."""
    relative = lambda a, e: abs(a - e) / abs(e)  # noqa: E731
    return {"fake_score_loss": relative(actual.fake_score_loss, expected.fake_score_loss),
            "student_loss": relative(actual.student_loss, expected.student_loss),
            "fake_score_grads": max(tensor_errors(actual.fake_score_grads, expected.fake_score_grads).values()),
            "student_grads": max(tensor_errors(actual.student_grads, expected.student_grads).values()),
            "fake_score_step": relative_error(actual.fake_score_step, expected.fake_score_step),
            "student_step": relative_error(actual.student_step, expected.student_step)}


def assert_records_equal(actual: Record, expected: Record, rtol: float) -> None:
    """Losses, both updates' gradients element by element and both optimiser steps within `rtol`
    (record_errors); a comparison of zeros would prove nothing, so the gradients must not be."""
    assert grad_norm(expected.fake_score_grads) > 0 and grad_norm(expected.student_grads) > 0
    assert_tensors_equal(actual.fake_score_grads, expected.fake_score_grads, rtol, "fake-score gradient")
    assert_tensors_equal(actual.student_grads, expected.student_grads, rtol, "student gradient")
    worst = {part: error for part, error in record_errors(actual, expected).items() if error > rtol}
    assert not worst, f"relative errors above {rtol}: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items())


def relative_error(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> float:
    """‖a − e‖ / ‖e‖ over all tensors together (one vector per update)."""
    assert sorted(actual) == sorted(expected)
    diff = {n: actual[n].double() - expected[n].double() for n in expected}
    return grad_norm(diff) / grad_norm(expected)


def assert_records_close(actual: Record, expected: Record, rtol: float) -> None:
    """Low precision: losses, and each update's whole gradient within `rtol` in L2 (rounding in
    bf16 differs with batch composition, so single elements of near-cancelling sums do not
    match; a wrong gradient is off by its own size, as the recompute bug was: 1.22)."""
    torch.testing.assert_close(actual.fake_score_loss, expected.fake_score_loss, rtol=rtol, atol=0)
    torch.testing.assert_close(actual.student_loss, expected.student_loss, rtol=rtol, atol=0)
    assert grad_norm(expected.fake_score_grads) > 0 and grad_norm(expected.student_grads) > 0
    for what, a, e in (("fake-score", actual.fake_score_grads, expected.fake_score_grads),
                       ("student", actual.student_grads, expected.student_grads)):
        error = relative_error(a, e)
        assert error <= rtol, f"{what} gradient: relative L2 error {error:.3g} > {rtol}"


def card_snippet(card: str) -> str:
    """The Python block of a model card (README.md), as a user would copy it."""
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)
