#!/usr/bin/env python
"""The toy recipe seed by seed on mixtures it was not tuned on (docs/benchmarks.md, "Toy: every
seed on unseen mixtures"): one (mixture, seed) run pre-trains its own teacher (teacher seed =
training seed, unless --train_seed gives the student another), distils with configs/toy2d.yaml
plus any train_tdm.py flags, traces the student every --trace_steps steps and scores it at the
end against the teacher's DDIM 50 with the benchmark's protocol (tdm/toy/evaluate.py: 20,000
samples, SWD 256 projections against 100,000, MMD² h = 0.1 on 10,000, evaluation seeds = --seed).

    python scripts/toy_seeds.py run --mixture square5 --seed 3 --tag base
    python scripts/toy_seeds.py run --mixture square5 --seed 3 --tag lr01 --generator_lr_ratio 0.1
    python scripts/toy_seeds.py run --mixture ring6 --seed 1 --tag hn_ts11 --train_seed 11  # same teacher, new student
    python scripts/toy_seeds.py table base lr01
    python scripts/toy_seeds.py curves assets/toy2d_seeds.png base:square5:3 base:square5:2   # needs matplotlib
    python scripts/toy_seeds.py scatter students.png teacher:square5:3 base:square5:3 s_nf2:square5:3
    python scripts/toy_seeds.py importance --mixture square5 --seed 3   # how noisy w_IS is in 2-D
    python scripts/toy_seeds.py yardstick square5:3 ring6:4   # the teacher against itself, other noise
    python scripts/toy_seeds.py decompose noiw:ring6:4         # bridges, shapes or weights: which error counts
    python scripts/toy_seeds.py rescore noiw:ring6:4 --draws 6 # the protocol averaged over 6 noises
    python scripts/toy_seeds.py shares hn:ring6:4              # mode weights: start, student, DDIM 50/200/1000
    python scripts/toy_seeds.py ceiling ring6:4                # a student equal to the teacher's flow, scored
    python scripts/toy_seeds.py students ring6:1 --tags hn hn_ts11 # several students of one teacher, rescored

The trace (trace.jsonl, per --trace_steps): the student's SWD/MMD²/mode statistics on 4,000
fixed-noise draws against held-out data, and the gradient norms (before clipping) of every
update since the previous line — train_tdm's update and log_validation are wrapped for it, so
the training itself is unchanged. Runs go to outputs/toy_seeds/TAG/MIXTURE_sSEED, teachers to
outputs/toy_seeds/teachers, one line per run to outputs/toy_seeds/log.jsonl.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

OUT = os.path.join(ROOT, "outputs", "toy_seeds")
MIXTURES = {
    # the issue's: 5 equal modes, a square's corners and its centre, std 0.12
    "square5": {"means": [[-1.5, -1.5], [1.5, -1.5], [1.5, 1.5], [-1.5, 1.5], [0.0, 0.0]], "std": 0.12},
    # 6 on a ring, alternately narrow/wide, unequal weights
    "ring6": {"circle": {"modes": 6, "radius": 1.8}, "std": [0.08, 0.16, 0.08, 0.16, 0.08, 0.16],
              "weights": [0.25, 0.1, 0.2, 0.15, 0.2, 0.1]},
    # 3 × 3 grid, unequal weights (0.05 … 0.2)
    "grid3": {"grid": {"rows": 3, "cols": 3, "spacing": 1.5}, "std": 0.1,
              "weights": [0.05, 0.15, 0.1, 0.2, 0.05, 0.1, 0.1, 0.15, 0.1]},
}
N_EVAL, REF_FACTOR, PROJECTIONS, MMD_N, BANDWIDTH = 20000, 5, 256, 10000, 0.1


def options(mixture: str, seed: int) -> dict:
    """configs/toy2d.yaml's backbone options with another mixture and teacher seed."""
    return {"mixture": MIXTURES[mixture], "network": {"hidden": 128, "depth": 3, "time_channels": 64},
            "teacher": {"steps": 4000, "batch_size": 1024, "lr": 2.0e-3, "label_dropout": 0.1,
                        "ema": 0.995, "seed": seed}}


def teacher_folder(mixture: str, seed) -> str:
    """Where the teacher of (mixture, seed) is pre-trained (ensure_teacher) and cached."""
    return os.path.join(OUT, "teachers", f"{mixture}_s{seed}")


def trained_teacher(mixture: str, seed):
    """The toy2d backbone of an already pre-trained teacher of (mixture, seed)."""
    from tdm.backbones import load_backbone

    return load_backbone(teacher_folder(mixture, seed), "toy2d", options=options(mixture, int(seed)))


def evaluate(backbone, net, timesteps, repeat: int, samplers) -> dict:
    """SWD, MMD² and mode statistics of `samplers` (sample_all's names) against a reference."""
    from tdm.toy.evaluate import mmd2_table, mode_table, reference_samples, sample_all, swd_table

    reference = reference_samples(backbone.mixture, N_EVAL * REF_FACTOR, repeat)
    samples = sample_all(backbone, net, timesteps, 1.0, N_EVAL, students_only="student_4step" in samplers,
                         repeat=repeat, teacher_steps=(50,))
    samples = {name: samples[name] for name in samplers}
    return {"swd": swd_table(samples, reference, PROJECTIONS),
            "mmd": mmd2_table(samples, reference, MMD_N, BANDWIDTH),
            "modes": mode_table(samples, backbone.mixture)}


