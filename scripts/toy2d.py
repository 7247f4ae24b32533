#!/usr/bin/env python
"""TDM on a 2-D Gaussian mixture, end to end: teacher pre-training (cached), distillation through
train_tdm.py, and evaluation by sliced Wasserstein distance to fresh ground-truth samples.

    python scripts/toy2d.py --config configs/toy2d.yaml [--ablations] [--unify] [train_tdm.py flags ...]

Writes to the output_dir: toy_eval.json, toy_eval.md (the table in docs/benchmarks.md), toy_samples.npz (one
array per sampler plus the ground truth) and toy2d.png (one scatter panel per sampler).

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
import contextlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

SEEDS = {"ground_truth": 1, "reference": 2, "noise": 3, "projections": 0}
SAMPLER_TITLES = {
    "ground_truth": "ground truth",
    "teacher_ddim4": "teacher DDIM 4 (training grid)",
    "teacher_ddim50": "teacher DDIM 50",
    "teacher_ddim200": "teacher DDIM 200",
    "student_4step": "TDM student 4 steps",
    "student_1step": "TDM student 1 step",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "toy2d.yaml"))
    p.add_argument("--samples", type=int, default=20000, help="Samples per sampler (≥ 20000).")
    p.add_argument("--reference_factor", type=int, default=5,
                   help="The fresh ground-truth reference has this many times --samples points.")
    p.add_argument("--projections", type=int, default=256)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest for this MLP and robust on a busy machine.")
    p.add_argument("--ablations", action="store_true",
                   help="Also train and evaluate the ablation variants (README table).")
    p.add_argument("--unify", action="store_true",
                   help="After the default job, also train a TDM-unify student (--unify_steps "
                   "1,2,4), single-K students (K = 1, 2, 4) and the 4-step student with "
                   "--fake_step_condition, and compare them at 1, 2 and 4 steps "
                   "(toy2d_unify.md/.json/.png).")
    return p


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def guided(teacher, uncond: dict, cfg: float):
    """The teacher with classifier-free guidance on both x̂0 and ε̂ (docs/method.md §5), for DDIM."""
    from tdm.conditions import cat_conditions, expand_condition
    from tdm.losses import classifier_free_guidance

    if cfg == 1.0:
        return teacher

    def denoise(x_t, t, cond):
        both = cat_conditions(cond, expand_condition(uncond, x_t.shape[0]))
        x0, eps = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
        return (classifier_free_guidance(x0_c, x0_u, cfg), classifier_free_guidance(eps_c, eps_u, cfg))

    return denoise


def ground_truth(mixture, n: int, seed: int):
    points, component = mixture.sample(n, torch.Generator().manual_seed(seed))
    return points, component


def evaluation_inputs(backbone, n: int):
    """(ground truth, its class labels' condition, initial noise): the same for every sampler."""
    mixture = backbone.mixture
    truth, component = ground_truth(mixture, n, SEEDS["ground_truth"])
    labels = [mixture.labels[c] for c in component] if mixture.labels else [""] * n
    cond = backbone.encode_prompts(labels)
    noise = torch.randn((n, 2), generator=torch.Generator().manual_seed(SEEDS["noise"]))
    return truth, cond, noise


def sample_all(backbone, student_net, args, n: int, students_only: bool = False) -> dict:
    """Every sampler on the same initial noise and the same class labels. DDIM with N steps is
    tdm's rollout on N uniformly spaced timesteps (docs/method.md §2); student 1 step is the rollout
    on the grid [τ_K]."""
    from tdm.trajectory import StepGrid, rollout

    path = backbone.path
    truth, cond, noise = evaluation_inputs(backbone, n)
    grid = StepGrid(args.timesteps)
    student = backbone.denoiser(student_net.eval())
    samples = {"ground_truth": truth} if not students_only else {}
    if not students_only:
        teacher = guided(backbone.denoiser(backbone.load_denoiser().eval()),
                         backbone.encode_prompts([""]), args.cfg)
        samples["teacher_ddim4"] = rollout(teacher, noise, cond, grid, path).sample
        for steps in (50, 200):
            uniform = StepGrid.uniform(steps, path.num_timesteps)
            samples[f"teacher_ddim{steps}"] = rollout(teacher, noise, cond, uniform, path).sample
    samples["student_4step"] = rollout(student, noise, cond, grid, path).sample
    samples["student_1step"] = rollout(student, noise, cond, StepGrid(grid.timesteps[:1]), path).sample
    return samples


@torch.no_grad()
def sample_step_counts(backbone, student_net, n: int, total_steps: int, counts,
                       step_embedding: bool = True) -> dict:
    """{K: the student's K-step samples} on the grids uniform(K, total_steps), the noise and
    labels of sample_all. A step-conditioned (TDM-unify) student is told K (set_num_steps);
    another one just takes the K steps (a 4-step student at K = 1 runs the grid [τ_4]).
    step_embedding=False runs a unify student as plain diffusers would: without its embedding."""
    from tdm.step_condition import find_step_embeddings, set_num_steps
    from tdm.trajectory import StepGrid, rollout

    _, cond, noise = evaluation_inputs(backbone, n)
    student = backbone.denoiser(student_net.eval())
    holder = find_step_embeddings(student_net)
    samples = {}
    for K in counts:
        if holder is not None:   # without the embedding: the stock network
            set_num_steps(student_net, K if step_embedding else None)
        samples[K] = rollout(student, noise, cond, StepGrid.uniform(K, total_steps),
                             backbone.path).sample
    return samples


def swd_table(samples: dict, reference: torch.Tensor, projections: int) -> dict:
    from tdm.metrics import sliced_wasserstein

    return {name: sliced_wasserstein(x, reference, projections, SEEDS["projections"])
            for name, x in samples.items()}


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def scatter_panel(points: np.ndarray, title: str, size: int = 320, extent: float = 3.0):
    """A density scatter of `points` in [-extent, extent]² with a title band (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    counts, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size,
                                  range=[[-extent, extent], [-extent, extent]])
    shade = 1.0 - np.exp(-counts[::-1] / 2.0)           # rows top-down = y descending
    rgb = np.stack([1 - 0.9 * shade, 1 - 0.75 * shade, 1 - 0.35 * shade], axis=-1)
    panel = Image.new("RGB", (size, size + 40), "white")
    panel.paste(Image.fromarray((rgb * 255).astype(np.uint8)), (0, 40))
    draw = ImageDraw.Draw(panel)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:   # Pillow < 10.1
        font = ImageFont.load_default()
    for i, line in enumerate(title.split("\n")):
        draw.text((6, 3 + 17 * i), line, fill="black", font=font)
    draw.rectangle([0, 40, size - 1, size + 39], outline="grey")
    return panel


def save_figure(samples: dict, swd: dict, path: str) -> None:
    from tdm.images import image_grid

    panels = [scatter_panel(x.numpy(), f"{SAMPLER_TITLES[name]}\nSWD {swd[name]:.4f}")
              for name, x in samples.items()]
    image_grid(panels, rows=2).save(path)


def markdown_table(result: dict) -> str:
    lines = [f"| sampler | NFE | SWD to ground truth (n={result['samples']}, "
             f"{result['projections']} projections) |", "|---|---|---|"]
    nfe = {"ground_truth": "–", "teacher_ddim4": 4, "teacher_ddim50": 50, "teacher_ddim200": 200,
           "student_4step": 4, "student_1step": 1}
    for name, value in result["swd"].items():
        lines.append(f"| {SAMPLER_TITLES[name]} | {nfe[name]} | {value:.4f} |")
    for name, row in result.get("ablations", {}).items():
        lines.append(f"| TDM student 4 steps, {name} | 4 | {row['student_4step']:.4f} |")
        lines.append(f"| TDM student 1 step, {name} | 1 | {row['student_1step']:.4f} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, samples: dict, output_dir: str) -> None:
    np.savez(os.path.join(output_dir, "toy_samples.npz"),
             **{name: x.numpy() for name, x in samples.items()})
    with open(os.path.join(output_dir, "toy_eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(output_dir, "toy_eval.md"), "w") as f:
        f.write(markdown_table(result))
    save_figure(samples, result["swd"], os.path.join(output_dir, "toy2d.png"))


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------
def ablations(args):
    """(folder, label, changed flags, context) per row: the other interval mode, no importance
    weight, the other generator loss, the other train mode."""
    other_loss = "huber" if args.loss == "mse" else "mse"
    other_mode = "lora" if args.train_mode == "full" else "full"
    none = contextlib.nullcontext
    mode = ("mode1", "mode 1 (separate intervals)") if not args.use_separate else \
        ("mode2", "mode 2 (intervals up to T)")
    return [
        (*mode, {"use_separate": not args.use_separate}, none),
        ("no_is", "without importance weight", {"no_importance_weight": True}, none),
        (other_loss, f"{other_loss} loss", {"loss": other_loss}, none),
        (other_mode, f"{other_mode} fine-tune", {"train_mode": other_mode}, none),
        ("share_k", "one step draw for both updates (--share_step_draw)", {"share_step_draw": True}, none),
    ]


def distil(args) -> float:
    """train_tdm.py's main on a resolved namespace; returns its wall time."""
    import train_tdm

    start = time.time()
    train_tdm.main(args)
    return time.time() - start


def run(argv=None) -> dict:
    from tdm.backbones import load_backbone
    from tdm.config import parse_args

    job, train_argv = build_parser().parse_known_args(argv)
    if job.samples < 1 or job.reference_factor < 1:
        raise SystemExit("error: --samples and --reference_factor must be >= 1")
    args = parse_args(["--config", job.config, *train_argv])
    students = unify_students(args) if job.unify else None
    torch.set_num_threads(job.threads)
    start = time.time()
    backbone = load_backbone(args.pretrained_model_name_or_path, args.backbone,
                             options=args.backbone_options)
    timings = {"teacher": time.time() - start, "distillation": distil(args)}
    start = time.time()
    reference, _ = ground_truth(backbone.mixture, job.samples * job.reference_factor,
                                SEEDS["reference"])
    samples = sample_all(backbone, backbone.load_student(args.output_dir), args, job.samples)
    result = {"output_dir": args.output_dir, "samples": job.samples, "reference_samples": len(reference),
              "projections": job.projections, "seeds": SEEDS, "timesteps": args.timesteps,
              "swd": swd_table(samples, reference, job.projections)}
    timings["evaluation"] = time.time() - start
    if job.ablations:
        result["ablations"] = run_ablations(args, backbone, reference, job)
    if job.unify:
        result["unify"] = run_unify(args, students, backbone, reference, job,
                                    result["swd"]["ground_truth"])
        timings["unify"] = result["unify"]["seconds"]
    result["seconds"] = timings
    write_outputs(result, samples, args.output_dir)
    return result


def run_ablations(args, backbone, reference, job) -> dict:
    """Each ablation: the default run's flags with one change, its own output folder."""
    rows = {}
    for folder, label, changes, context in ablations(args):
        variant = args.replace(output_dir=os.path.join(args.output_dir, "ablations", folder), **changes)
        with context():
            seconds = distil(variant)
        samples = sample_all(backbone, backbone.load_student(variant.output_dir), variant,
                             job.samples, students_only=True)
        rows[label] = {**swd_table(samples, reference, job.projections), "seconds": seconds}
    return rows


# ---------------------------------------------------------------------------------------------
# TDM-unify (--unify)
# ---------------------------------------------------------------------------------------------
UNIFY_COUNTS = (1, 2, 4)
UNIFY_TOLERANCE = 1.10     # target 1: swd_unify(K) <= 1.10 · swd_single(K) at every K
ONE_STEP_FACTOR = 0.5      # target 2: swd_unify(1) <= 0.5 · swd_4only(1)


def settings(args) -> dict:
    """The flags that make a distillation what it is (everything but where it is written)."""
    return {k: v for k, v in vars(args).items()
            if not k.startswith("_") and k not in ("output_dir", "config")}


def unify_students(args) -> list:
    """(key, label, short label, trained-for counts, namespace, or None = the default job's
    student, or the key of a row above = that row's student evaluated without its step
    embedding) per row of the unify table. Built from the job's flags before its distillation,
    so that flag errors stop the run at once."""
    from tdm.config import UsageError

    if "timesteps" in args._explicit:
        raise UsageError("--unify compares the grids uniform(K, --total_steps); drop --timesteps")

    def variant(folder, **changes):
        return args.replace(**{"timesteps": None, "unify_steps": None, "fake_step_condition": False,
                               "output_dir": os.path.join(args.output_dir, "unify", folder),
                               **changes})

    counts = ",".join(map(str, UNIFY_COUNTS))
    rows = [("unify", f"TDM-unify (--unify_steps {counts})", f"TDM-unify {counts}",
             list(UNIFY_COUNTS), variant("unify", unify_steps=list(UNIFY_COUNTS)))]
    for K in UNIFY_COUNTS:
        single = variant(f"k{K}", num_steps=K)
        reused = settings(single) == settings(args)
        rows.append((f"k{K}", f"{K}-step only (--num_steps {K})" + (", the default job's" if reused else ""),
                     f"{K}-step only", [K], None if reused else single))
    rows.append(("unify_plain", "TDM-unify student without its step embedding (as plain diffusers "
                 "loads the LoRA)", "unify, no step emb.", list(UNIFY_COUNTS), "unify"))
    K = max(UNIFY_COUNTS)
    rows.append((f"k{K}_fake_step", f"{K}-step only, --fake_step_condition",
                 f"{K}-step, fake step cond.", [K],
                 variant(f"k{K}_fake_step", num_steps=K, fake_step_condition=True)))
    return rows


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


def run_unify(args, students: list, backbone, reference, job, ground_truth_swd: float) -> dict:
    """Train the rows of unify_students (the default job's student is reused), evaluate each at
    every K of UNIFY_COUNTS and write toy2d_unify.{md,json,png} and toy2d_unify_samples.npz."""
    from tdm.trajectory import StepGrid

    start = time.time()
    rows, samples = {}, {}
    for key, label, short, trained_for, variant in students:
        reuse = variant is None or isinstance(variant, str)
        seconds = None if reuse else distil(variant)
        folder = (args.output_dir if variant is None else rows[variant]["output_dir"] if reuse
                  else variant.output_dir)
        samples[key] = sample_step_counts(backbone, backbone.load_student(folder), job.samples,
                                          args.total_steps, UNIFY_COUNTS,
                                          step_embedding=not isinstance(variant, str))
        swd = swd_table({str(K): x for K, x in samples[key].items()}, reference, job.projections)
        rows[key] = {"label": label, "short": short, "trained_for": trained_for,
                     "output_dir": folder, "swd": swd, "seconds": seconds}
    unify = {"counts": list(UNIFY_COUNTS), "total_steps": args.total_steps,
             "grids": {str(K): StepGrid.uniform(K, args.total_steps).timesteps for K in UNIFY_COUNTS},
             "samples": job.samples, "reference_samples": len(reference),
             "projections": job.projections, "seeds": SEEDS, "ground_truth_swd": ground_truth_swd,
             "students": rows, "targets": unify_targets({k: r["swd"] for k, r in rows.items()})}
    unify["seconds"] = time.time() - start
    out = args.output_dir
    with open(os.path.join(out, "toy2d_unify.json"), "w") as f:
        json.dump(unify, f, indent=2)
    with open(os.path.join(out, "toy2d_unify.md"), "w") as f:
        f.write(unify_markdown(unify))
    np.savez(os.path.join(out, "toy2d_unify_samples.npz"),
             **{f"{key}_{K}step": x.numpy() for key, per_k in samples.items() for K, x in per_k.items()})
    save_unify_figure(unify, samples, os.path.join(out, "toy2d_unify.png"))
    return unify


def main(argv=None) -> int:
    from tdm.config import UsageError

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
