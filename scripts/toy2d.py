#!/usr/bin/env python
"""TDM on a 2-D Gaussian mixture, end to end: teacher pre-training (cached), distillation through
train_tdm.py, and evaluation by sliced Wasserstein distance to fresh ground-truth samples.

    python scripts/toy2d.py --config configs/toy2d.yaml [--ablations] [train_tdm.py flags ...]

Writes to the output_dir: toy_eval.json, toy_eval.md (the README table), toy_samples.npz (one
array per sampler plus the ground truth) and toy2d.png (one scatter panel per sampler).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
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
    return p


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def guided(teacher, uncond: dict, cfg: float):
    """The teacher with classifier-free guidance on both x̂0 and ε̂ (TDM_SPEC §5), for DDIM."""
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


def sample_all(backbone, student_net, args, n: int, students_only: bool = False) -> dict:
    """Every sampler on the same initial noise and the same class labels. DDIM with N steps is
    tdm's rollout on N uniformly spaced timesteps (TDM_SPEC §2); student 1 step is the rollout
    on the grid [τ_K]."""
    from tdm.trajectory import StepGrid, rollout

    mixture, path = backbone.mixture, backbone.path
    truth, component = ground_truth(mixture, n, SEEDS["ground_truth"])
    labels = [mixture.labels[c] for c in component] if mixture.labels else [""] * n
    cond = backbone.encode_prompts(labels)
    noise = torch.randn((n, 2), generator=torch.Generator().manual_seed(SEEDS["noise"]))
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
    result["seconds"] = timings
    write_outputs(result, samples, args.output_dir)
    return result


def run_ablations(args, backbone, reference, job) -> dict:
    """Each ablation: the default run's flags with one change, its own output folder."""
    rows = {}
    for folder, label, changes, context in ablations(args):
        variant = copy.copy(args)
        variant.output_dir = os.path.join(args.output_dir, "ablations", folder)
        vars(variant).update(changes)
        with context():
            seconds = distil(variant)
        samples = sample_all(backbone, backbone.load_student(variant.output_dir), variant,
                             job.samples, students_only=True)
        rows[label] = {**swd_table(samples, reference, job.projections), "seconds": seconds}
    return rows


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