class Tracer:
    """Stands in for train_tdm.log_validation: every --trace_steps a line of the student's
    quality and of the gradient norms recorded since the previous line."""

    def __init__(self, backbone, path: str, n: int = 4000):
        from tdm.toy.evaluate import ground_truth, mmd2_reference_term

        self.mixture, self.path, self.n = backbone.mixture, path, n
        self.reference = ground_truth(backbone.mixture, 5 * n, 777)[0]
        self.reference_term = mmd2_reference_term(self.reference[:n], BANDWIDTH)
        self.noise = torch.randn((n, 2), generator=torch.Generator().manual_seed(778))
        self.norms = {"fake": [], "student": []}

    def __call__(self, accelerator, args, run, step, measures=None):
        from tdm.metrics import sliced_wasserstein
        from tdm.toy.evaluate import mmd2_unbiased, mode_statistics

        cond = run.backbone.encode_prompts([""] * self.n)
        with torch.no_grad():
            x = run.tdm.rollout(run.networks.student_eval, self.noise, cond).sample
        row = {"step": step, "swd": sliced_wasserstein(x, self.reference, 128, 0),
               "mmd": mmd2_unbiased(x, self.reference[:self.n], BANDWIDTH, y_term=self.reference_term),
               **mode_statistics(x, self.mixture)}
        norms = {who: torch.tensor(values or [0.0]) for who, values in self.norms.items()}
        for who, v in norms.items():
            row[f"gn_{who}_mean"], row[f"gn_{who}_max"] = float(v.mean()), float(v.max())
            self.norms[who] = []
        clip = args.max_grad_norm or float("inf")   # only the student's update is clipped
        row["gn_student_clipfrac"] = float((norms["student"] > clip).float().mean())
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def wrap_update(train_tdm, tracer):
    """Record each update's gradient norm before clipping: train_tdm.update marks whose update
    it is (the student's has an lr scheduler), and its finiteness check receives the norm."""
    update, all_finite = train_tdm.update, train_tdm.all_finite
    current = {}

    def traced_update(accelerator, networks, loss, optimizer, params, max_grad_norm=0.0, lr_scheduler=None):
        current["who"] = "student" if lr_scheduler is not None else "fake"
        return update(accelerator, networks, loss, optimizer, params, max_grad_norm, lr_scheduler)

    def traced_all_finite(accelerator, values):
        tracer.norms[current["who"]].append(float(values[-1]))   # values: (loss, norm) in fp32 runs
        return all_finite(accelerator, values)

    train_tdm.update, train_tdm.all_finite = traced_update, traced_all_finite
    train_tdm.log_validation = tracer


