"""The toy's evaluation: ground truth, student and teacher samples on shared noise, the SWD and MMD² tables, figure and markdown.

Every sampler starts from the same initial noise and class labels, and is scored against a fresh
ground-truth reference by two distances: sliced Wasserstein distance (tdm/metrics.py; biased,
with a floor of ~0.044 at n = 20,000 on the default mixture) and the unbiased MMD² with a Gaussian
kernel (mmd2_unbiased; floor ~0 ± 3e-5 at n = 10,000). The "ground truth" row, a second
independent ground-truth sample, is each metric's floor. The seeds are SEEDS; evaluation seed
index s ≥ 1 (a repeat of the benchmark) shifts the ground truth, reference and noise seeds by
SEED_STRIDE·s.
"""
from __future__ import annotations

import json
import os
from typing import List, Sequence

import numpy as np
import torch

from ..images import image_grid
from ..metrics import sliced_wasserstein
from ..step_condition import find_step_embeddings, set_num_steps
from ..trajectory import StepGrid, rollout
from ..validation import guided

SEEDS = {"ground_truth": 1, "reference": 2, "noise": 3, "projections": 0, "handoff": 4,
         "held_out_reference": 5, "held_out_noise": 6}   # the last two: quality during training
SEED_STRIDE = 1000
MMD_BANDWIDTH = 0.1        # the default mixture's mode std: sensitive to the modes' shape
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


def seed_of(name: str, repeat: int = 0) -> int:
    """The seed of SEEDS[name] for evaluation repeat `repeat` (0: SEEDS itself)."""
    return SEEDS[name] + SEED_STRIDE * repeat


def reference_samples(mixture, n: int, repeat: int = 0) -> torch.Tensor:
    """The fresh ground-truth sample every sampler is scored against."""
    return ground_truth(mixture, n, seed_of("reference", repeat))[0]


def evaluation_inputs(backbone, n: int, repeat: int = 0):
    """(ground truth, its class labels' condition, initial noise): the same for every sampler."""
    truth, component = ground_truth(backbone.mixture, n, seed_of("ground_truth", repeat))
    noise = torch.randn((n, 2), generator=torch.Generator().manual_seed(seed_of("noise", repeat)))
    return truth, component_condition(backbone, component), noise


def component_condition(backbone, component: torch.Tensor) -> dict:
    """The condition of each point's mixture component: its class label (conditional mixture),
    else the empty one."""
    labels = backbone.mixture.labels
    return backbone.encode_prompts([labels[c] for c in component] if labels else [""] * len(component))


