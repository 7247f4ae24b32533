"""Every training path computes the plain reference's losses and gradients, by value.

The production side is the script's own iteration (train_tdm.build + train_tdm.tdm_iteration on
a tiny real model); the reference (tests/reference.py) uses separate ordinary modules per role,
no checkpointing, the full rollout, two teacher calls for CFG and no caching. Both start from
the same perturbed weights and replay the same random stream; losses, both updates' gradients
and the weights after both optimiser steps must agree.
"""
import os
import sys

import pytest
import torch

from conftest import FAMILIES
from harness import (PROMPTS, TOY_PROMPTS, Production, assert_records_close, assert_records_equal,
                     assert_tensors_equal, reference, train_args)


def check(tiny_models, tmp_path, family, flags, micro_batches=1, rtol=1e-4, autocast=None):
    prompts = TOY_PROMPTS if family == "toy2d" else PROMPTS
    args = train_args(tiny_models(family), str(tmp_path), flags, family, prompts)
    production = Production(args)
    batches = [prompts[2 * i: 2 * i + 2] for i in range(micro_batches)]
    expected = reference(production, [batches], autocast)
    actual = production.iterate(batches)
    if autocast is None:
        assert_records_equal(actual, expected, rtol)
    else:
        assert_records_close(actual, expected, rtol)


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


# bf16: the fake-score update is bitwise equal; the generator update differs only by rounding:
# with the teacher's CFG branches as two calls in training too, it is bitwise equal as well
# (measured), so the 2.9 % (lora) / 0.08 % (full) relative L2 gap is batch-4 vs batch-2 bf16
# matmuls in a near-cancelling x0_real − x0_fake. Before the autocast regions were split per
# update the gap was 26 % (full): the generator update read ψ's pre-step bf16 weight cache.
RTOL_BF16 = 5e-2


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_bf16_mixed_precision_matches_the_reference_in_bf16(tiny_models, tmp_path, mode):
    flags = ["--train_mode", mode, "--mixed_precision", "bf16", "--gradient_checkpointing",
             "--use_separate"]
    check(tiny_models, tmp_path, "pixart", flags, rtol=RTOL_BF16, autocast=torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_torch_compile_matches_the_reference_and_compiles_once(tiny_models, tmp_path, mode):
    """--torch_compile (toy2d, with checkpointing): the first, compiled iteration equals the plain
    reference; later iterations compile no new graph (roles switch without recompiling)."""
    import torch._dynamo.utils

    import train_tdm

    args = train_args(tiny_models("toy2d"), str(tmp_path),
                      ["--train_mode", mode, "--torch_compile", "--gradient_checkpointing",
                       "--use_separate"], "toy2d", TOY_PROMPTS)
    production = Production(args)
    expected = reference(production, [[TOY_PROMPTS[:2]]])
    assert_records_equal(production.iterate([TOY_PROMPTS[:2]]), expected)
    run, counters = production.run, torch._dynamo.utils.counters
    for prompts in (TOY_PROMPTS[2:4], TOY_PROMPTS[4:6]):
        counters.clear()
        train_tdm.tdm_iteration(run.accelerator, run.tdm, run.networks, run.encode(prompts), run.uncond,
                                run.latent_shape, run.fake_score_optimizer, run.student_optimizer,
                                run.lr_scheduler, args.max_grad_norm)
        assert counters["stats"].get("unique_graphs", 0) == 0, dict(counters["stats"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tiny_models, tmp_path, mode):
    """Data parallelism: the averaged gradients and the weights after the step of two ranks
    (two prompts each) are the plain reference's on the four prompts in one batch."""
    from conftest import ROOT, free_port, run_script
    from reference import Record

    model, out = tiny_models("pixart"), str(tmp_path)
    args = train_args(model, out, ["--train_mode", mode, "--gradient_checkpointing"])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no",
           os.path.join(ROOT, "tests", "dp_worker.py"), model, out, mode]
    proc = run_script(cmd, env={"ACCELERATE_USE_CPU": "true"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]
    for name in ("fake_score_step", "student_step"):   # the ranks hold the same weights
        assert_tensors_equal(ranks[1]["record"][name], ranks[0]["record"][name], 0.0, name)
    production = Production(args)
    production.student_state, production.fake_score_state = ranks[0]["student_state"], ranks[0]["fake_score_state"]
    expected = reference(production, [[PROMPTS[0:2]], [PROMPTS[2:4]]])
    actual = Record(**ranks[0]["record"])
    # each rank's loss is the mean over its half: the whole batch's is the mean of the two
    for name in ("fake_score_loss", "student_loss"):
        setattr(actual, name, sum(r["record"][name] for r in ranks) / 2)
    assert_records_equal(actual, expected)
