"""The toy's evaluation: ground truth, student and teacher samples on shared noise, the SWD table, figure and markdown.

Every sampler starts from the same initial noise and class labels, and is scored by sliced
Wasserstein distance (tdm/metrics.py) to a fresh ground-truth reference; the seeds are SEEDS.
"""
from __future__ import annotations

import json
import os
from typing import List, Sequence

import numpy as np
import torch

from ..conditions import cat_conditions, expand_condition
from ..images import image_grid
from ..losses import classifier_free_guidance
from ..metrics import sliced_wasserstein
from ..step_condition import find_step_embeddings, set_num_steps
from ..trajectory import StepGrid, rollout

SEEDS = {"ground_truth": 1, "reference": 2, "noise": 3, "projections": 0}
SAMPLER_TITLES = {
    "ground_truth": "ground truth",
    "teacher_ddim4": "teacher DDIM 4 (training grid)",
    "teacher_ddim50": "teacher DDIM 50",
    "teacher_ddim200": "teacher DDIM 200",
    "student_4step": "TDM student 4 steps",
    "student_1step": "TDM student 1 step",
}
SAMPLER_NFE = {"ground_truth": "–", "teacher_ddim4": 4, "teacher_ddim50": 50, "teacher_ddim200": 200,
               "student_4step": 4, "student_1step": 1}


# -- samples --------------------------------------------------------------------------------------
def ground_truth(mixture, n: int, seed: int):
    """(points [n, 2], component [n]) of the mixture, from their own generator seeded `seed`."""
    points, component = mixture.sample(n, torch.Generator().manual_seed(seed))
    return points, component


def reference_samples(mixture, n: int) -> torch.Tensor:
    """The fresh ground-truth sample every sampler is scored against."""
    return ground_truth(mixture, n, SEEDS["reference"])[0]


def evaluation_inputs(backbone, n: int):
    """(ground truth, its class labels' condition, initial noise): the same for every sampler."""
    mixture = backbone.mixture
    truth, component = ground_truth(mixture, n, SEEDS["ground_truth"])
    labels = [mixture.labels[c] for c in component] if mixture.labels else [""] * n
    cond = backbone.encode_prompts(labels)
    noise = torch.randn((n, 2), generator=torch.Generator().manual_seed(SEEDS["noise"]))
    return truth, cond, noise


def guided(teacher, uncond: dict, cfg: float):
    """The teacher with classifier-free guidance on both x̂0 and ε̂ (docs/method.md §5), for DDIM."""
    if cfg == 1.0:
        return teacher

    def denoise(x_t, t, cond):
        both = cat_conditions(cond, expand_condition(uncond, x_t.shape[0]))
        x0, eps = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
        return (classifier_free_guidance(x0_c, x0_u, cfg), classifier_free_guidance(eps_c, eps_u, cfg))

    return denoise


def sample_all(backbone, student_net, timesteps: List[int], cfg: float, n: int,
               students_only: bool = False) -> dict:
    """Every sampler on the same initial noise and the same class labels. DDIM with N steps is
    tdm's rollout on N uniformly spaced timesteps (docs/method.md §2); student 1 step is the rollout
    on the grid [τ_K]. `timesteps`: the student's grid (also the teacher's DDIM 4); `cfg`: the
    teacher's guidance."""
    path = backbone.path
    truth, cond, noise = evaluation_inputs(backbone, n)
    grid = StepGrid(timesteps)
    student = backbone.denoiser(student_net.eval())
    samples = {"ground_truth": truth} if not students_only else {}
    if not students_only:
        teacher = guided(backbone.denoiser(backbone.load_denoiser().eval()),
                         backbone.encode_prompts([""]), cfg)
        samples["teacher_ddim4"] = rollout(teacher, noise, cond, grid, path).sample
        for steps in (50, 200):
            uniform = StepGrid.uniform(steps, path.num_timesteps)
            samples[f"teacher_ddim{steps}"] = rollout(teacher, noise, cond, uniform, path).sample
    samples["student_4step"] = rollout(student, noise, cond, grid, path).sample
    samples["student_1step"] = rollout(student, noise, cond, StepGrid(grid.timesteps[:1]), path).sample
    return samples


@torch.no_grad()
def sample_step_counts(backbone, student_net, n: int, total_steps: int, counts: Sequence[int],
                       step_embedding: bool = True) -> dict:
    """{K: the student's K-step samples} on the grids uniform(K, total_steps), the noise and
    labels of sample_all. A step-conditioned (TDM-unify) student is told K (set_num_steps);
    another one just takes the K steps (a 4-step student at K = 1 runs the grid [τ_4]).
    step_embedding=False runs a unify student as plain diffusers would: without its embedding."""
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
    """{name: SWD of its samples to the reference}, all on the same projections."""
    return {name: sliced_wasserstein(x, reference, projections, SEEDS["projections"])
            for name, x in samples.items()}


# -- outputs --------------------------------------------------------------------------------------
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
    """One scatter panel per sampler, titled with its SWD, in two rows."""
    panels = [scatter_panel(x.numpy(), f"{SAMPLER_TITLES[name]}\nSWD {swd[name]:.4f}")
              for name, x in samples.items()]
    image_grid(panels, rows=2).save(path)


def markdown_table(result: dict) -> str:
    """toy_eval.md: one row per sampler, then the student rows of each ablation, if any."""
    lines = [f"| sampler | NFE | SWD to ground truth (n={result['samples']}, "
             f"{result['projections']} projections) |", "|---|---|---|"]
    for name, value in result["swd"].items():
        lines.append(f"| {SAMPLER_TITLES[name]} | {SAMPLER_NFE[name]} | {value:.4f} |")
    for name, row in result.get("ablations", {}).items():
        lines.append(f"| TDM student 4 steps, {name} | 4 | {row['student_4step']:.4f} |")
        lines.append(f"| TDM student 1 step, {name} | 1 | {row['student_1step']:.4f} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, samples: dict, output_dir: str) -> None:
    """toy_samples.npz, toy_eval.json, toy_eval.md and toy2d.png in `output_dir`."""
    np.savez(os.path.join(output_dir, "toy_samples.npz"),
             **{name: x.numpy() for name, x in samples.items()})
    with open(os.path.join(output_dir, "toy_eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(output_dir, "toy_eval.md"), "w") as f:
        f.write(markdown_table(result))
    save_figure(samples, result["swd"], os.path.join(output_dir, "toy2d.png"))
