#!/usr/bin/env python
"""What the toy's SWD measures: its sensitivity to mode weights, outliers and widths, and the
mode weights of the teacher and of distilled students, measured on many samples.

    python scripts/toy_modes.py --config configs/toy2d_asym.yaml \
        --students outputs/toy2d_asym outputs/toy2d_asym/seed1 outputs/toy2d_asym/seed2

1. Sensitivity: the SWD, with the benchmark's settings (tdm/toy/evaluate.py: --samples points
   against 5× as many of a fresh reference, 256 projections), of a ground-truth sample with one
   change each: a share of the mass moved from mode --shift_from to mode --shift_to, a share of
   the points moved 4 std away from the mixture's centre (crescents), every mode narrower or wider.
2. Mode weights: the teacher's DDIM 50 and 200 and each student on its training grid (the
   config's), on --weight_samples points from one noise (tdm.toy.evaluate.mode_statistics: the
   share of the on-mode points at each mode), beside the mixture's weights.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tdm.metrics import sliced_wasserstein  # noqa: E402
from tdm.toy.evaluate import (SEEDS, evaluation_inputs, ground_truth, mode_statistics,  # noqa: E402
                              reference_samples)
from tdm.toy.mixture import GaussianMixture  # noqa: E402
from tdm.trajectory import StepGrid, rollout  # noqa: E402


def sensitivity(mixture: GaussianMixture, n: int, shift_from: int, shift_to: int) -> list:
    """[(change, SWD)] of a ground-truth sample changed one way at a time."""
    reference = reference_samples(mixture, 5 * n)

    def swd(points):
        return sliced_wasserstein(points, reference, 256, SEEDS["projections"])

    def truth(m=mixture):
        return ground_truth(m, n, SEEDS["ground_truth"])

    rows = [("none (the floor)", swd(truth()[0]))]
    for share in (0.005, 0.01, 0.02):
        weights = mixture.weights.clone()
        weights[shift_from] -= share
        weights[shift_to] += share
        moved = GaussianMixture(mixture.means, mixture.std, weights)
        rows.append((f"{100 * share:g} % of the mass from mode {shift_from} to mode {shift_to}",
                     swd(truth(moved)[0])))
    points, component = truth()
    away = mixture.means[component] - mixture.means.mean(0)
    away = torch.where(away.norm(dim=1, keepdim=True) > 1e-6, away, torch.tensor([1.0, 0.0]))
    away = away / away.norm(dim=1, keepdim=True)
    pick = torch.rand(n, generator=torch.Generator().manual_seed(5))
    for share in (0.01, 0.03):
        outward = points + (pick < share)[:, None] * 4 * mixture.std[component][:, None] * away
        rows.append((f"{100 * share:g} % of the points 4 std outward (crescents)", swd(outward)))
    for scale in (0.8, 1.2):
        centre = mixture.means[component]
        rows.append((f"every mode {scale:g}× its width", swd(centre + scale * (points - centre))))
    return rows


def mode_weights(backbone, grid: StepGrid, students: list, n: int) -> list:
    """[(sampler, per-mode weights)] on the benchmark's noise (evaluation seed 0), n points."""
    _, cond, noise = evaluation_inputs(backbone, n)
    teacher = backbone.denoiser(backbone.load_denoiser().eval())
    rows = [("mixture", backbone.mixture.weights.tolist())]
    for steps in (50, 200):
        sample = rollout(teacher, noise, cond, StepGrid.uniform(steps, backbone.path.num_timesteps),
                         backbone.path).sample
        rows.append((f"teacher DDIM {steps}", mode_statistics(sample, backbone.mixture)["weights"]))
    for folder in students:
        student = backbone.denoiser(backbone.load_student(folder).eval())
        sample = rollout(student, noise, cond, grid, backbone.path).sample
        rows.append((f"student {folder}", mode_statistics(sample, backbone.mixture)["weights"]))
    return rows


def main(argv=None) -> int:
    from tdm.backbones import load_backbone
    from tdm.config import parse_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "toy2d_asym.yaml"))
    p.add_argument("--students", nargs="*", default=[], help="Output folders of distilled students.")
    p.add_argument("--samples", type=int, default=20000, help="Points per SWD sample (the benchmark's).")
    p.add_argument("--weight_samples", type=int, default=100000)
    p.add_argument("--shift_from", type=int, default=1)
    p.add_argument("--shift_to", type=int, default=2)
    job, train_argv = p.parse_known_args(argv)
    args = parse_args(["--config", job.config, *train_argv])
    torch.set_num_threads(1)
    backbone = load_backbone(args.pretrained_model_name_or_path, args.backbone, options=args.backbone_options)
    if args.backbone != "toy2d" or backbone.mixture.num_classes:
        raise SystemExit("error: toy_modes.py measures an unconditional toy2d mixture")
    modes = len(backbone.mixture.means)
    if not (0 <= job.shift_from < modes and 0 <= job.shift_to < modes):
        raise SystemExit(f"error: --shift_from and --shift_to must be modes 0..{modes - 1}")
    print("| change to a ground-truth sample | SWD |\n|---|---|")
    for change, swd in sensitivity(backbone.mixture, job.samples, job.shift_from, job.shift_to):
        print(f"| {change} | {swd:.4f} |")
    print(f"\n| sampler ({job.weight_samples} points) | " + " | ".join(f"mode {j}" for j in range(modes))
          + " |\n|---|" + "---|" * modes)
    for name, weights in mode_weights(backbone, StepGrid(args.timesteps), job.students, job.weight_samples):
        print(f"| {name} | " + " | ".join(f"{w:.4f}" for w in weights) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
