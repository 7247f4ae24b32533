#!/usr/bin/env python
"""TDM on a 2-D Gaussian mixture, end to end: teacher pre-training (cached), distillation through
train_tdm.py, and evaluation by sliced Wasserstein distance to fresh ground-truth samples.

    python scripts/toy_benchmark.py --config configs/toy2d.yaml [--seeds 3] [--ablations] [--unify] [train_tdm.py flags ...]

The default job: pre-train the teacher into --pretrained_model_name_or_path, or reuse it
(tdm.toy.teacher.ensure_teacher), distil the student (train_tdm.py), evaluate every sampler
(tdm/toy/evaluate.py: SWD and the unbiased MMD², each with its floor, the "ground truth" row) and
write to the output_dir: toy_eval.json, toy_eval.md (the table in docs/benchmarks.md),
toy_samples.npz (one array per sampler plus the ground truth) and toy2d.png (one scatter panel
per sampler).

--seeds N repeats the main rows N times: student s (s = 1 … N−1) is distilled with --seed
SEED+s into OUTPUT_DIR/seed{s}, and it, the ground truth, the teacher's DDIM on the training
grid and DDIM 50 are evaluated on evaluation seeds s (tdm.toy.evaluate.seed_of: fresh
ground truth, reference and noise); the table gives mean ± std over the N. The figure, DDIM 200
and the experiments below use seed 0 only.

--handoff adds three samplers that hand over between the student and the teacher at τ_1, the
last step's input (tdm.toy.evaluate.handoff_samples): which step carries the student's error.

Two experiments on top of it, each in its own part below:

--ablations: the default job's flags with one change per row (Ablation), each distilled into
OUTPUT_DIR/ablations/FOLDER; their students' rows are added to toy_eval.md/.json.

--unify (TDM-unify): after the default job (whose K-step student is reused as the
single-K student when its flags are those of the comparison), train in OUTPUT_DIR/unify/
  unify         the job's flags plus --unify_steps 1,2,4 (one student for 1, 2 and 4 steps),
  k1, k2, k4    single-K students (--num_steps K; k4 only if the default job's student differs),
  k4_fake_step  the 4-step student with --fake_step_condition (the fake score sees k; mode 2),
all on the grids uniform(K, total_steps) (τ_k = k·T/K − 1), and evaluate each at K = 1, 2, 4
on the default job's noise, labels, reference and projections. Writes toy2d_unify.md (the table
and the two unify targets with pass/miss), toy2d_unify.json, toy2d_unify_samples.npz and
toy2d_unify.png (rows = students, columns = K). Four distillations more than the default job.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tdm.checks import Parser  # noqa: E402
from tdm.config import RunConfig, UsageError  # noqa: E402
from tdm.toy.evaluate import (MMD_BANDWIDTH, SEEDS, handoff_samples, markdown_table,  # noqa: E402
                              mmd2_table, mode_table, reference_samples, sample_all,
                              sample_step_counts, scatter_panel, summarize, swd_table,
                              write_outputs)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "toy2d.yaml"))
    p.add_argument("--samples", type=int, default=20000, help="Samples per sampler (≥ 20000).")
    p.add_argument("--reference_factor", type=int, default=5,
                   help="The fresh ground-truth reference has this many times --samples points.")
    p.add_argument("--projections", type=int, default=256)
    p.add_argument("--mmd_samples", type=int, default=10000,
                   help="Samples per sampler (and of the reference) for the unbiased MMD² (its cost "
                   "grows as n²); capped at --samples.")
    p.add_argument("--mmd_bandwidth", type=float, default=MMD_BANDWIDTH,
                   help="Gaussian-kernel bandwidth h of the MMD², in the toy's units (the default "
                   "mixture's mode std).")
    p.add_argument("--seeds", type=int, default=1,
                   help="Repeat the main rows with this many students (training seeds SEED, "
                   "SEED+1, …) and evaluation seeds; the table gives mean ± std (3 for "
                   "docs/benchmarks.md; 1 keeps the demo within its few minutes).")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest for this MLP and robust on a busy machine.")
    p.add_argument("--handoff", action="store_true",
                   help="Also hand over between student and teacher at the last step's input "
                   "(tdm.toy.evaluate.handoff_samples): which step carries the student's error.")
    p.add_argument("--ablations", action="store_true",
                   help="Also train and evaluate the ablation variants (README table).")
    p.add_argument("--unify", action="store_true",
                   help="After the default job, also train a TDM-unify student (--unify_steps "
                   "1,2,4), single-K students (K = 1, 2, 4) and the 4-step student with "
                   "--fake_step_condition, and compare them at 1, 2 and 4 steps "
                   "(toy2d_unify.md/.json/.png).")
    return p


# =================================================================================================
# the default job: pre-train (or reuse) the teacher, distil, evaluate, write outputs
# =================================================================================================
def distil(args: RunConfig) -> float:
    """train_tdm.py's main on a run config; returns its wall time. A rerun of the benchmark
    replaces the students of the previous one (--overwrite_output_dir)."""
    import train_tdm

    start = time.time()
    train_tdm.main(args.replace(overwrite_output_dir=True))
    return time.time() - start


def student_swd(backbone, args: RunConfig, reference, job) -> dict:
    """The SWD of the student in args.output_dir at 4 steps and 1 step (students only), and
    under "mmd" their MMD²."""
    samples = sample_all(backbone, backbone.load_student(args.output_dir), args.timesteps, args.cfg,
                         job.samples, students_only=True)
    return {**swd_table(samples, reference, job.projections),
            "mmd": mmd2_table(samples, reference, job.mmd_samples, job.mmd_bandwidth)}


def evaluate(backbone, args: RunConfig, job, repeat: int = 0):
    """(samples, {"swd": .., "mmd": ..}) of every sampler on evaluation seeds `repeat`: the
    student in args.output_dir, the teacher's DDIM (50 and 200 steps; 50 only for repeat ≥ 1)
    and the ground truth (the metrics' floor), against that repeat's fresh reference."""
    from tqdm.auto import tqdm

    # parts: the sampling, then per sampler its SWD and MMD², and the reference's own MMD² term
    with tqdm(total=1, desc=f"evaluation (seed {repeat})", unit="part") as bar:
        reference = reference_samples(backbone.mixture, job.samples * job.reference_factor, repeat)
        samples = sample_all(backbone, backbone.load_student(args.output_dir), args.timesteps,
                             args.cfg, job.samples, repeat=repeat,
                             teacher_steps=(50, 200) if repeat == 0 else (50,))
        bar.total = 1 + 2 * len(samples) + 1
        bar.update(1)
        scores = {"swd": swd_table(samples, reference, job.projections, bar),
                  "mmd": mmd2_table(samples, reference, job.mmd_samples, job.mmd_bandwidth, bar)}
    return samples, reference, scores


def run(argv=None) -> dict:
    from tdm.backbones import load_backbone
    from tdm.config import parse_args
    from tdm.toy.teacher import ensure_teacher

    job, train_argv = build_parser().parse_known_args(argv)
    if job.samples < 1 or job.reference_factor < 1 or job.seeds < 1:
        raise SystemExit("error: --samples, --reference_factor and --seeds must be >= 1")
    job.mmd_samples = min(job.mmd_samples, job.samples)
    if job.mmd_samples < 2 or job.mmd_bandwidth <= 0:
        raise SystemExit("error: --mmd_samples must be >= 2 and --mmd_bandwidth > 0")
    args = parse_args(["--config", job.config, *train_argv])
    if args.backbone != "toy2d":
        raise UsageError(f"the toy benchmark runs the toy2d backbone, not --backbone {args.backbone}")
    unify_rows = unify_students(args) if job.unify else None   # flag errors stop the run at once
    torch.set_num_threads(job.threads)

    # 1. the teacher: pre-trained here unless its folder holds one for these settings
    start = time.time()
    ensure_teacher(args.pretrained_model_name_or_path, args.backbone_options)
    backbone = load_backbone(args.pretrained_model_name_or_path, args.backbone,
                             options=args.backbone_options)
    timings = {"teacher": time.time() - start}
    # 2. the student
    timings["distillation"] = distil(args)
    # 3. evaluation: every sampler against a fresh reference
    start = time.time()
    samples, reference, scores = evaluate(backbone, args, job)
    timings["evaluation"] = time.time() - start
    result = {"output_dir": args.output_dir, "samples": job.samples, "reference_samples": len(reference),
              "projections": job.projections, "mmd_samples": job.mmd_samples,
              "mmd_bandwidth": job.mmd_bandwidth, "seeds": SEEDS, "timesteps": args.timesteps,
              **scores, "repeats": [{"seed": args.seed, "output_dir": args.output_dir, **scores}]}
    result["modes"] = mode_table(samples, backbone.mixture)   # where the errors lie (seed 0)
    # 4. --seeds N: N − 1 more students and evaluation seeds, for mean ± std of the main rows
    for repeat in range(1, job.seeds):
        variant = args.replace(seed=args.seed + repeat,
                               output_dir=os.path.join(args.output_dir, f"seed{repeat}"))
        timings[f"distillation_seed{repeat}"] = distil(variant)
        start = time.time()
        _, _, scores = evaluate(backbone, variant, job, repeat)
        timings[f"evaluation_seed{repeat}"] = time.time() - start
        result["repeats"].append({"seed": variant.seed, "output_dir": variant.output_dir, **scores})
    result["summary"] = summarize(result["repeats"])

    # the experiments, on the same teacher, reference and evaluation inputs
    if job.handoff:
        handoff = handoff_samples(backbone, backbone.load_student(args.output_dir), args.timesteps,
                                  args.cfg, job.samples)
        result["handoff"] = {"swd": swd_table(handoff, reference, job.projections),
                             "mmd": mmd2_table(handoff, reference, job.mmd_samples, job.mmd_bandwidth),
                             "modes": mode_table(handoff, backbone.mixture)}
    if job.ablations:
        result["ablations"] = run_ablations(args, backbone, reference, job)
    if job.unify:
        result["unify"] = run_unify(args, unify_rows, backbone, reference, job,
                                    result["swd"]["ground_truth"])
        timings["unify"] = result["unify"]["seconds"]
    result["seconds"] = timings
    write_outputs(result, samples, args.output_dir)
    return result


# =================================================================================================
# experiment --ablations: the default job's flags with one change per row
# =================================================================================================
@dataclass(frozen=True)
class Ablation:
    """One ablation: distilled into OUTPUT_DIR/ablations/`folder` with the default job's flags
    and `changes` (flag name → value); `label` names its rows in toy_eval.md/.json."""

    folder: str
    label: str
    changes: dict


def ablations(args: RunConfig) -> List[Ablation]:
    """The other interval mode, no importance weight, the other generator loss, the other train
    mode, one step draw for both updates."""
    other_loss = "huber" if args.loss == "mse" else "mse"
    other_mode = "lora" if args.train_mode == "full" else "full"
    folder, label = (("mode1", "mode 1 (separate intervals)") if not args.use_separate
                     else ("mode2", "mode 2 (intervals up to T)"))
    return [
        Ablation(folder, label, {"use_separate": not args.use_separate}),
        Ablation("no_is", "without importance weight", {"importance_weight": False}),
        Ablation(other_loss, f"{other_loss} loss", {"loss": other_loss}),
        Ablation(other_mode, f"{other_mode} fine-tune", {"train_mode": other_mode}),
        Ablation("share_k", "one step draw for both updates (--share_step_draw)", {"share_step_draw": True}),
    ]


def run_ablations(args: RunConfig, backbone, reference, job) -> dict:
    """{label: the SWD of its student at 4 and 1 steps, and its distillation time}."""
    rows = {}
    for ablation in ablations(args):
        variant = args.replace(output_dir=os.path.join(args.output_dir, "ablations", ablation.folder),
                               **ablation.changes)
        seconds = distil(variant)
        rows[ablation.label] = {**student_swd(backbone, variant, reference, job), "seconds": seconds}
    return rows


# =================================================================================================
# experiment --unify (TDM-unify): one student for 1, 2 and 4 steps against single-K students
# =================================================================================================
UNIFY_COUNTS = (1, 2, 4)
UNIFY_TOLERANCE = 1.10     # target 1: swd_unify(K) <= 1.10 · swd_single(K) at every K
ONE_STEP_FACTOR = 0.5      # target 2: swd_unify(1) <= 0.5 · swd_4only(1)


@dataclass(frozen=True)
class UnifyRow:
    """One student of the unify table, evaluated at every K of UNIFY_COUNTS. Where its student
    comes from is exactly one of: `student`, the run config it is distilled with;
    `reuses_default`, the default job's student (its flags are this row's); or
    `without_step_embedding_of`, the key of a row above, whose student is evaluated without its
    step embedding (as plain diffusers loads it)."""

    key: str
    label: str
    short: str                      # the figure's panel title
    trained_for: List[int]          # the step counts it was trained for (bold in the table)
    student: Optional[RunConfig] = None
    reuses_default: bool = False
    without_step_embedding_of: Optional[str] = None

    def __post_init__(self):
        sources = [self.student is not None, self.reuses_default, self.without_step_embedding_of is not None]
        if sum(sources) != 1:
            raise ValueError(f"unify row {self.key}: give exactly one of student, reuses_default, "
                             "without_step_embedding_of")


def settings(args: RunConfig) -> dict:
    """The flags that make a distillation what it is (everything but where it is written)."""
    return {k: v for k, v in vars(args).items()
            if not k.startswith("_") and k not in ("output_dir", "config")}


def unify_students(args: RunConfig) -> List[UnifyRow]:
    """The rows of the unify table. Built from the job's flags before its distillation, so that
    flag errors stop the run at once."""
    if "timesteps" in args._explicit:
        raise UsageError("--unify compares the grids uniform(K, --total_steps); drop --timesteps")

    def variant(folder, **changes) -> RunConfig:
        return args.replace(**{"timesteps": None, "unify_steps": None, "fake_step_condition": False,
                               "output_dir": os.path.join(args.output_dir, "unify", folder),
                               **changes})

    counts = ",".join(map(str, UNIFY_COUNTS))
    rows = [UnifyRow("unify", f"TDM-unify (--unify_steps {counts})", f"TDM-unify {counts}",
                     list(UNIFY_COUNTS), student=variant("unify", unify_steps=list(UNIFY_COUNTS)))]
    for K in UNIFY_COUNTS:
        single = variant(f"k{K}", num_steps=K)
        reused = settings(single) == settings(args)
        label = f"{K}-step only (--num_steps {K})" + (", the default job's" if reused else "")
        rows.append(UnifyRow(f"k{K}", label, f"{K}-step only", [K],
                             student=None if reused else single, reuses_default=reused))
    rows.append(UnifyRow("unify_plain", "TDM-unify student without its step embedding (as plain "
                         "diffusers loads the LoRA)", "unify, no step emb.", list(UNIFY_COUNTS),
                         without_step_embedding_of="unify"))
    K = max(UNIFY_COUNTS)
    rows.append(UnifyRow(f"k{K}_fake_step", f"{K}-step only, --fake_step_condition",
                         f"{K}-step, fake step cond.", [K],
                         student=variant(f"k{K}_fake_step", num_steps=K, fake_step_condition=True)))
    return rows


def run_unify(args: RunConfig, students: List[UnifyRow], backbone, reference, job,
              ground_truth_swd: float) -> dict:
    """Train the rows of unify_students (the default job's student is reused), evaluate each at
    every K of UNIFY_COUNTS and write toy2d_unify.{md,json,png} and toy2d_unify_samples.npz."""
    from tdm.trajectory import StepGrid

    start = time.time()
    rows, samples = {}, {}
    for row in students:
        if row.student is not None:
            seconds, folder = distil(row.student), row.student.output_dir
        elif row.reuses_default:
            seconds, folder = None, args.output_dir
        else:
            seconds, folder = None, rows[row.without_step_embedding_of]["output_dir"]
        samples[row.key] = sample_step_counts(backbone, backbone.load_student(folder), job.samples,
                                              args.total_steps, UNIFY_COUNTS,
                                              step_embedding=row.without_step_embedding_of is None)
        swd = swd_table({str(K): x for K, x in samples[row.key].items()}, reference, job.projections)
        rows[row.key] = {"label": row.label, "short": row.short, "trained_for": row.trained_for,
                         "output_dir": folder, "swd": swd, "seconds": seconds}
    unify = {"counts": list(UNIFY_COUNTS), "total_steps": args.total_steps,
             "grids": {str(K): StepGrid.uniform(K, args.total_steps).timesteps for K in UNIFY_COUNTS},
             "samples": job.samples, "reference_samples": len(reference),
             "projections": job.projections, "seeds": SEEDS, "ground_truth_swd": ground_truth_swd,
             "students": rows, "targets": unify_targets({k: r["swd"] for k, r in rows.items()})}
    unify["seconds"] = time.time() - start
    write_unify_outputs(unify, samples, args.output_dir)
    return unify


def unify_targets(swd: dict) -> dict:
    """The two unify targets from {student key: {"K": SWD}}, with the numbers."""
    within = {}
    for K in UNIFY_COUNTS:
        unify, single = swd["unify"][str(K)], swd[f"k{K}"][str(K)]
        within[str(K)] = {"unify": unify, "single": single, "ratio": unify / single,
                          "pass": bool(unify <= UNIFY_TOLERANCE * single)}
    four = f"k{max(UNIFY_COUNTS)}"
    unify, four_only = swd["unify"]["1"], swd[four]["1"]
    return {
        "unify_within_10pct_of_single_K": {
            "rule": f"swd_unify(K) <= {UNIFY_TOLERANCE:.2f} * swd_single(K) for K in {list(UNIFY_COUNTS)}",
            "per_K": within, "pass": all(row["pass"] for row in within.values())},
        "one_step_2x_better_than_4_step_only": {
            "rule": f"swd_unify(1) <= {ONE_STEP_FACTOR} * swd_{four}(1)",
            "unify": unify, "four_step_only": four_only, "ratio": unify / four_only,
            "pass": bool(unify <= ONE_STEP_FACTOR * four_only)},
    }


def unify_markdown(unify: dict) -> str:
    counts = unify["counts"]
    lines = ["| student | trained for | " + " | ".join(f"SWD {K} step{'s' if K > 1 else ''}"
                                                    for K in counts) + " | distillation (s) |",
             "|---|---|" + "---|" * len(counts) + "---|"]
    for row in unify["students"].values():
        cells = [(f"**{row['swd'][str(K)]:.4f}**" if K in row["trained_for"]
                  else f"{row['swd'][str(K)]:.4f}") for K in counts]
        seconds = "reused" if row["seconds"] is None else f"{row['seconds']:.0f}"
        lines.append(f"| {row['label']} | {', '.join(map(str, row['trained_for']))} | "
                     + " | ".join(cells) + f" | {seconds} |")
    lines += ["", f"SWD to ground truth (n={unify['samples']}, {unify['projections']} projections, "
              f"grids uniform(K, {unify['total_steps']})); bold: the step counts a student was "
              f"trained for. A fresh ground-truth sample scores {unify['ground_truth_swd']:.4f} "
              "(the metric's own spread at this size).", ""]
    return "\n".join(lines + target_lines(unify["targets"])) + "\n"


def target_lines(targets: dict) -> list:
    verdict = {True: "PASS", False: "MISS"}
    within = targets["unify_within_10pct_of_single_K"]
    lines = [f"Target 1, unify within 10 % of the single-K student at each K "
             f"({within['rule']}): **{verdict[within['pass']]}**"]
    for K, row in within["per_K"].items():
        lines.append(f"- K={K}: unify {row['unify']:.4f} vs single {row['single']:.4f}, "
                     f"ratio {row['ratio']:.3f}: {verdict[row['pass']]}")
    one = targets["one_step_2x_better_than_4_step_only"]
    lines += ["", f"Target 2, at 1 step unify at least 2× better than the 4-step-only student "
              f"({one['rule']}): **{verdict[one['pass']]}** — unify {one['unify']:.4f} vs "
              f"{one['four_step_only']:.4f}, ratio {one['ratio']:.3f}"]
    return lines


def save_unify_figure(unify: dict, samples: dict, path: str) -> None:
    from tdm.images import image_grid

    panels = [scatter_panel(samples[key][K].numpy(),
                            f"{row['short']}\n{K} step{'s' if K > 1 else ''}, "
                            f"SWD {row['swd'][str(K)]:.4f}")
              for key, row in unify["students"].items() for K in unify["counts"]]
    image_grid(panels, rows=len(unify["students"])).save(path)


def write_unify_outputs(unify: dict, samples: dict, out: str) -> None:
    """toy2d_unify.json, toy2d_unify.md, toy2d_unify_samples.npz and toy2d_unify.png in `out`."""
    with open(os.path.join(out, "toy2d_unify.json"), "w") as f:
        json.dump(unify, f, indent=2)
    with open(os.path.join(out, "toy2d_unify.md"), "w") as f:
        f.write(unify_markdown(unify))
    np.savez(os.path.join(out, "toy2d_unify_samples.npz"),
             **{f"{key}_{K}step": x.numpy() for key, per_k in samples.items() for K, x in per_k.items()})
    save_unify_figure(unify, samples, os.path.join(out, "toy2d_unify.png"))


# =================================================================================================
def main(argv=None) -> int:
    try:
        result = run(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(result))
    print(f"timings (s): {json.dumps({k: round(v, 1) for k, v in result['seconds'].items()})}")
    folder = result["output_dir"]
    print(f"figure: {os.path.join(folder, 'toy2d.png')}\ntable:  {os.path.join(folder, 'toy_eval.md')}")
    if "unify" in result:
        print("\n" + unify_markdown(result["unify"]))
        print(f"figure: {os.path.join(folder, 'toy2d_unify.png')}\n"
              f"table:  {os.path.join(folder, 'toy2d_unify.md')}\n"
              f"json:   {os.path.join(folder, 'toy2d_unify.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
