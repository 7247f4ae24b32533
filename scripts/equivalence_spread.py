#!/usr/bin/env python
"""How far the training path lands from the plain reference, per family, mode and precision:
the measurement behind the tolerances of tests/test_equivalence.py.

    python scripts/equivalence_spread.py [--families pixart,sd15] [--precisions fp64,fp32,bf16]

For every case (family × lora/full × plain/checkpointing) it runs the script's own iteration and
the plain reference of tests/reference.py on the same weights and random values, and prints the
worst relative error of each part (losses; gradients element by element, of each tensor's
scale; optimiser steps and, for bf16, gradients as a whole, relative L2). fp64: the networks and
inputs in float64; fp32: as trained without mixed precision; bf16: autocast.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from conftest import FAMILIES  # noqa: E402
from harness import (PROMPTS, TOY_PROMPTS, Production, record_errors, reference, relative_error,  # noqa: E402
                     train_args)

PRECISIONS = {"fp64": (True, "no", None), "fp32": (False, "no", None),
              "bf16": (False, "bf16", torch.bfloat16)}


def tiny_model(family: str, folder: str) -> str:
    """The folder of the family's tiny pipeline, as the tests build it (tests/conftest.py)."""
    import importlib

    from harness import toy_model

    if family == "toy2d":
        return toy_model(os.path.join(folder, family))
    module = importlib.import_module(f"tdm.tiny.{'sd' if family in ('sd15', 'sdxl') else family}")
    return getattr(module, f"build_tiny_{family}")(os.path.join(folder, family))


def measure(model: str, out: str, family: str, mode: str, checkpointing: bool, precision: str) -> dict:
    float64, mixed_precision, autocast = PRECISIONS[precision]
    prompts = TOY_PROMPTS if family == "toy2d" else PROMPTS
    flags = ["--train_mode", mode, "--use_separate", "--mixed_precision", mixed_precision]
    if checkpointing:
        flags.append("--gradient_checkpointing")
    production = Production(train_args(model, out, flags, family, prompts), float64=float64)
    actual = production.iterate([prompts[:2]])
    expected = reference(production, [[prompts[:2]]], autocast)
    errors = record_errors(actual, expected)
    for part in ("fake_score", "student"):   # as a whole: the low-precision test's measure
        errors[f"{part}_grads_l2"] = relative_error(getattr(actual, f"{part}_grads"),
                                                    getattr(expected, f"{part}_grads"))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--precisions", default="fp64,fp32,bf16")
    parser.add_argument("--modes", default="lora,full")
    args = parser.parse_args()
    columns = ["fake_score_loss", "student_loss", "fake_score_grads", "student_grads",
               "fake_score_step", "student_step", "fake_score_grads_l2", "student_grads_l2"]
    print("| family | mode | checkpointing | precision | " + " | ".join(columns) + " |")
    print("|" + "---|" * (4 + len(columns)))
    worst = {}
    with tempfile.TemporaryDirectory() as folder:
        for family in args.families.split(","):
            model = tiny_model(family, folder)
            for mode in args.modes.split(","):
                for checkpointing in (False, True):
                    for precision in args.precisions.split(","):
                        out = os.path.join(folder, "runs", f"{family}-{mode}-{checkpointing}-{precision}")
                        errors = measure(model, out, family, mode, checkpointing, precision)
                        for k, v in errors.items():
                            worst[(precision, k)] = max(worst.get((precision, k), 0.0), v)
                        print(f"| {family} | {mode} | {'yes' if checkpointing else 'no'} | {precision} | "
                              + " | ".join(f"{errors[c]:.2g}" for c in columns) + " |", flush=True)
    print()
    for precision in args.precisions.split(","):
        print(f"worst {precision}: " + ", ".join(f"{c} {worst[(precision, c)]:.2g}" for c in columns))


if __name__ == "__main__":
    main()