def run(argv) -> None:
    p = argparse.ArgumentParser(prog="toy_seeds.py run")
    p.add_argument("--mixture", required=True, choices=sorted(MIXTURES))
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--trace_steps", type=int, default=100)
    p.add_argument("--train_seed", type=int, default=None,
                   help="The distillation's --seed (default: --seed). The teacher and the evaluation "
                        "keep --seed, so several students of one teacher compare on the same protocol.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace an earlier run of the same tag, mixture and seed (else refused).")
    job, flags = p.parse_known_args(argv)
    train_seed = job.seed if job.train_seed is None else job.train_seed
    torch.set_num_threads(1)
    import train_tdm
    from tdm.backbones import load_backbone
    from tdm.config import parse_args
    from tdm.toy.teacher import ensure_teacher

    opts = options(job.mixture, job.seed)
    teacher = teacher_folder(job.mixture, job.seed)
    start = time.time()
    ensure_teacher(teacher, opts)
    seconds = {"teacher": time.time() - start}
    out = os.path.join(OUT, job.tag, f"{job.mixture}_s{job.seed}")
    if os.path.isdir(out) and os.listdir(out) and not job.overwrite:
        raise SystemExit(f"error: {out} holds a run; pass --overwrite to replace it")
    args = parse_args(["--config", os.path.join(ROOT, "configs", "toy2d.yaml"),
                       "--pretrained_model_name_or_path", teacher, "--backbone_options", json.dumps(opts),
                       "--output_dir", out, "--seed", str(train_seed), "--overwrite_output_dir",
                       "--validation_steps", str(job.trace_steps), *flags])
    backbone = load_backbone(teacher, "toy2d", options=opts)
    os.makedirs(out, exist_ok=True)
    trace = os.path.join(out, "trace.jsonl")
    if os.path.exists(trace):
        os.remove(trace)
    wrap_update(train_tdm, Tracer(backbone, trace))
    start = time.time()
    code = train_tdm.main(args)
    if code != 0 or not os.path.isdir(os.path.join(out, "denoiser")):   # stopped: nothing to score
        raise SystemExit(f"error: training of {out} ended without an export (exit {code}); not evaluated")
    seconds["train"] = time.time() - start
    start = time.time()
    cached = os.path.join(teacher, f"eval_seed{job.seed}.json")
    if not os.path.exists(cached):
        with open(cached, "w") as f:
            json.dump(evaluate(backbone, backbone.load_student(out), args.timesteps, job.seed,
                               ("ground_truth", "teacher_ddim50")), f)
    with open(cached) as f:
        teacher_eval = json.load(f)
    student = evaluate(backbone, backbone.load_student(out), args.timesteps, job.seed, ("student_4step",))
    seconds["eval"] = time.time() - start
    result = {"tag": job.tag, "mix": job.mixture, "seed": job.seed, "train_seed": train_seed, "flags": flags,
              "student_swd": student["swd"]["student_4step"], "student_mmd": student["mmd"]["student_4step"],
              "teacher_swd": teacher_eval["swd"]["teacher_ddim50"],
              "teacher_mmd": teacher_eval["mmd"]["teacher_ddim50"],
              "floor_swd": teacher_eval["swd"]["ground_truth"], "floor_mmd": teacher_eval["mmd"]["ground_truth"],
              "student_modes": student["modes"]["student_4step"],
              "teacher_modes": teacher_eval["modes"]["teacher_ddim50"],
              "seconds": seconds, "date": time.strftime("%Y-%m-%d %H:%M")}
    result["r_swd"] = result["student_swd"] / result["teacher_swd"]
    result["r_mmd"] = result["student_mmd"] / result["teacher_mmd"]
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(OUT, "log.jsonl"), "a") as f:
        f.write(json.dumps({k: v for k, v in result.items() if "modes" not in k}) + "\n")
    print(f"{job.tag} {job.mixture} s{job.seed}: SWD {result['student_swd']:.4f} / teacher {result['teacher_swd']:.4f} "
          f"({result['r_swd']:.2f}×), MMD² {1e3 * result['student_mmd']:.2f} / "
          f"{1e3 * result['teacher_mmd']:.2f} ×10⁻³ "
          f"({result['r_mmd']:.2f}×), distillation {seconds['train']:.0f} s")