@torch.no_grad()
def student_and_teacher(backbone, student_net, timesteps: List[int], n: int, seed: int = 0,
                        prompts: Sequence[str] = (), teacher_steps: int = 0, cfg: float = 1.0) -> dict:
    """infer_tdm.py's toy samples: {"student": its rollout on `timesteps`, "teacher": DDIM with
    `teacher_steps` and guidance `cfg` (if any)}, n points each from the same noise and
    conditions: the prompts (class labels) in turn, or with none the components the mixture
    draws (its whole distribution). All drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    if prompts:
        cond = backbone.encode_prompts([prompts[i % len(prompts)] for i in range(n)])
    else:
        cond = component_condition(backbone, backbone.mixture.sample(n, generator)[1])
    noise = torch.randn((n, 2), generator=generator)
    samples = {"student": rollout(backbone.denoiser(student_net.eval()), noise, cond,
                                  StepGrid(timesteps), backbone.path).sample}
    if teacher_steps:
        teacher = guided(backbone.denoiser(backbone.load_denoiser().eval()),
                         backbone.encode_prompts([""]), cfg)
        samples["teacher"] = rollout(teacher, noise, cond, StepGrid.uniform(teacher_steps,
                                     backbone.path.num_timesteps), backbone.path).sample
    return samples


def sample_all(backbone, student_net, timesteps: List[int], cfg: float, n: int,
               students_only: bool = False, repeat: int = 0,
               teacher_steps: Sequence[int] = (50, 200)) -> dict:
    """Every sampler on the same initial noise and the same class labels. DDIM with N steps is
    tdm's rollout on N uniformly spaced timesteps (docs/method.md §2), for N in `teacher_steps`;
    student 1 step is the rollout on the grid [τ_K]. `timesteps`: the student's grid (also the
    teacher's DDIM 4); `cfg`: the teacher's guidance; `repeat`: the evaluation seeds (seed_of)."""
    path = backbone.path
    truth, cond, noise = evaluation_inputs(backbone, n, repeat)
    grid = StepGrid(timesteps)
    student = backbone.denoiser(student_net.eval())
    samples = {"ground_truth": truth} if not students_only else {}
    if not students_only:
        teacher = guided(backbone.denoiser(backbone.load_denoiser().eval()),
                         backbone.encode_prompts([""]), cfg)
        samples["teacher_ddim4"] = rollout(teacher, noise, cond, grid, path).sample
        for steps in teacher_steps:
            uniform = StepGrid.uniform(steps, path.num_timesteps)
            samples[f"teacher_ddim{steps}"] = rollout(teacher, noise, cond, uniform, path).sample
    samples["student_4step"] = rollout(student, noise, cond, grid, path).sample
    samples["student_1step"] = rollout(student, noise, cond, StepGrid(grid.timesteps[:1]), path).sample
    return samples


HANDOFF_TITLES = {
    "student_then_teacher": "student's first K − 1 steps, then teacher DDIM from τ_1",
    "marginal_then_student": "exact marginal at τ_1, then the student's last step",
    "marginal_then_teacher": "exact marginal at τ_1, then teacher DDIM from τ_1",
}


@torch.no_grad()
def handoff_samples(backbone, student_net, timesteps: List[int], cfg: float, n: int,
                    stride: int = 3) -> dict:
    """Which of the student's steps carries its error. At τ_1, the last step's input, hand over
    between the student and the teacher (DDIM every `stride` timesteps from τ_1 to 0):

      student_then_teacher   the student's state x^(1) after its first K − 1 steps, finished by
                             the teacher: is the last step's *input* right?
      marginal_then_student  the exact marginal at τ_1, α·x0 + σ·n with x0 the ground truth of
                             sample_all, finished by the student's last step: is the last step's
                             *map* right on the input it should see?
      marginal_then_teacher  the same input finished by the teacher: the floor of both.

    Same noise and labels as sample_all (evaluation seed 0), the teacher with guidance `cfg`;
    the fresh n has its own seed."""
    path = backbone.path
    truth, cond, noise = evaluation_inputs(backbone, n)
    student = backbone.denoiser(student_net.eval())
    teacher = guided(backbone.denoiser(backbone.load_denoiser().eval()),
                     backbone.encode_prompts([""]), cfg)
    tau_1 = timesteps[-1]
    finish, last = StepGrid(list(range(tau_1, -1, -stride))), StepGrid([tau_1])
    x_1 = rollout(student, noise, cond, StepGrid(timesteps), path).states[0]
    fresh = torch.randn(truth.shape, generator=torch.Generator().manual_seed(SEEDS["handoff"]))
    marginal = path.ddim_move(truth, fresh, torch.full((n,), tau_1, dtype=torch.long))   # α·x0 + σ·n
    return {"student_then_teacher": rollout(teacher, x_1, cond, finish, path).sample,
            "marginal_then_student": rollout(student, marginal, cond, last, path).sample,
            "marginal_then_teacher": rollout(teacher, marginal, cond, finish, path).sample}


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


def _kernel_sums(a: torch.Tensor, b: torch.Tensor, bandwidth: float, same: bool, chunk: int) -> float:
    """Σ_ij k(a_i, b_j) with k(a, b) = exp(−‖a − b‖²/(2h²)), in float64 row chunks; with
    `same` (a is b) the sum over i ≠ j, computed on the upper triangle of blocks only."""
    total = 0.0
    for start in range(0, len(a), chunk):
        rows = a[start:start + chunk]
        cols = b[start:] if same else b
        k = torch.cdist(rows, cols).square_().div_(-2.0 * bandwidth ** 2).exp_()
        if same:   # the diagonal block once (minus its diagonal), the blocks right of it twice
            diagonal = k[:, :len(rows)]
            total += diagonal.sum().item() - len(rows) + 2.0 * k[:, len(rows):].sum().item()
        else:
            total += k.sum().item()
    return total


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidth: float = 0.1,
                  chunk: int = 2048, y_term: float = None) -> float:
    """Unbiased squared maximum mean discrepancy with a Gaussian kernel (the U-statistic of
    Gretton et al. 2012, eq. 3), k(a, b) = exp(−‖a − b‖²/(2h²)), h = `bandwidth`:

        MMD²_u = 1/(n(n−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j)
                 − 2/(nm) Σ_{i,j} k(x_i, y_j)

    for x [n, d], y [m, d] (n, m ≥ 2). Its expectation is the population MMD² ≥ 0, which is 0
    only when the two distributions are equal; so two samples of one distribution score about 0
    (either sign), with a spread that shrinks like 1/n, far below the values of different
    distributions (the SWD, a biased estimate, keeps a floor of ~0.044 at n = 20,000 on the toy).
    A bandwidth of the order of the modes' width makes it sensitive to their shape.
    `y_term`: the second term, if already computed (mmd2_reference_term), when many x are
    compared with one y.
    """
    x, y = x.double().cpu(), y.double().cpu()
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"need [n, d] and [m, d] samples, n, m ≥ 2; got {tuple(x.shape)}, {tuple(y.shape)}")
    n, m = len(x), len(y)
    if y_term is None:
        y_term = mmd2_reference_term(y, bandwidth, chunk)
    xx = _kernel_sums(x, x, bandwidth, True, chunk) / (n * (n - 1))
    xy = _kernel_sums(x, y, bandwidth, False, chunk) / (n * m)
    return xx + y_term - 2.0 * xy


def mmd2_reference_term(y: torch.Tensor, bandwidth: float = 0.1, chunk: int = 2048) -> float:
    """1/(m(m−1)) Σ_{i≠j} k(y_i, y_j), the term of mmd2_unbiased that depends on y alone."""
    y = y.double().cpu()
    return _kernel_sums(y, y, bandwidth, True, chunk) / (len(y) * (len(y) - 1))


def mmd2_table(samples: dict, reference: torch.Tensor, n: int,
               bandwidth: float = MMD_BANDWIDTH, progress=None) -> dict:
    """{name: mmd2_unbiased of its first `n` samples to the reference's first `n`}; `progress`
    (a tqdm bar) advances by one per sampler and one for the reference's own term."""
    reference = reference[:n]
    y_term = mmd2_reference_term(reference, bandwidth)
    table = {}
    for name, x in _advancing(samples, progress, first=1):
        table[name] = mmd2_unbiased(x[:n], reference, bandwidth, y_term=y_term)
    return table


def swd_table(samples: dict, reference: torch.Tensor, projections: int, progress=None) -> dict:
    """{name: SWD of its samples to the reference}, all on the same projections; `progress`
    (a tqdm bar) advances by one per sampler."""
    return {name: sliced_wasserstein(x, reference, projections, SEEDS["projections"])
            for name, x in _advancing(samples, progress)}


def _advancing(samples: dict, progress, first: int = 0):
    """The items of `samples`, advancing `progress` by `first` at the start and by one after each."""
    if progress is not None and first:
        progress.update(first)
    for item in samples.items():
        yield item
        if progress is not None:
            progress.update(1)


def assign_modes(points: torch.Tensor, mixture, radius: float = 4.0):
    """Each point's nearest mode in units of that mode's std, z_j = ‖x − μ_j‖/s_j: (min_j z_j,
    argmin_j z_j, whether min_j z_j ≤ `radius`), all float64/long of length n."""
    z = torch.cdist(points.double(), mixture.means.double()) / mixture.std.double()
    nearest, assigned = z.min(dim=1)
    return nearest, assigned, nearest <= radius


def mode_statistics(points: torch.Tensor, mixture, radius: float = 4.0) -> dict:
    """Where a sampler's error lies, mode by mode. Each point goes to the mode j nearest in units
    of that mode's std, z_j = ‖x − μ_j‖/s_j; a point with min_j z_j > `radius` lies off every
    mode (for a true isotropic 2-D Gaussian P(z > 4) = e^−8 ≈ 3·10⁻⁴). Returns

      off_mode:      the share of points off every mode (bridges, fans, crescents' tips);
      weights:       ŵ_j, the share of the on-mode points at mode j;
      weight_error:  ½ Σ_j |ŵ_j − w_j|, w_j the mixture's weights;
      width:         per mode, √(mean z² / 2) of its on-mode points: 1 for the true width
                     (0.999 for a true Gaussian: the cut at `radius` trims the tail), < 1 narrower;
      width_mean:    the widths averaged with the mixture's weights.
    """
    nearest, assigned, on = assign_modes(points, mixture, radius)
    counts = torch.bincount(assigned[on], minlength=len(mixture.means)).double()
    shares = counts / counts.sum().clamp(min=1)
    sum_z2 = torch.zeros(len(mixture.means), dtype=torch.float64)
    sum_z2.index_add_(0, assigned[on], nearest[on] ** 2)
    width = (sum_z2 / counts.clamp(min=1) / 2).sqrt()
    weights = mixture.weights.double()
    return {"off_mode": float((~on).double().mean()), "weights": shares.tolist(),
            "weight_error": float(0.5 * (shares - weights).abs().sum()),
            "width": width.tolist(), "width_mean": float((weights * width).sum())}


def mode_table(samples: dict, mixture) -> dict:
    """{sampler: mode_statistics} for every sampler."""
    return {name: mode_statistics(x, mixture) for name, x in samples.items()}


class HeldOutSample:
    """The toy's quality during training (docs/method.md §10, tdm.validation): the student's
    samples from fixed noise (and class labels drawn with the mixture's weights) against a
    held-out ground-truth sample, by SWD (n points against `reference_factor`·n, `projections`
    directions), unbiased MMD² (n against n, h = MMD_BANDWIDTH) and mode_statistics. Its seeds
    (SEEDS["held_out_*"]) are not those of any evaluation, so the benchmark's numbers are not
    the ones training was watched on."""

    def __init__(self, backbone, n: int = 5000, reference_factor: int = 5, projections: int = 256):
        self.mixture, self.n, self.projections = backbone.mixture, n, projections
        self.reference = ground_truth(self.mixture, reference_factor * n, SEEDS["held_out_reference"])[0]
        rng = torch.Generator().manual_seed(SEEDS["held_out_noise"])
        component = self.mixture.sample(n, rng)[1]
        self.noise = torch.randn((n, 2), generator=rng).to(backbone.device)
        self.cond = component_condition(backbone, component)
        self.reference_term = mmd2_reference_term(self.reference[:n], MMD_BANDWIDTH)

    def score(self, samples: torch.Tensor) -> dict:
        """{"swd", "mmd2", "off_mode", "weight_error", "width"} of n samples (width: the
        weighted mean of mode_statistics)."""
        samples = samples.detach().float().cpu()
        modes = mode_statistics(samples, self.mixture)
        return {"swd": sliced_wasserstein(samples, self.reference, self.projections, SEEDS["projections"]),
                "mmd2": mmd2_unbiased(samples, self.reference[:self.n], MMD_BANDWIDTH,
                                      y_term=self.reference_term),
                "off_mode": modes["off_mode"], "weight_error": modes["weight_error"],
                "width": modes["width_mean"]}


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


def save_figure(samples: dict, swd: dict, path: str, mmd: dict = None) -> None:
    """One scatter panel per sampler, titled with its SWD (and MMD² ×10³), in two rows."""
    def title(name):
        extra = f", MMD^2 {1e3 * mmd[name]:.2f}e-3" if mmd and name in mmd else ""   # the font lacks ²
        return f"{SAMPLER_TITLES[name]}\nSWD {swd[name]:.4f}{extra}"

    panels = [scatter_panel(x.numpy(), title(name)) for name, x in samples.items()]
    image_grid(panels, rows=2).save(path)


def summarize(repeats: List[dict]) -> dict:
    """{metric: {sampler: [mean, std, count]}} over the repeats ({"swd": {..}, "mmd": {..}}
    each); std is the sample standard deviation (0 for a single value)."""
    summary = {}
    for metric in ("swd", "mmd"):
        names = dict.fromkeys(name for run in repeats for name in run.get(metric, {}))
        summary[metric] = {}
        for name in names:
            values = np.array([run[metric][name] for run in repeats if name in run.get(metric, {})])
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            summary[metric][name] = [float(values.mean()), std, len(values)]
    return summary


def _cell(entry, scale: float, digits: int) -> str:
    """`mean ± std` (or the single value, marked if fewer seeds than the others)."""
    mean, std, count = entry
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if count > 1 else "")


def markdown_table(result: dict) -> str:
    """toy_eval.md: one row per sampler (mean ± std over the seeds when there are several; the
    ground-truth row is each metric's floor), then the student rows of each ablation, if any."""
    repeats = result.get("repeats") or [{"swd": result["swd"], "mmd": result.get("mmd", {})}]
    summary = summarize(repeats)
    seeds = len(repeats)
    mmd_head = (f" MMD² ×10³ (n={result['mmd_samples']}, h={result['mmd_bandwidth']}) |"
                if summary["mmd"] else "")
    lines = [f"| sampler | NFE | SWD (n={result['samples']}, {result['projections']} projections) |"
             + mmd_head + (" seeds |" if seeds > 1 else ""),
             "|---|---|---|" + ("---|" if mmd_head else "") + ("---|" if seeds > 1 else "")]
    for name, entry in summary["swd"].items():
        title = SAMPLER_TITLES[name] + (" (the floor: a second ground-truth sample)"
                                        if name == "ground_truth" else "")
        row = f"| {title} | {SAMPLER_NFE[name]} | {_cell(entry, 1, 4)} |"
        if mmd_head:
            row += f" {_cell(summary['mmd'][name], 1e3, 3)} |" if name in summary["mmd"] else " |"
        lines.append(row + (f" {entry[2]} |" if seeds > 1 else ""))
    for name, row in result.get("ablations", {}).items():
        for key, steps in (("student_4step", 4), ("student_1step", 1)):
            line = f"| TDM student {steps} step{'s' if steps > 1 else ''}, {name} | {steps} | {row[key]:.4f} |"
            if mmd_head:
                line += f" {1e3 * row['mmd'][key]:.3f} |" if "mmd" in row else " |"
            lines.append(line + (" 1 |" if seeds > 1 else ""))
    lines += ["", seeds_caption(repeats)]
    if result.get("modes"):
        lines += ["", mode_markdown({**result["modes"], **result.get("handoff", {}).get("modes", {})})]
    if result.get("handoff"):
        lines += ["", handoff_markdown(result["handoff"], result["timesteps"][-1])]
    return "\n".join(lines) + "\n"


def seeds_caption(repeats: List[dict]) -> str:
    """What the table's numbers are: one draw, or mean ± std over how many seeds."""
    trained = [run["seed"] for run in repeats if run.get("seed") is not None]
    students = f" (students trained with --seed {', '.join(map(str, trained))})" if trained else ""
    if len(repeats) == 1:
        return (f"One seed{students}, evaluation seeds 0: a single draw. Another seed (or another "
                "machine's floating-point order) moves the numbers by about the spread between "
                "seeds; `--seeds 3` gives mean ± std over 3 seeds, as the README's table.")
    return (f"Mean ± sample standard deviation over {len(repeats)} seeds{students}, each "
            "evaluated on its own evaluation seeds.")


def handoff_markdown(handoff: dict, tau_1: int) -> str:
    """The handoff_samples' SWD and MMD² (evaluation seed 0)."""
    lines = [f"| hand-over at τ_1 = {tau_1} (evaluation seed 0) | SWD | MMD² ×10³ |", "|---|---|---|"]
    for name, swd in handoff["swd"].items():
        lines.append(f"| {HANDOFF_TITLES[name]} | {swd:.4f} | {1e3 * handoff['mmd'][name]:.3f} |")
    return "\n".join(lines)


def mode_markdown(modes: dict) -> str:
    """The mode_statistics of evaluation seed 0, one row per sampler."""
    lines = ["| sampler (evaluation seed 0) | off every mode (z > 4) | mode-weight error, "
             "½ Σ abs(ŵ − w) | width / true width: weighted mean (min – max) |", "|---|---|---|---|"]
    for name, row in modes.items():
        title = SAMPLER_TITLES.get(name) or HANDOFF_TITLES[name]
        width = f"{row['width_mean']:.2f} ({min(row['width']):.2f} – {max(row['width']):.2f})"
        lines.append(f"| {title} | {100 * row['off_mode']:.2f} % | {row['weight_error']:.4f} | {width} |")
    lines += ["", "Each point is assigned to the mode j nearest in units of that mode's std, "
              "z = ‖x − μ_j‖/s_j. *Off every mode*: the share of points with z > 4 (bridges between "
              "modes; a true Gaussian has 0.03 %). *Mode-weight error*: half the L1 distance "
              "between the shares of points per mode and the mixture's weights (0: exact). "
              "*Width / true width*: √(mean z²/2) of a mode's points (1: exact, below 1: too "
              "narrow, above: too wide)."]
    return "\n".join(lines)


def write_outputs(result: dict, samples: dict, output_dir: str) -> None:
    """toy_samples.npz, toy_eval.json, toy_eval.md and toy2d.png in `output_dir`."""
    np.savez(os.path.join(output_dir, "toy_samples.npz"),
             **{name: x.numpy() for name, x in samples.items()})
    with open(os.path.join(output_dir, "toy_eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(output_dir, "toy_eval.md"), "w") as f:
        f.write(markdown_table(result))
    save_figure(samples, result["swd"], os.path.join(output_dir, "toy2d.png"), result.get("mmd"))
