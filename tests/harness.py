"""Run one training iteration through the script's own entry points (train_tdm.build and
train_tdm.tdm_iteration) and the plain reference of tests/reference.py on the same weights and
random stream, and compare losses, gradients and the weights after the optimiser steps."""
from __future__ import annotations

import json
import os
from typing import Dict, List

import torch

from reference import (Record, Settings, concat_draws, draw_shard, plain_networks,
                       reference_iteration)

PROMPTS = ["a red cat on a mat", "a blue boat at sea", "a green tree in a field",
           "a yellow bird on a wire", "a small house by a lake", "an old car in the rain",
           "a bowl of fruit", "a castle on a hill"]
TOY_PROMPTS = ["0", "1", "2", "3", "", "1", "2", "0"]
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


def settings_of(args, backbone=None) -> Settings:
    """The reference's settings; --guidance_embedding auto is the backbone's own mode."""
    embedded = args.guidance_embedding
    if embedded is None:
        embedded = getattr(backbone, "guidance_embedding", False)
    return Settings(cfg=args.cfg, separate=args.use_separate, randmid=args.use_randmid,
                    guidance_embedding=embedded,
                    loss=args.loss, snr_gamma=args.snr_gamma,
                    importance_weight=not args.no_importance_weight,
                    share_step_draw=args.share_step_draw, unify_steps=tuple(args.unify_steps or ()),
                    fake_step_condition=args.fake_step_condition, num_steps=args.num_steps,
                    total_steps=args.total_steps)


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


class Production:
    """The training code's iteration, with its gradients read just before each optimiser step
    (after data-parallel averaging and clipping)."""

    def __init__(self, args, perturb_scale: float = None):
        import train_tdm

        reset_accelerate()
        self.args = args
        self.run = train_tdm.build(args)
        nets = self.run.networks
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
        self.grads = {}
        for role, optimizer, params in (("fake_score", self.run.fake_score_optimizer, self.fake_score),
                                        ("student", self.run.student_optimizer, self.student)):
            optimizer.optimizer.register_step_pre_hook(
                lambda opt, a, kw, role=role, params=params: self.grads.__setitem__(
                    role, {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}))

    def iterate(self, micro_batches: List[List[str]]) -> Record:
        import train_tdm

        run = self.run
        for prompts in micro_batches:
            fake_score_loss, student_loss, skipped = train_tdm.tdm_iteration(
                run.accelerator, run.tdm, run.networks, run.encode(prompts), run.uncond,
                run.latent_shape, run.fake_score_optimizer, run.student_optimizer, run.lr_scheduler,
                self.args.max_grad_norm)
            assert skipped == 0
        change = lambda ps: {n: p.detach() - self.before[id(p)] for n, p in ps.items()}  # noqa: E731
        return Record(fake_score_loss.item(), student_loss.item(), self.grads["fake_score"],
                      self.grads["student"], change(self.fake_score), change(self.student))


def reference(production: Production, shard_prompts: List[List[List[str]]],
              autocast_dtype=None) -> Record:
    """The plain iteration on the production's initial weights. `shard_prompts[s][i]`: the
    prompts of micro-batch i on process s (one process: a single shard); the shards of each
    micro-batch are concatenated into one batch."""
    from tdm.conditions import expand_condition
    from tdm.step_condition import step_tables

    args, run = production.args, production.run
    backbone = run.backbone
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        run.accelerator.mixed_precision, torch.float32)
    tables = step_tables(args.num_steps, args.unify_steps, args.fake_step_condition)
    plain = plain_networks(backbone, args.train_mode, weight_dtype, production.student_state,
                           production.fake_score_state, tables, args.lora_rank, args.lora_alpha)
    settings = settings_of(args, backbone)
    shared = torch.Generator().manual_seed(args.seed)
    rngs = [torch.Generator().manual_seed(args.seed + s) for s in range(len(shard_prompts))]
    micro_batches = []
    for i in range(len(shard_prompts[0])):
        draws = []
        for s, rng in enumerate(rngs):
            # every process draws K from the same shared stream: replay it once per micro-batch
            state = shared.get_state()
            draws.append(draw_shard(settings, len(shard_prompts[s][i]), run.latent_shape, 0,
                                    shared, rng))
            if s < len(rngs) - 1:
                shared.set_state(state)
        prompts = [p for s in range(len(shard_prompts)) for p in shard_prompts[s][i]]
        cond = backbone.encode_prompts(prompts)
        uncond = expand_condition(backbone.encode_prompts([""]), len(prompts))
        micro_batches.append((cond, uncond, concat_draws(draws)))
    return reference_iteration(plain, backbone, settings, micro_batches, args.learning_rate,
                               args.learning_rate * args.generator_lr_ratio, args.max_grad_norm,
                               autocast_dtype)


def assert_tensors_equal(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
                         rtol: float, what: str) -> None:
    """Same names; every tensor within `rtol` of its largest magnitude, or of a hundredth of the
    largest magnitude of them all for tensors that are about zero by cancellation, such as the
    gradient of an attention key projection or bias, which softmax's shift invariance cancels
    (fp32 rounding then reaches ~1e-4 of their own size)."""
    assert sorted(actual) == sorted(expected), f"{what}: names differ"
    overall = max(want.float().abs().max().item() for want in expected.values())
    for name, want in expected.items():
        got = actual[name].float()
        scale = max(want.float().abs().max().item(), 1e-2 * overall)
        err = (got - want.float()).abs().max().item()
        assert err <= rtol * scale, (f"{what} {name}: max error {err:.3g} vs scale "
                                     f"{scale:.3g} (rtol {rtol})")


def grad_norm(grads: Dict[str, torch.Tensor]) -> float:
    return float(sum(g.double().pow(2).sum() for g in grads.values()).sqrt())


def assert_records_equal(actual: Record, expected: Record, rtol: float = 1e-4) -> None:
    """Losses, both updates' gradients element by element, and the weight changes of both
    optimiser steps. Adam divides each gradient element by its own magnitude, so an element
    whose gradient is ~0 (rounding-level) can step anywhere in ±lr: the steps are compared as
    a whole (relative L2), the gradients that produce them element by element."""
    torch.testing.assert_close(actual.fake_score_loss, expected.fake_score_loss, rtol=rtol, atol=0)
    torch.testing.assert_close(actual.student_loss, expected.student_loss, rtol=rtol, atol=0)
    # a comparison of zeros would prove nothing
    assert grad_norm(expected.fake_score_grads) > 0 and grad_norm(expected.student_grads) > 0
    assert_tensors_equal(actual.fake_score_grads, expected.fake_score_grads, rtol, "fake-score gradient")
    assert_tensors_equal(actual.student_grads, expected.student_grads, rtol, "student gradient")
    for what, a, e in (("fake-score", actual.fake_score_step, expected.fake_score_step),
                       ("student", actual.student_step, expected.student_step)):
        error = relative_error(a, e)
        assert error <= 10 * rtol, f"{what} optimiser step: relative L2 error {error:.3g}"


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
        print(f"{what} gradient: relative L2 error {error:.3g}")
        assert error <= rtol, f"{what} gradient: relative L2 error {error:.3g} > {rtol}"
