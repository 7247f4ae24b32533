"""Every training path computes the plain reference's losses and gradients, by value.

The production side is the script's own iteration (train_tdm.build + train_tdm.tdm_iteration on
a tiny real model); the reference (tests/reference.py) is docs/method.md transcribed again in
float64, sharing no formula with tdm/, with separate ordinary modules per role, no checkpointing,
the full rollout, two teacher calls for CFG and no caching. Both start from the same perturbed
weights; the reference is given the random values the iteration drew (tests/harness.py records
them) and checks the draws against its own grid; losses, both updates' gradients and the weights
after both optimiser steps must agree.

The proofs run in float64 (networks and inputs), so that their verdict cannot depend on a CPU's,
a BLAS's or a batch size's rounding: measured over every family, mode and checkpointing
(scripts/equivalence_spread.py), the worst error is 1.5e-12 (an Adam step; gradients 4e-14) of a
tensor's scale against RTOL_FP64 = 1e-9, while a wrong gradient is off by its own size. Two smoke
checks keep the precisions that train: float32 and bf16 autocast, at bounds above their measured
spread.
"""
import os
import sys

import pytest
import torch

from conftest import FAMILIES
from harness import (PROMPTS, RTOL_FP64, TOY_PROMPTS, Production, assert_records_close,
                     assert_records_equal, assert_tensors_equal, reference, train_args)


def check(tiny_models, tmp_path, family, flags, micro_batches=1, precision="fp64", rtol=RTOL_FP64):
    """The script's iteration against the plain reference: in float64 by value, or in a
    precision that trains (fp32; bf16 under autocast) by rounding-tolerant smoke checks."""
    prompts = TOY_PROMPTS if family == "toy2d" else PROMPTS
    args = train_args(tiny_models(family), str(tmp_path), flags, family, prompts)
    production = Production(args, float64=precision == "fp64")
    batches = [prompts[2 * i: 2 * i + 2] for i in range(micro_batches)]
    actual = production.iterate(batches)
    expected = reference(production, [batches], torch.bfloat16 if precision == "bf16" else None)
    if precision == "fp64":
        assert_records_equal(actual, expected, rtol)
    else:
        assert_records_close(actual, expected, rtol)
    return production


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_and_mode_matches_the_reference(tiny_models, tmp_path, family, mode, checkpointing):
    flags = ["--train_mode", mode, "--use_separate"]
    check(tiny_models, tmp_path, family, flags + (["--gradient_checkpointing"] if checkpointing else []))


PIXART_OPTIONS = {
    "unify": ["--unify_steps", "1,2,4"],
    "fake_step_condition": ["--fake_step_condition"],
    "unify_fake_step_condition": ["--unify_steps", "1,2,4", "--fake_step_condition"],
    "cache_text_embeddings": ["--cache_text_embeddings"],
    "huber": ["--use_huber"],
    "huber_norm": ["--loss", "huber_norm"],
    "share_step_draw": ["--share_step_draw"],
    "mode2_randmid": ["--use_randmid", "--total_steps", "1000"],   # the only case without mode 1
    "full_rollout": ["--full_rollout"],
    "fake_score_updates": ["--fake_score_updates", "3"],   # two extra ψ steps, each on its own rollout
    "no_clipping_cfg1": ["--max_grad_norm", "0", "--cfg", "1.0"],
}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("option", sorted(PIXART_OPTIONS))
def test_pixart_options_match_the_reference(tiny_models, tmp_path, option, mode, checkpointing):
    flags = ["--train_mode", mode, *PIXART_OPTIONS[option]]
    if option != "mode2_randmid":
        flags.append("--use_separate")
    check(tiny_models, tmp_path, "pixart", flags + (["--gradient_checkpointing"] if checkpointing else []))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradient_accumulation_is_the_mean_over_micro_batches(tiny_models, tmp_path, mode):
    flags = ["--train_mode", mode, "--gradient_accumulation_steps", "2", "--gradient_checkpointing",
             "--use_separate"]
    check(tiny_models, tmp_path, "pixart", flags, micro_batches=2)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_unify_matches_the_reference_for_every_step_count(tiny_models, tmp_path, mode):
    """TDM-unify with the step index, over three accumulated micro-batches that draw K = 2, 4 and 1
    (seed 1; asserted): each K's grid, rollout, step tables and draws, where one iteration alone
    (the option case above, seed 0) draws only the deepest K."""
    flags = ["--train_mode", mode, "--unify_steps", "1,2,4", "--fake_step_condition", "--use_separate",
             "--seed", "1", "--gradient_accumulation_steps", "3"]
    production = check(tiny_models, tmp_path, "pixart", flags, micro_batches=3)
    assert sorted(draws.num_steps for draws in production.draws) == [1, 2, 4]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_extra_fake_score_updates_under_unify_roll_out_their_own_step_count(tiny_models, tmp_path, mode):
    """--fake_score_updates 3 with TDM-unify (and checkpointing): each of the iteration's three
    starts draws its own K (asserted: not all the same; seed 0 gives 4, 1 and 4), and every
    update still equals the reference's."""
    flags = ["--train_mode", mode, "--unify_steps", "1,2,4", "--fake_score_updates", "3",
             "--gradient_checkpointing", "--use_separate"]
    production = check(tiny_models, tmp_path, "pixart", flags)
    assert len({draws.num_steps for draws in production.draws}) > 1