def results(tags) -> dict:
    """{(tag, mixture, seed): the last result logged} of `tags`."""
    rows = {}
    with open(os.path.join(OUT, "log.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["tag"] in tags:
                rows[(r["tag"], r["mix"], r["seed"])] = r
    return dict(sorted(rows.items(), key=lambda kv: (tags.index(kv[0][0]), kv[0][1], kv[0][2])))


def within(r: dict) -> bool:
    """The issue's target: the 4-step student within 10 % of its teacher's DDIM 50 by both."""
    return r["r_swd"] <= 1.1 and r["r_mmd"] <= 1.1


def spread(values, digits: int) -> str:
    """"mean ± std" of `values` (the mean alone for one value)."""
    mean = f"{statistics.mean(values):.{digits}f}"
    return f"{mean} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else mean


def table(tags) -> None:
    """Markdown: one row per seed, then mean ± std (over seeds) per recipe and mixture."""
    rows = results(tags)
    print("| recipe | mixture | seed | SWD student / teacher DDIM 50 | ratio | MMD² ×10³ student / teacher "
          "| ratio | within 10 % |")
    print("|---|---|---|---|---|---|---|---|")
    for (tag, mix, seed), r in rows.items():
        print(f"| {tag} | {mix} | {seed} | {r['student_swd']:.4f} / {r['teacher_swd']:.4f} | {r['r_swd']:.2f} | "
              f"{1e3 * r['student_mmd']:.2f} / {1e3 * r['teacher_mmd']:.2f} | {r['r_mmd']:.2f} | "
              f"{'yes' if within(r) else '**no**'} |")
    groups = {}
    for key, r in rows.items():
        groups.setdefault(key[:2], []).append(r)
    print("\n| recipe | mixture | seeds | SWD student | SWD teacher | MMD² ×10³ student | MMD² ×10³ teacher "
          "| seeds within 10 % |")
    print("|---|---|---|---|---|---|---|---|")
    for (tag, mix), rs in groups.items():
        print(f"| {tag} | {mix} | {len(rs)} | {spread([r['student_swd'] for r in rs], 4)} | "
              f"{spread([r['teacher_swd'] for r in rs], 4)} | {spread([1e3 * r['student_mmd'] for r in rs], 2)} | "
              f"{spread([1e3 * r['teacher_mmd'] for r in rs], 2)} | {sum(map(within, rs))}/{len(rs)} |")


def curves(path: str, runs) -> None:
    """Training curves of TAG:MIXTURE:SEED runs (trace.jsonl and train_log.jsonl) into `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    ax = axes.ravel()
    for i, spec in enumerate(runs):
        tag, mix, seed = spec.split(":")
        folder = os.path.join(OUT, tag, f"{mix}_s{seed}")
        with open(os.path.join(folder, "trace.jsonl")) as f:
            trace = [json.loads(line) for line in f]
        with open(os.path.join(folder, "train_log.jsonl")) as f:
            log = [r for r in map(json.loads, f) if "loss_student" in r]
        with open(os.path.join(folder, "result.json")) as f:
            res = json.load(f)
        color = plt.cm.tab10(i % 10)
        steps = [r["step"] for r in trace]
        line = lambda a, key, **kw: a.plot(steps, [r[key] for r in trace], color=color, **kw)
        ax[0].semilogy(steps, [r["mmd"] for r in trace], color=color,
                       label=f"{tag} {mix} s{seed}: SWD {res['r_swd']:.2f}×, MMD² {res['r_mmd']:.1f}× teacher")
        line(ax[1], "swd")
        line(ax[2], "width_mean")
        ax[2].axhline(res["teacher_modes"]["width_mean"], color=color, ls=":", lw=1)
        line(ax[3], "off_mode")
        ax[3].axhline(res["teacher_modes"]["off_mode"], color=color, ls=":", lw=1)
        line(ax[4], "weight_error")
        k = 200   # the per-step losses are noisy: 200-step means
        mean = lambda key: np.convolve([r[key] for r in log], np.ones(k) / k, mode="valid")
        ax[5].plot([r["step"] for r in log][k - 1:], mean("loss_student"), color=color)
        ax[5].plot([r["step"] for r in log][k - 1:], mean("loss_fake_score"), color=color, ls="--")
        line(ax[6], "gn_student_mean")
        line(ax[6], "gn_fake_mean", ls="--")
        line(ax[7], "gn_student_clipfrac")
        if i == 0:
            lr = ax[7].twinx()
            lr.plot([r["step"] for r in log], [r["lr"] for r in log], color="k", lw=1)
            lr.set_ylabel("student lr (black)", fontsize=8)
    titles = ["student MMD² vs held-out data (4,000 draws, h = 0.1)", "student SWD vs held-out data (128 proj.)",
              "mean mode width (1 = true; dotted: teacher DDIM 50)", "off-mode share (dotted: teacher DDIM 50)",
              "mode-weight error ½Σ|ŵ − w|", "losses, 200-step means (solid student, dashed fake score)",
              "grad norm before clipping (solid student, dashed fake)", "share of student updates clipped"]
    for a, title in zip(ax, titles):
        a.set_title(title, fontsize=9)
        a.set_xlabel("step", fontsize=8)
        a.tick_params(labelsize=7)
    ax[5].set_yscale("log")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    print(path)


def scatter(path: str, runs) -> None:
    """Scatter panels (20,000 draws, one noise) of TAG:MIXTURE:SEED students, or of
    teacher:MIXTURE:SEED (that seed's teacher, DDIM 50), 4 per row, into `path`."""
    from tdm.images import image_grid
    from tdm.toy.evaluate import scatter_panel
    from tdm.trajectory import StepGrid, rollout

    panels = []
    for spec in runs:
        tag, mix, seed = spec.split(":")
        backbone = trained_teacher(mix, seed)
        if tag == "teacher":
            net, label = backbone.load_denoiser(), f"{mix} s{seed}: teacher DDIM 50"
            grid = StepGrid.uniform(50, backbone.path.num_timesteps)
        else:
            with open(os.path.join(OUT, tag, f"{mix}_s{seed}", "result.json")) as f:
                res = json.load(f)
            net, grid = backbone.load_student(os.path.join(OUT, tag, f"{mix}_s{seed}")), StepGrid([449, 336, 224, 111])
            label = f"{mix} s{seed} {tag}: SWD {res['r_swd']:.2f}x, MMD2 {res['r_mmd']:.1f}x"
        noise = torch.randn((20000, 2), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            x = rollout(backbone.denoiser(net.eval()), noise, backbone.encode_prompts([""] * len(noise)),
                        grid, backbone.path).sample
        panels.append(scatter_panel(x.numpy(), label, extent=2.6))
    image_grid(panels, rows=(len(panels) + 3) // 4).save(path)
    print(path)


def effective_sample_size(w: torch.Tensor) -> float:
    """Kish's effective sample size of weights w, as a fraction of their number: (Σw)²/(N·Σw²)."""
    w = w.double()
    return float(w.sum() ** 2 / (w.numel() * (w ** 2).sum()))


def importance(argv) -> None:
    """How noisy §4's importance weight w_IS is on the toy's trajectories (d = 2) and on Gaussian
    ε̂ of growing dimension d, with the toy's grid and the fake-score update's draws: its
    effective sample size and quantiles. A mean over d elements of m² − n² has a spread ∝ 1/√d,
    so in 2-D w_IS is heavy-tailed while for a latent of 4 × 64 × 64 it is ≈ 1."""
    import json as _json

    from tdm.backbones import load_backbone
    from tdm.config import parse_args
    from tdm.losses import importance_weight
    from tdm.toy.teacher import ensure_teacher
    from tdm.trajectory import StepGrid, diffuse, rollout, sample_draw

    p = argparse.ArgumentParser(prog="toy_seeds.py importance")
    p.add_argument("--mixture", default="square5", choices=sorted(MIXTURES))
    p.add_argument("--seed", type=int, default=3)
    job = p.parse_args(argv)
    opts = options(job.mixture, job.seed)
    teacher = teacher_folder(job.mixture, job.seed)
    ensure_teacher(teacher, opts)
    backbone = load_backbone(teacher, "toy2d", options=opts)
    args = parse_args(["--config", os.path.join(ROOT, "configs", "toy2d.yaml"), "--pretrained_model_name_or_path",
                       teacher, "--backbone_options", _json.dumps(opts)])
    grid, path = StepGrid(args.timesteps), backbone.path
    quantiles = torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)

    def row(name, m, n):
        w = importance_weight(m, n).double()
        q = torch.quantile(w, quantiles).tolist()
        print(f"| {name} | {effective_sample_size(w):.3f} | {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} | {float(w.max()):.1f} |")

    print("| trajectories | ESS / N | w_IS 1 % / 50 % / 99 % | max |\n|---|---|---|---|")
    with torch.no_grad():   # the student at its start: the teacher, rolled out on the toy's grid
        n_rows = 100_000
        student = backbone.denoiser(backbone.load_denoiser().eval())
        trajectory = rollout(student, torch.randn((n_rows, 2), generator=torch.Generator().manual_seed(0)),
                             backbone.encode_prompts([""] * n_rows), grid, path)
        draw = sample_draw(grid, n_rows, "cpu", False, False, torch.Generator().manual_seed(1))
        _, x0, eps = trajectory.at(draw.k)
        n = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
        row(f"toy {job.mixture} s{job.seed}, d = 2 (the teacher's 4-step rollout)", diffuse(path, x0, eps, draw.t_e, draw.t, n)[1], n)
        for d in (2, 16, 256, 4 * 64 * 64):   # ε̂ ~ N(0, I): m does not depend on x̂0
            rows = 20_000 if d < 1000 else 2_000
            rng = torch.Generator().manual_seed(d)
            draw = sample_draw(grid, rows, "cpu", False, False, rng)
            eps, n = torch.randn((rows, d), generator=rng), torch.randn((rows, d), generator=rng)
            row(f"Gaussian ε̂, d = {d}", diffuse(path, torch.zeros_like(eps), eps, draw.t_e, draw.t, n)[1], n)


def draw_repeats(seed: int, draws: int) -> list:
    """The evaluation noises of a seed: the protocol's (repeat = seed), then draws − 1 others."""
    return [seed] + [1000 + seed * 100 + i for i in range(draws - 1)]


def draw_samples(backbone, net, grid, repeat: int) -> torch.Tensor:
    """N_EVAL points of `net` rolled out on `grid` from evaluation noise `repeat`."""
    from tdm.toy.evaluate import evaluation_inputs
    from tdm.trajectory import rollout

    _, cond, noise = evaluation_inputs(backbone, N_EVAL, repeat)
    with torch.no_grad():
        return rollout(net, noise, cond, grid, backbone.path).sample


class Protocol:
    """The protocol's SWD and MMD² of a seed: against that seed's reference, with its projections."""

    def __init__(self, backbone, seed: int):
        from tdm.toy.evaluate import mmd2_reference_term, reference_samples

        self.reference = reference_samples(backbone.mixture, N_EVAL * REF_FACTOR, seed)
        self.y_term = mmd2_reference_term(self.reference[:MMD_N], BANDWIDTH)

    def __call__(self, x: torch.Tensor) -> tuple:
        from tdm.metrics import sliced_wasserstein
        from tdm.toy.evaluate import SEEDS, mmd2_unbiased

        x = x.float()
        return (sliced_wasserstein(x, self.reference, PROJECTIONS, SEEDS["projections"]),
                mmd2_unbiased(x[:MMD_N], self.reference[:MMD_N], BANDWIDTH, y_term=self.y_term))


def scores_over_draws(backbone, net, grid, seed: int, draws: int) -> list:
    """[(SWD, MMD²)] of `net` rolled out on `grid` from each of the seed's evaluation noises,
    against the protocol's reference of that seed."""
    score = Protocol(backbone, seed)
    return [score(draw_samples(backbone, net, grid, repeat)) for repeat in draw_repeats(seed, draws)]


def yardstick(argv) -> None:
    """How far a sampler equal in law to the teacher lands from the teacher by this protocol: the
    teacher's DDIM 50 from --draws other noises (draw_repeats), scored against the protocol's
    reference of that seed, over its DDIM 50 from the protocol's noise. The spread of these
    ratios is the metric's own: a 4-step student that matched its teacher exactly lands there."""
    from tdm.trajectory import StepGrid

    p = argparse.ArgumentParser(prog="toy_seeds.py yardstick")
    p.add_argument("runs", nargs="+", help="MIXTURE:SEED of teachers already trained")
    p.add_argument("--draws", type=int, default=8)
    job = p.parse_args(argv)
    print("| mixture | seed | SWD ratio min / mean / max | MMD² ratio min / mean / max | within 10 % (both) |\n"
          "|---|---|---|---|---|")
    for spec in job.runs:
        mixture, seed = spec.split(":")
        seed = int(seed)
        backbone = trained_teacher(mixture, seed)
        net = backbone.denoiser(backbone.load_denoiser().eval())
        scores = scores_over_draws(backbone, net, StepGrid.uniform(50, backbone.path.num_timesteps),
                                   seed, job.draws + 1)
        (swd0, mmd0), rest = scores[0], scores[1:]
        r_swd = [s / swd0 for s, _ in rest]
        r_mmd = [m / mmd0 for _, m in rest]
        inside = sum(a <= 1.10 and b <= 1.10 for a, b in zip(r_swd, r_mmd))
        print(f"| {mixture} | {seed} | {min(r_swd):.2f} / {statistics.mean(r_swd):.2f} / {max(r_swd):.2f} | "
              f"{min(r_mmd):.2f} / {statistics.mean(r_mmd):.2f} / {max(r_mmd):.2f} | {inside}/{len(rest)} |",
              flush=True)


class FinishedRun:
    """A finished run named TAG:MIXTURE:SEED: its teacher's backbone, its folder and the
    student's grid (config.yaml)."""

    def __init__(self, spec: str):
        from tdm.trajectory import StepGrid
        import yaml

        self.tag, self.mixture, seed = spec.split(":")
        self.seed = int(seed)
        self.teacher_folder = teacher_folder(self.mixture, self.seed)
        self.backbone = trained_teacher(self.mixture, self.seed)
        self.folder = os.path.join(OUT, self.tag, f"{self.mixture}_s{self.seed}")
        with open(os.path.join(self.folder, "config.yaml")) as f:
            self.grid = StepGrid(yaml.safe_load(f)["timesteps"])
        self.name = f"{self.tag} {self.mixture} s{self.seed}"

    def student(self):
        return self.backbone.denoiser(self.backbone.load_student(self.folder).eval())

    def teacher(self):
        return self.backbone.denoiser(self.backbone.load_denoiser().eval())


def finished_runs(prog: str, argv) -> tuple:
    """(--draws, the FinishedRun of each TAG:MIXTURE:SEED given, loaded as the loop reaches it)."""
    p = argparse.ArgumentParser(prog=f"toy_seeds.py {prog}")
    p.add_argument("runs", nargs="+", help="TAG:MIXTURE:SEED of finished runs")
    p.add_argument("--draws", type=int, default=6)
    job = p.parse_args(argv)
    return job.draws, (FinishedRun(spec) for spec in job.runs)


def idealised(x: torch.Tensor, mixture, rng: torch.Generator) -> dict:
    """A sample and three copies of it with one kind of error taken out (assign_modes decides
    each point's mode): "bridges removed", its off-mode points replaced by a draw of its own
    on-mode points; "true shapes", its on-mode points redrawn from their mode's true Gaussian
    (the off-mode ones kept); "weights only", every point redrawn from the true Gaussian of its
    nearest mode — the mixture with the sample's mode weights, nothing else of the sample."""
    from tdm.toy.evaluate import assign_modes

    _, k, on = assign_modes(x, mixture)
    means, std = mixture.means.double(), mixture.std.double()
    true_draw = lambda idx: means[idx] + std[idx, None] * torch.randn(len(idx), 2, generator=rng,  # noqa: E731
                                                                      dtype=torch.float64)
    x = x.double()
    kept = x[on]
    no_bridges = x.clone()
    no_bridges[~on] = kept[torch.randint(len(kept), (int((~on).sum()),), generator=rng)]
    shapes = x.clone()
    shapes[on] = true_draw(k[on])
    return {"as sampled": x, "bridges removed": no_bridges, "true shapes": shapes,
            "weights only": true_draw(k)}


def decompose(argv) -> None:
    """Which of a student's errors makes its distance to the teacher: the protocol's SWD and
    MMD², averaged over --draws evaluation noises, of the student and of the teacher's DDIM 50,
    each as sampled and with one kind of error taken out (`idealised`): the student's SWD over
    the teacher's, and both MMD² (an idealised sample's MMD² is near 0, so a ratio of two says
    nothing). Where the SWD ratio stays when only the mode weights are left, the weights carry it;
    the mode shares' difference (every point to its nearest mode, mean over the draws) says how
    far they are apart."""
    from tdm.toy.evaluate import assign_modes
    from tdm.trajectory import StepGrid

    draws, runs = finished_runs("decompose", argv)
    kinds = ("as sampled", "bridges removed", "true shapes", "weights only")
    print("| run | " + " | ".join(f"{k}: SWD ratio, MMD² ×10³ student / teacher" for k in kinds)
          + " | mode shares, student − teacher | ½ Σ abs |\n|---|" + "---|" * (len(kinds) + 2))
    for run in runs:
        backbone, seed = run.backbone, run.seed
        samplers = {"student": (run.student(), run.grid),
                    "teacher": (run.teacher(), StepGrid.uniform(50, backbone.path.num_timesteps))}
        score, rng = Protocol(backbone, seed), torch.Generator().manual_seed(seed)
        totals = {(who, kind): [0.0, 0.0] for who in samplers for kind in kinds}
        found = {who: torch.zeros(len(backbone.mixture.means), dtype=torch.float64) for who in samplers}
        for repeat in draw_repeats(seed, draws):
            for who, (net, grid) in samplers.items():
                x = draw_samples(backbone, net, grid, repeat)
                found[who] += torch.bincount(assign_modes(x, backbone.mixture)[1], minlength=len(found[who])) / len(x)
                for kind, x in idealised(x, backbone.mixture, rng).items():
                    swd, mmd = score(x)
                    totals[who, kind][0] += swd
                    totals[who, kind][1] += mmd
        cells = [f"{totals['student', k][0] / totals['teacher', k][0]:.2f}, "
                 f"{totals['student', k][1] * 1e3 / draws:.2f} / {totals['teacher', k][1] * 1e3 / draws:.2f}"
                 for k in kinds]
        gap = (found["student"] - found["teacher"]) / draws   # every point to its nearest mode
        print(f"| {run.name} | " + " | ".join(cells) + " | "
              + " ".join(f"{g:+.4f}" for g in gap) + f" | {0.5 * float(gap.abs().sum()):.4f} |", flush=True)


def mean_shares(backbone, net, grid, seed: int, draws: int) -> torch.Tensor:
    """The share of each mode (every point to its nearest, assign_modes) of `net` rolled out on
    `grid`, averaged over the seed's `draws` evaluation noises."""
    from tdm.toy.evaluate import assign_modes

    total = torch.zeros(len(backbone.mixture.means), dtype=torch.float64)
    for repeat in draw_repeats(seed, draws):
        x = draw_samples(backbone, net, grid, repeat)
        total += torch.bincount(assign_modes(x, backbone.mixture)[1], minlength=len(total)) / len(x)
    return total / draws


def shares(argv) -> None:
    """Where a student's mode weights lie between where it starts and what it is matched to: the
    mode shares (mean_shares) of the student, of the teacher's DDIM on the student's grid (the
    student's start: it is initialised from the teacher), and of the teacher's DDIM 50, 200 and
    1000 (--teacher_steps) — the last standing for the teacher's own flow, which distribution
    matching aims at — each with half its L1 distance to the flow's shares and to the mixture's
    weights."""
    from tdm.trajectory import StepGrid

    p = argparse.ArgumentParser(prog="toy_seeds.py shares", add_help=False)
    p.add_argument("--teacher_steps", type=int, nargs="+", default=[50, 200, 1000],
                   help="The teacher's DDIM step counts; the last stands for its flow.")
    job, argv = p.parse_known_args(argv)
    draws, runs = finished_runs("shares", argv)
    flow_name = f"teacher DDIM {job.teacher_steps[-1]}"
    print(f"| run | sampler | mode shares | ½ Σ abs to DDIM {job.teacher_steps[-1]} "
          "| ½ Σ abs to the mixture's weights |\n|---|---|---|---|---|")
    for run in runs:
        backbone, grid = run.backbone, run.grid
        teacher, steps = run.teacher(), backbone.path.num_timesteps
        samplers = {"student": (run.student(), grid),
                    f"teacher DDIM {len(grid.timesteps)} (the start)": (teacher, grid),
                    **{f"teacher DDIM {n}": (teacher, StepGrid.uniform(n, steps)) for n in job.teacher_steps}}
        found = {name: mean_shares(backbone, net, g, run.seed, draws) for name, (net, g) in samplers.items()}
        flow, truth = found[flow_name], backbone.mixture.weights.double()
        for name, v in found.items():
            print(f"| {run.name} | {name} | " + " ".join(f"{x:.4f}" for x in v)
                  + f" | {0.5 * float((v - flow).abs().sum()):.4f} | {0.5 * float((v - truth).abs().sum()):.4f} |",
                  flush=True)


def mean_over_draws(scores: list, i: int) -> float:
    """The mean over draws of element i (0: SWD, 1: MMD²) of scores_over_draws' pairs."""
    return statistics.mean(s[i] for s in scores)


def teacher_ddim_scores(backbone, folder: str, teacher, steps: int, seed: int, draws: int) -> list:
    """scores_over_draws of the teacher's DDIM `steps` (teacher() gives its network), cached in
    its folder: rescore and ceiling read the same draws."""
    from tdm.trajectory import StepGrid

    cached = os.path.join(folder, f"ddim{steps}_draws{draws}_seed{seed}.json")
    if not os.path.exists(cached):
        scores = scores_over_draws(backbone, teacher(), StepGrid.uniform(steps, backbone.path.num_timesteps),
                                   seed, draws)
        with open(cached, "w") as f:
            json.dump(scores, f)
    with open(cached) as f:
        return json.load(f)


def rescore(argv) -> None:
    """The protocol averaged over --draws evaluation noises (the protocol's own first): the
    student's and the teacher's DDIM 50 mean SWD and MMD², and their ratios. One noise draw of
    20,000 points moves a teacher's own SWD by −36 % to +65 % (`yardstick`: the multinomial noise of the mode
    weights, which SW₂ weighs by the distance between modes); the mean of N draws by ~1/√N of it.
    Writes rescore.json into each run folder (the teacher's draws are cached beside it)."""
    draws, runs = finished_runs("rescore", argv)
    for run in runs:
        teacher_scores = teacher_ddim_scores(run.backbone, run.teacher_folder, run.teacher, 50, run.seed, draws)
        student_scores = scores_over_draws(run.backbone, run.student(), run.grid, run.seed, draws)
        (s_swd, t_swd), (s_mmd, t_mmd) = [(mean_over_draws(student_scores, i), mean_over_draws(teacher_scores, i))
                                          for i in (0, 1)]
        result = {"draws": draws, "student": student_scores, "teacher": teacher_scores,
                  "r_swd": s_swd / t_swd, "r_mmd": s_mmd / t_mmd}
        with open(os.path.join(run.folder, "rescore.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"{run.name}: mean of {draws} draws SWD {s_swd:.4f} / teacher {t_swd:.4f} = {result['r_swd']:.2f}, "
              f"MMD² {s_mmd * 1e3:.2f} / {t_mmd * 1e3:.2f} = {result['r_mmd']:.2f}", flush=True)


def students(argv) -> None:
    """Several students of one teacher (`run --train_seed`): per MIXTURE:SEED teacher, the
    six-draw ratios (rescore.json) of its runs under each of --tags, in that order, their mean ±
    std and how many are within 10 % by both. A tag without a run of that teacher is left out; a
    run without rescore.json stops it (run rescore first)."""
    p = argparse.ArgumentParser(prog="toy_seeds.py students")
    p.add_argument("teachers", nargs="+", help="MIXTURE:SEED of teachers already trained")
    p.add_argument("--tags", nargs="+", required=True, help="the students' run tags")
    job = p.parse_args(argv)
    print("| teacher | SWD ratio of its students | mean ± std | MMD² ratio | within 10 % by both |\n"
          "|---|---|---|---|---|")
    for spec in job.teachers:
        mixture, seed = spec.split(":")
        found = []
        for tag in job.tags:
            folder = os.path.join(OUT, tag, f"{mixture}_s{seed}")
            if not os.path.isdir(folder):
                continue
            path = os.path.join(folder, "rescore.json")
            if not os.path.exists(path):
                raise SystemExit(f"error: {folder} has no rescore.json "
                                 f"(python scripts/toy_seeds.py rescore {tag}:{mixture}:{seed})")
            with open(path) as f:
                found.append(json.load(f))
        if not found:
            raise SystemExit(f"error: no run of {spec} under the tags {' '.join(job.tags)}")
        r_swd, r_mmd = [r["r_swd"] for r in found], [r["r_mmd"] for r in found]
        print(f"| {mixture} {seed} | {', '.join(f'{x:.2f}' for x in r_swd)} | {spread(r_swd, 2)} | "
              f"{', '.join(f'{x:.2f}' for x in r_mmd)} | {sum(map(within, found))} of {len(found)} |", flush=True)


def ceiling(argv) -> None:
    """What a student that matched its target exactly would score: the teacher's DDIM 200 and
    1000 (its own flow, which distribution matching aims at) by the protocol over --draws noises,
    over its DDIM 50's (rescore's draws) — the ratios rescore would give such a student."""
    p = argparse.ArgumentParser(prog="toy_seeds.py ceiling")
    p.add_argument("teachers", nargs="+", help="MIXTURE:SEED of teachers already trained")
    p.add_argument("--draws", type=int, default=6)
    p.add_argument("--steps", type=int, nargs="+", default=[200, 1000])
    job = p.parse_args(argv)
    print("| mixture | seed | " + " | ".join(f"DDIM {n}: SWD / MMD² ratio" for n in job.steps) + " |\n"
          + "|---|---|" + "---|" * len(job.steps))
    for spec in job.teachers:
        mixture, seed = spec.split(":")
        seed = int(seed)
        folder, backbone = teacher_folder(mixture, seed), trained_teacher(mixture, seed)
        teacher = lambda: backbone.denoiser(backbone.load_denoiser().eval())  # noqa: E731
        base = teacher_ddim_scores(backbone, folder, teacher, 50, seed, job.draws)
        cells = []
        for n in job.steps:
            scores = teacher_ddim_scores(backbone, folder, teacher, n, seed, job.draws)
            r_swd, r_mmd = (mean_over_draws(scores, i) / mean_over_draws(base, i) for i in (0, 1))
            cells.append(f"{r_swd:.2f} / {r_mmd:.2f}")
        print(f"| {mixture} | {seed} | " + " | ".join(cells) + " |", flush=True)


COMMANDS = {"run": run, "table": table, "importance": importance, "yardstick": yardstick,
            "decompose": decompose, "rescore": rescore, "shares": shares, "ceiling": ceiling,
            "students": students,
            "curves": lambda argv: curves(argv[0], argv[1:]), "scatter": lambda argv: scatter(argv[0], argv[1:])}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 2
    COMMANDS[argv[0]](argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