# Smoke checks of the precisions that train, by each update's whole gradient (relative L2) and
# the losses: single elements of near-cancelling sums round differently with batch composition
# (training runs the teacher's CFG branches as one batch of 4, the reference as two of 2).
# Measured over every family, mode and checkpointing (scripts/equivalence_spread.py,
# 2026-12-05) against the reference's float64 maths: fp32 worst 2.5e-4 (gradient, PixArt LoRA:
# the training code's own float32 rounding) and 4e-5 (loss); bf16 autocast worst 0.02 and 0.0098.
# The bounds sit 4× and 10× above; a wrong gradient is off by its own size (the recompute bug: 1.22).
RTOL_FP32_SMOKE = 1e-3
RTOL_BF16_SMOKE = 0.2


def test_float32_training_matches_the_reference_within_rounding(tiny_models, tmp_path):
    flags = ["--train_mode", "lora", "--gradient_checkpointing", "--use_separate"]
    check(tiny_models, tmp_path, "pixart", flags, precision="fp32", rtol=RTOL_FP32_SMOKE)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_bf16_mixed_precision_matches_the_reference_in_bf16(tiny_models, tmp_path, mode):
    flags = ["--train_mode", mode, "--mixed_precision", "bf16", "--gradient_checkpointing",
             "--use_separate"]
    check(tiny_models, tmp_path, "pixart", flags, precision="bf16", rtol=RTOL_BF16_SMOKE)


# Compiled float64 graphs still hold float32 arithmetic: diffusers computes the sinusoidal
# timestep embedding in float32 whatever the model's dtype, and inductor's fp32 sin/cos/exp
# kernels round differently from eager ATen's (one fp32 ulp, 6e-8, at the embedding). Measured:
# 2e-9 of a gradient's scale; a graph traced under the wrong role is off by its own size.
RTOL_COMPILED = 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_torch_compile_matches_the_reference_and_compiles_once(tiny_models, tmp_path, mode):
    """--torch_compile (toy2d, with checkpointing): the first, compiled iteration equals the plain
    reference (float64, RTOL_COMPILED); later iterations compile no new graph (roles switch
    without recompiling)."""
    import torch._dynamo.utils

    args = train_args(tiny_models("toy2d"), str(tmp_path),
                      ["--train_mode", mode, "--torch_compile", "--gradient_checkpointing",
                       "--use_separate"], "toy2d", TOY_PROMPTS)
    production = Production(args, float64=True)
    actual = production.iterate([TOY_PROMPTS[:2]])
    assert_records_equal(actual, reference(production, [[TOY_PROMPTS[:2]]]), RTOL_COMPILED)
    counters = torch._dynamo.utils.counters
    for prompts in (TOY_PROMPTS[2:4], TOY_PROMPTS[4:6]):
        counters.clear()
        production.iterate([prompts])
        assert counters["stats"].get("unique_graphs", 0) == 0, dict(counters["stats"])


@pytest.mark.slow
@pytest.mark.parametrize("mode,flags", [("lora", []), ("full", []), ("full", ["--fake_score_updates", "2"])],
                         ids=["lora", "full", "full_two_fake_score_updates"])
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tiny_models, tmp_path, mode, flags):
    """Data parallelism: the averaged gradients and the weights after the step of two ranks
    (two prompts each) are the plain reference's on the four prompts in one batch; with two
    fake-score updates, DDP averages each of the fake score's two backward passes."""
    from conftest import ROOT, free_port, run_script
    from reference import Record

    model, out = tiny_models("pixart"), str(tmp_path)
    args = train_args(model, out, ["--train_mode", mode, "--gradient_checkpointing", *flags])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no",
           os.path.join(ROOT, "tests", "dp_worker.py"), model, out, mode, *flags]
    proc = run_script(cmd, env={"ACCELERATE_USE_CPU": "true"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]
    for name in ("fake_score_step", "student_step"):   # the ranks hold the same weights
        assert_tensors_equal(ranks[1]["record"][name], ranks[0]["record"][name], 0.0, name)
    production = Production(args, float64=True)
    production.student_state, production.fake_score_state = ranks[0]["student_state"], ranks[0]["fake_score_state"]
    expected = reference(production, [[PROMPTS[0:2]], [PROMPTS[2:4]]],
                         shard_draws=[ranks[0]["draws"], ranks[1]["draws"]])
    actual = Record(**ranks[0]["record"])
    # each rank's loss is the mean over its half: the whole batch's is the mean of the two
    for name in ("fake_score_loss", "student_loss"):
        setattr(actual, name, sum(r["record"][name] for r in ranks) / 2)
    assert_records_equal(actual, expected, RTOL_FP64)
