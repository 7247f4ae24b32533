"""The 2-D Gaussian-mixture benchmark: SWD, the toy2d adapter, a shortened job."""
import json
import math
import os
import sys

import pytest
import torch

from conftest import ROOT, run_script
from tdm.metrics import sliced_wasserstein

SMALL = {"network": {"hidden": 32, "depth": 1, "time_channels": 16},
         "teacher": {"steps": 30, "batch_size": 64}}


def test_swd_of_two_point_masses_is_the_distance_over_root_d():
    a, b = torch.zeros(1000, 2), torch.tensor([3.0, 4.0]).expand(1000, 2)
    assert sliced_wasserstein(a, b, num_projections=20000) == pytest.approx(5 / math.sqrt(2), rel=0.02)
    assert sliced_wasserstein(a, a) == 0.0


def test_swd_of_two_centred_gaussians_is_the_std_difference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=g)
    y = 3 * torch.randn(40000, 2, generator=g)          # a reference twice as large
    assert sliced_wasserstein(x, y, 256) == pytest.approx(2.0, rel=0.03)
    with pytest.raises(ValueError):
        sliced_wasserstein(x, y[:30000])


def test_swd_sw1_of_point_masses():
    a, b = torch.zeros(10, 2), torch.tensor([1.0, 0.0]).expand(10, 2)
    # E|cos θ| over the circle = 2/π
    assert sliced_wasserstein(a, b, 50000, p=1) == pytest.approx(2 / math.pi, rel=0.02)


def test_swd_equals_the_plain_per_projection_formula():
    """The row-sorted implementation against a plain loop: for each projection, sort both
    projections and average |x_(i) − y_(j)|^p over the matched pairs."""
    x, y = torch.randn(50, 2, dtype=torch.float64), torch.randn(150, 2, dtype=torch.float64) + 0.3
    theta = torch.randn((2, 7), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    terms = []
    for j in range(7):
        px, py = (x @ theta[:, j]).sort().values, (y @ theta[:, j]).sort().values
        terms += [abs(px[i // 3] - py[i]) ** 2 for i in range(150)]
    assert sliced_wasserstein(x, y, 7, seed=3) == pytest.approx(math.sqrt(sum(terms) / len(terms)), rel=1e-12)


def test_mmd2_unbiased_by_hand_on_a_few_points():
    """k(a, b) = exp(−‖a − b‖²/2) (h = 1). x = {(0,0), (1,0)}, y = {(0,0), (0,1)}: the
    within-sample pairs are 1 apart (e^{−1/2} each), the four cross pairs have ‖·‖² = 0, 1, 1, 2,
    so MMD²_u = e^{−1/2} + e^{−1/2} − 2·(1 + 2e^{−1/2} + e^{−1})/4 = e^{−1/2} − ½ − ½e^{−1} < 0
    (unbiased: it can be negative). y moved far away: the cross term vanishes, MMD²_u = 2e^{−1/2}."""
    from tdm.toy.evaluate import mmd2_reference_term, mmd2_unbiased

    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    e = math.exp
    assert mmd2_unbiased(x, y, bandwidth=1.0) == pytest.approx(e(-0.5) - 0.5 - 0.5 * e(-1.0), abs=1e-12)
    far = torch.tensor([[10.0, 0.0], [11.0, 0.0]])
    assert mmd2_unbiased(x, far, bandwidth=1.0) == pytest.approx(2 * e(-0.5), abs=1e-12)
    # three points, h = 0.5: k = exp(−2‖·‖²); the chunked upper-triangle sums give the same
    x3 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    k = lambda d2: e(-2.0 * d2)
    xx = 2 * (k(1) + k(1) + k(2)) / 6                       # pairs (1,2), (1,3), (2,3)
    yy = 2 * k(1) / 2
    xy = (k(0) + k(1) + k(1) + k(2) + k(0) + k(1)) / 6      # x_i against (0,0) and (0,1)
    for chunk in (1, 2, 2048):
        assert mmd2_unbiased(x3, y, 0.5, chunk=chunk) == pytest.approx(xx + yy - 2 * xy, abs=1e-12)
    assert mmd2_unbiased(x3, y, 0.5, y_term=mmd2_reference_term(y, 0.5)) == pytest.approx(xx + yy - 2 * xy)
    with pytest.raises(ValueError):
        mmd2_unbiased(x[:1], y)


def test_mmd2_floor_is_far_below_a_small_change_of_the_modes():
    """Two independent samples of one mixture score ~0; modes 20 % wider score far more."""
    from tdm.toy.evaluate import mmd2_unbiased
    from tdm.toy.mixture import GaussianMixture

    mixture = GaussianMixture.from_options({})
    wider = GaussianMixture.from_options({"std": 0.12})
    a, b, c = (m.sample(3000, torch.Generator().manual_seed(i))[0]
               for i, m in enumerate((mixture, mixture, wider)))
    floor, change = mmd2_unbiased(a, b), mmd2_unbiased(c, b)
    assert abs(floor) < 0.2 * change, (floor, change)


def test_mode_statistics_by_hand():
    """Modes (0, 0) std 0.1 and (1, 0) std 0.2, weights ½ each; four points: two at z = 1 of
    mode 0, one at z = 2 of mode 1, one at z = 5.59 of mode 1 (z = 11.2 of mode 0): off."""
    from tdm.toy.evaluate import mode_markdown, mode_statistics
    from tdm.toy.mixture import GaussianMixture

    mixture = GaussianMixture.from_options({"means": [[0, 0], [1, 0]], "std": [0.1, 0.2]})
    points = torch.tensor([[0.1, 0.0], [0.0, -0.1], [1.4, 0.0], [0.5, 1.0]])
    stats = mode_statistics(points, mixture)
    assert stats["off_mode"] == pytest.approx(0.25)
    assert stats["weights"] == pytest.approx([2 / 3, 1 / 3])
    assert stats["weight_error"] == pytest.approx(0.5 * (abs(2 / 3 - 0.5) + abs(1 / 3 - 0.5)))
    assert stats["width"] == pytest.approx([math.sqrt(0.5), math.sqrt(2.0)])   # √(z²/2): z = 1, 2
    assert stats["width_mean"] == pytest.approx(0.5 * (math.sqrt(0.5) + math.sqrt(2.0)))
    truth = mixture.sample(20000, torch.Generator().manual_seed(0))[0]   # the true mixture
    exact = mode_statistics(truth, mixture)
    assert exact["off_mode"] < 2e-3 and exact["weight_error"] < 0.02
    assert exact["width"] == pytest.approx([1.0, 1.0], abs=0.02)
    assert "| TDM student 4 steps | 25.00 % | 0.1667 | 1.06 (0.71 – 1.41) |" in mode_markdown(
        {"student_4step": stats})


def test_summary_and_table_of_several_seeds():
    from tdm.toy.evaluate import markdown_table, summarize

    repeats = [{"swd": {"ground_truth": 0.04, "student_4step": 0.05},
                "mmd": {"ground_truth": 0.0, "student_4step": 0.002}},
               {"swd": {"ground_truth": 0.06, "student_4step": 0.07},
                "mmd": {"ground_truth": 0.0, "student_4step": 0.004}}]
    summary = summarize(repeats)
    assert summary["swd"]["student_4step"] == pytest.approx([0.06, math.sqrt(2) * 0.01, 2])
    table = markdown_table({"samples": 10, "projections": 4, "mmd_samples": 10, "mmd_bandwidth": 0.1,
                            "swd": repeats[0]["swd"], "repeats": repeats})
    assert "| TDM student 4 steps | 4 | 0.0600 ± 0.0141 | 3.000 ± 1.414 | 2 |" in table


def test_other_mixtures_grid_per_mode_std_and_weights_build(tmp_path):
    """configs/toy2d_*.yaml: their mixtures build, sample with their own widths and weights,
    and load as a toy2d backbone (on a small teacher)."""
    import yaml

    from tdm.toy.mixture import GaussianMixture

    grid = GaussianMixture.from_options({"grid": {"rows": 2, "cols": 3, "spacing": 2.0}, "std": 0.1})
    assert grid.means.tolist() == [[-2, -1], [0, -1], [2, -1], [-2, 1], [0, 1], [2, 1]]
    mixture = GaussianMixture.from_options({"means": [[0, 0], [5, 0]], "std": [0.1, 1.0],
                                            "weights": [3, 1]})
    points, component = mixture.sample(8000, torch.Generator().manual_seed(0))
    assert (component == 0).float().mean() == pytest.approx(0.75, abs=0.02)
    for c, std in ((0, 0.1), (1, 1.0)):
        assert points[component == c].std(0).mean() == pytest.approx(std, rel=0.05)
    with pytest.raises(ValueError):
        GaussianMixture.from_options({"means": [[0, 0], [5, 0]], "std": [0.1, 0.2, 0.3]})
    configs = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                     if f.startswith("toy2d_") and f.endswith(".yaml"))
    assert len(configs) >= 2
    for i, name in enumerate(configs):
        config = yaml.safe_load(open(os.path.join(ROOT, "configs", name)))
        mix = config["backbone_options"]["mixture"]
        assert config["backbone_options"]["network"] == yaml.safe_load(open(os.path.join(
            ROOT, "configs", "toy2d.yaml")))["backbone_options"]["network"]
        bb = toy(tmp_path / str(i), **mix)
        assert bb.mixture.means.shape[0] == GaussianMixture.from_options(mix).means.shape[0] > 1


def toy(tmp_path, **mixture):
    """The toy backbone on a small teacher, pre-trained explicitly into tmp_path/teacher first."""
    from tdm.backbones import load_backbone
    from tdm.toy.teacher import ensure_teacher

    options = {**SMALL, "mixture": mixture}
    return load_backbone(ensure_teacher(str(tmp_path / "teacher"), options), "toy2d", options=options)


def test_teacher_is_pretrained_once_and_reused(tmp_path, monkeypatch):
    first = toy(tmp_path)
    assert (tmp_path / "teacher" / "denoiser" / "config.json").is_file()
    import tdm.toy.teacher as teacher

    monkeypatch.setattr(teacher, "pretrain_teacher", lambda *a, **k: pytest.fail("retrained"))
    second = toy(tmp_path)
    for p, q in zip(first.load_denoiser().parameters(), second.load_denoiser().parameters()):
        assert torch.equal(p, q)
    from tdm.backbones import load_backbone
    from tdm.config import UsageError

    with pytest.raises(UsageError, match="other settings"):
        toy(tmp_path, std=0.2)
    with pytest.raises(UsageError, match="other settings"):   # the adapter checks the spec too
        load_backbone(str(tmp_path / "teacher"), "toy2d", options={**SMALL, "mixture": {"std": 0.2}})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text("{}")
    with pytest.raises(UsageError, match="not empty"):     # never trains over another folder
        teacher.ensure_teacher(str(tmp_path / "other"), SMALL)


def toy_run_args(tmp_path, name, *extra):
    from tdm.config import parse_args

    return parse_args(["--config", os.path.join(ROOT, "configs", "toy2d.yaml"),
                       "--pretrained_model_name_or_path", str(tmp_path / "teacher"),
                       "--backbone_options", json.dumps({**SMALL, "mixture": {}}),
                       "--output_dir", str(tmp_path / name), "--max_train_steps", "6",
                       "--train_batch_size", "64", *extra])


def test_toy_run_logs_its_quality_against_held_out_data_by_value(tmp_path):
    """Every --validation_steps the toy logs (train_log.jsonl, TensorBoard) the SWD, MMD² and mode
    statistics of the student's samples against its held-out ground truth, equal to the metrics
    recomputed on the exported student's samples; the teacher's DDIM on the same inputs (computed
    once, the same at every validation); and the agreement with the teacher on the validation
    prompts. Training is the same with validation as without."""
    import train_tdm
    from tdm.metrics import sliced_wasserstein
    from tdm.toy.evaluate import MMD_BANDWIDTH, SEEDS, mmd2_unbiased, mode_statistics
    from tdm.trajectory import StepGrid, rollout

    backbone = toy(tmp_path)
    args = toy_run_args(tmp_path, "watched", "--validation_steps", "3", "--validation_teacher_steps", "10",
                        "--report_to", "tensorboard")
    assert train_tdm.main(args) == 0
    lines = [json.loads(line) for line in (tmp_path / "watched" / "train_log.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "val_swd" in line]
    assert [line["step"] for line in logged] == [3, 6]

    held = backbone.held_out_data()
    grid, uniform = StepGrid(args.timesteps), StepGrid.uniform(10, 1000)
    student = backbone.denoiser(backbone.load_student(str(tmp_path / "watched")).eval())
    teacher = backbone.denoiser(backbone.load_denoiser().eval())
    for name, net, steps in (("val_", student, grid), ("val_teacher_", teacher, uniform)):
        x = rollout(net, held.noise, held.cond, steps, backbone.path).sample
        modes = mode_statistics(x, backbone.mixture)
        expected = {"swd": sliced_wasserstein(x, held.reference, 256, SEEDS["projections"]),
                    "mmd2": mmd2_unbiased(x, held.reference[:5000], MMD_BANDWIDTH),
                    "off_mode": modes["off_mode"], "weight_error": modes["weight_error"],
                    "width": modes["width_mean"]}
        for key, value in expected.items():
            assert logged[-1][name + key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    assert len(held.reference) == 25000 and held.noise.shape == (5000, 2)
    assert all(logged[0][k] == logged[1][k] for k in logged[0] if k.startswith("val_teacher_") and
               "mad" not in k)
    prompts = backbone.encode_prompts(args.validation_prompts)
    noise = torch.randn((len(args.validation_prompts), 2), generator=torch.Generator().manual_seed(0))
    mad = (rollout(student, noise, prompts, grid, backbone.path).sample
           - rollout(teacher, noise, prompts, uniform, backbone.path).sample).abs().mean().item()
    assert logged[-1]["val_teacher_mad_k4"] == pytest.approx(mad, rel=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "watched" / "logs")
              for f in files if f.startswith("events.")]
    scalars = EventAccumulator(events[0]).Reload()
    board = scalars.Scalars("val_mmd2")
    assert [e.step for e in board] == [3, 6]
    assert [e.value for e in board] == pytest.approx([line["val_mmd2"] for line in logged], rel=1e-6)

    assert train_tdm.main(toy_run_args(tmp_path, "plain", "--validation_steps", "0")) == 0
    plain = [json.loads(line) for line in (tmp_path / "plain" / "train_log.jsonl").read_text().splitlines()]
    losses = lambda log: [(l["loss_fake_score"], l["loss_student"]) for l in log if "loss_student" in l]  # noqa: E731
    assert losses(plain) == losses(lines) and len(losses(plain)) == 6


def test_handoff_samples_hand_over_at_the_last_steps_input(tmp_path):
    """With the teacher's network as the student, every hand-over is a plain rollout: the
    student's states up to τ_1 finished by the teacher are the teacher on the joined grid, and
    the marginal finished by either in one step is the same."""
    from tdm.toy.evaluate import evaluation_inputs, handoff_samples, seed_of
    from tdm.trajectory import StepGrid, rollout

    backbone = toy(tmp_path)
    net = backbone.load_denoiser()
    out = handoff_samples(backbone, net, [30, 12], 1.0, 64, stride=3)
    teacher = backbone.denoiser(net.eval())
    _, cond, noise = evaluation_inputs(backbone, 64)
    joined = rollout(teacher, noise, cond, StepGrid([30, 12, 9, 6, 3, 0]), backbone.path).sample
    torch.testing.assert_close(out["student_then_teacher"], joined, rtol=0, atol=0)
    torch.testing.assert_close(out["marginal_then_student"],
                               handoff_samples(backbone, net, [30, 12], 1.0, 64, stride=13)["marginal_then_teacher"],
                               rtol=0, atol=0)   # stride 13: the teacher's finish is the one step [12]
    assert seed_of("handoff") not in (seed_of(name) for name in ("ground_truth", "reference", "noise"))


@pytest.mark.slow
def test_toy_modes_script_sensitivity_and_weights(tmp_path, capsys):
    """scripts/toy_modes.py on a small teacher of the asymmetric mixture: moving mass between two
    modes raises the SWD with the share moved, and every sampler's weights sum to 1."""
    import yaml
    from tdm.toy.teacher import ensure_teacher

    mixture = yaml.safe_load(open(os.path.join(ROOT, "configs", "toy2d_asym.yaml")))["backbone_options"]["mixture"]
    options = {"mixture": mixture, "network": {"hidden": 64, "depth": 2, "time_channels": 32},
               "teacher": {"steps": 800, "batch_size": 512, "lr": 3e-3}}
    ensure_teacher(str(tmp_path / "teacher"), options)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import toy_modes

    assert toy_modes.main(["--config", os.path.join(ROOT, "configs", "toy2d_asym.yaml"),
                           "--pretrained_model_name_or_path", str(tmp_path / "teacher"),
                           "--backbone_options", json.dumps(options),
                           "--samples", "4000", "--weight_samples", "4000"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith(("| change", "| sampler"))]
    swd = {row[0][2:]: float(row[1].rstrip(" |")) for row in rows if len(row) == 2}
    floor, half, one = (swd[key] for key in ("none (the floor)", "0.5 % of the mass from mode 1 to mode 2",
                                             "1 % of the mass from mode 1 to mode 2"))
    assert floor < half < one, swd
    weights = {row[0][2:]: [float(v.rstrip(" |")) for v in row[1:]] for row in rows if len(row) == 6}
    assert set(weights) == {"mixture", "teacher DDIM 50", "teacher DDIM 200"}
    assert all(sum(w) == pytest.approx(1, abs=1e-3) for w in weights.values()), weights
    assert weights["mixture"] == [0.35, 0.25, 0.2, 0.15, 0.05]


@pytest.mark.slow
def test_backbone_only_loads_and_names_the_pretrain_command(tmp_path):
    """An empty (or missing) folder is a one-line UsageError with the command that creates the
    teacher; that command, run as printed, makes the folder loadable."""
    import shlex

    from tdm.backbones import load_backbone
    from tdm.config import UsageError

    folder = tmp_path / "teacher"
    folder.mkdir()
    options = {**SMALL, "mixture": {"conditional": True, "circle": {"modes": 4, "radius": 2.0}}}
    with pytest.raises(UsageError) as error:
        load_backbone(str(folder), "toy2d", options=options)
    message = str(error.value)
    assert "\n" not in message and "python -m tdm.toy.teacher" in message
    assert os.listdir(folder) == []                        # nothing trained as a side effect
    command = shlex.split(message[message.index("python -m tdm.toy.teacher"):])
    proc = run_script([sys.executable, *command[1:]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_backbone(str(folder), "toy2d", options=options).mixture.num_classes == 4


def test_pretrain_command_reads_a_config_and_the_command_line_wins(tmp_path, capsys):
    """`python -m tdm.toy.teacher --config configs/toy2d.yaml` (the config header's command)
    takes the config's folder and options; the same flags on the command line win."""
    import yaml

    from tdm.toy import teacher

    args = teacher.parse_args(["--config", os.path.join(ROOT, "configs", "toy2d.yaml")])
    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "toy2d.yaml")))
    assert args.pretrained_model_name_or_path == config["pretrained_model_name_or_path"]
    assert args.backbone_options == config["backbone_options"]
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"backbone": "toy2d", "backbone_options": SMALL,
                                    "pretrained_model_name_or_path": str(tmp_path / "unused")}))
    folder = str(tmp_path / "teacher")
    assert teacher.main(["--config", str(path), "--pretrained_model_name_or_path", folder]) == 0
    assert teacher.read_spec(folder) == teacher.teacher_spec(SMALL)
    assert not (tmp_path / "unused").exists()
    assert teacher.main(["--config", str(path), "--pretrained_model_name_or_path", folder]) == 0
    assert "reused" in capsys.readouterr().out


def test_conditional_mixture_labels_empty_condition_and_cfg(tmp_path):
    from tdm.method import TDM, TDMConfig
    from tdm.trajectory import StepGrid

    bb = toy(tmp_path, conditional=True, circle={"modes": 4, "radius": 2.0})
    cond = bb.encode_prompts(["0", "3", ""])
    assert cond["class_labels"].tolist() == [0, 3, 4]       # "" is the empty condition
    from tdm.config import UsageError

    with pytest.raises(UsageError):
        bb.encode_prompts(["a cat"])
    teacher = bb.denoiser(bb.load_denoiser().eval())
    x_t, t = torch.randn(3, 2), torch.full((3,), 500)
    uncond = bb.encode_prompts([""] * 3)
    tdm = TDM(bb.path, StepGrid.uniform(4, 900), TDMConfig(cfg=3.0))
    guided = tdm.teacher_x0(teacher, x_t, t, cond, uncond)
    x0_c, x0_u = teacher(x_t, t, cond)[0], teacher(x_t, t, uncond)[0]
    torch.testing.assert_close(guided, x0_u + 3.0 * (x0_c - x0_u))
    assert not torch.allclose(x0_c[:2], x0_u[:2])
    assert bb.decode(torch.randn(2, 2)).shape == (2, 3, 64, 64)


@pytest.mark.slow
def test_shortened_job_student_beats_teacher_on_four_steps(tmp_path):
    out = tmp_path / "toy"
    proc = run_script([sys.executable, os.path.join(ROOT, "scripts", "toy_benchmark.py"),
                       "--config", os.path.join(ROOT, "configs", "toy2d.yaml"),
                       "--output_dir", str(out), "--pretrained_model_name_or_path",
                       str(tmp_path / "teacher"), "--max_train_steps", "300",
                       "--samples", "4000", "--reference_factor", "2", "--handoff",
                       "--backbone_options", json.dumps({
                           "mixture": {"circle": {"modes": 8, "radius": 2.0}, "std": 0.1},
                           "network": {"hidden": 64, "depth": 2, "time_channels": 32},
                           "teacher": {"steps": 800, "batch_size": 512, "lr": 3e-3}})],
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    noise = [line for line in proc.stderr.splitlines()   # the demo's job: no library warnings
             if "warn" in line.lower() or "failed to load" in line.lower()]
    assert not noise, noise
    # progress bars for each part (teacher, distillation, evaluation); log lines on their own
    lines = proc.stderr.replace("\r", "\n").splitlines()
    for bar in ("toy teacher: 100%", "TDM: 100%", "evaluation (seed 0): 100%"):
        assert any(line.startswith(bar) for line in lines), bar
    glued = [line for line in lines if " INFO " in line and not line[:4].isdigit()]
    assert not glued and any(" INFO tdm: exported the student" in line for line in lines), glued
    assert "One seed (students trained with --seed 0), evaluation seeds 0" in proc.stdout
    assert "*Off every mode*: the share of points with z > 4" in proc.stdout
    result = json.loads((out / "toy_eval.json").read_text())
    swd = result["swd"]
    assert swd["student_4step"] < swd["teacher_ddim4"], swd
    for name in ("toy2d.png", "toy_eval.md", "toy_samples.npz"):
        assert (out / name).is_file()
    table = (out / "toy_eval.md").read_text()
    assert set(result["modes"]) == set(swd) and "off every mode" in table
    assert set(result["handoff"]["swd"]) == {"student_then_teacher", "marginal_then_student",
                                             "marginal_then_teacher"}
    assert "hand-over at τ_1 = 111" in table and "then the student's last step" in table
    import numpy as np

    arrays = np.load(out / "toy_samples.npz")
    assert set(arrays.files) == set(swd) and arrays["student_4step"].shape == (4000, 2)


@pytest.mark.slow
def test_shortened_unify_job_table_files_and_live_step_condition(tmp_path):
    """--unify end to end on a tiny teacher and a few iterations: the table/JSON structure, the
    exported step embedding (rows of the trained K only) and that K changes the student's output.
    The quality targets are not asserted here (noise at this size); the full run reports them."""
    out = tmp_path / "toy"
    options = {"mixture": {"circle": {"modes": 8, "radius": 2.0}, "std": 0.1}, **SMALL}
    proc = run_script([sys.executable, os.path.join(ROOT, "scripts", "toy_benchmark.py"), "--unify",
                       "--config", os.path.join(ROOT, "configs", "toy2d.yaml"),
                       "--output_dir", str(out), "--pretrained_model_name_or_path",
                       str(tmp_path / "teacher"), "--max_train_steps", "30",
                       "--train_batch_size", "64", "--samples", "1000", "--reference_factor", "1",
                       "--projections", "32", "--backbone_options", json.dumps(options)],
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    unify = json.loads((out / "toy2d_unify.json").read_text())
    assert unify["counts"] == [1, 2, 4]
    assert unify["grids"] == {"1": [449], "2": [449, 224], "4": [449, 336, 224, 111]}   # T = 450
    students = unify["students"]
    assert list(students) == ["unify", "k1", "k2", "k4", "unify_plain", "k4_fake_step"]
    assert students["k4"]["output_dir"] == str(out) and students["k4"]["seconds"] is None  # reused
    assert students["unify"]["trained_for"] == [1, 2, 4]
    plain = students["unify_plain"]   # the same student, evaluated without its step embedding
    assert plain["output_dir"] == students["unify"]["output_dir"] and plain["seconds"] is None
    assert plain["swd"] != students["unify"]["swd"]
    for key, row in students.items():
        assert set(row["swd"]) == {"1", "2", "4"}
        assert all(math.isfinite(v) and v > 0 for v in row["swd"].values()), (key, row)
    # a 4-step student at K = 4 is the default job's 4-step sampler: same noise, same number
    result = json.loads((out / "toy_eval.json").read_text())
    assert students["k4"]["swd"]["4"] == pytest.approx(result["swd"]["student_4step"], rel=1e-6)
    assert students["k4"]["swd"]["1"] == pytest.approx(result["swd"]["student_1step"], rel=1e-6)
    targets = unify["targets"]
    within = targets["unify_within_10pct_of_single_K"]
    assert set(within["per_K"]) == {"1", "2", "4"} and isinstance(within["pass"], bool)
    one = targets["one_step_2x_better_than_4_step_only"]
    assert one["unify"] == students["unify"]["swd"]["1"] and one["four_step_only"] == students["k4"]["swd"]["1"]
    assert one["pass"] == (one["unify"] <= 0.5 * one["four_step_only"])
    table = (out / "toy2d_unify.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(students)
    assert "Target 1" in table and "Target 2" in table
    assert "toy2d_unify.md" in proc.stdout
    for name in ("toy2d_unify.png", "toy2d_unify_samples.npz"):
        assert (out / name).is_file()
    from PIL import Image

    assert Image.open(out / "toy2d_unify.png").size == (3 * 320, 6 * 360)

    # the unify student's export carries its step embedding, trained for K = 1, 2, 4 only ...
    from safetensors.torch import load_file

    from tdm.backbones import load_backbone
    from tdm.step_condition import STEP_EMBEDDING_NAME, set_num_steps
    from tdm.trajectory import StepGrid, rollout

    embedding = out / "unify" / "unify" / "denoiser" / STEP_EMBEDDING_NAME
    assert embedding.is_file()
    table = load_file(str(embedding))["num_steps.weight"]
    assert [k for k in range(table.shape[0]) if table[k].abs().sum() > 0] == [1, 2, 4]
    for key in ("k1", "k2", "k4_fake_step"):   # students without a K condition export none
        assert not (out / "unify" / key / "denoiser" / STEP_EMBEDDING_NAME).exists()
    # ... and the condition is live: the same 1-step rollout told K = 1 or K = 4 differs
    bb = load_backbone(str(tmp_path / "teacher"), "toy2d", options=options)
    net = bb.load_student(str(out / "unify" / "unify"))
    noise, cond = torch.randn(256, 2, generator=torch.Generator().manual_seed(0)), bb.encode_prompts([""] * 256)
    samples = {}
    with torch.no_grad():
        for K in (1, 4, 1):
            set_num_steps(net, K)
            samples.setdefault(K, []).append(
                rollout(bb.denoiser(net.eval()), noise, cond, StepGrid.uniform(1, 600), bb.path).sample)
    torch.testing.assert_close(samples[1][0], samples[1][1])
    assert (samples[1][0] - samples[4][0]).abs().max() > 1e-5




def toy_run(tiny_models, folder, scale):
    """A toy run folder as train_tdm.py leaves it: config.yaml and a full student (the teacher's
    weights times `scale`)."""
    from harness import TOY_OPTIONS

    from conftest import tiny_flags
    from tdm.backbones import load_backbone
    from tdm.config import parse_args, save_resolved_config

    teacher = tiny_models("toy2d")
    args = parse_args(tiny_flags(teacher, folder, 1, "--backbone", "toy2d", "--cfg", "1",
                                 "--backbone_options", json.dumps(TOY_OPTIONS)))
    student = load_backbone(teacher, "toy2d", options=TOY_OPTIONS).load_denoiser()
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(scale)
    student.save_pretrained(str(folder / "denoiser"))
    save_resolved_config(args, str(folder / "config.yaml"))
    return folder


def test_infer_samples_the_toy_student_beside_its_teacher(tiny_models, tmp_path, capsys):
    """infer_tdm.py --weights on a toy run (its folder or its denoiser/): scatter panels of the
    student on its grid beside the teacher's DDIM, from the same noise, and their points. A
    "student" equal to the teacher, on the grid the teacher's DDIM takes, draws the same points;
    a changed student does not; each panel is the scatter of its points."""
    import numpy as np
    from PIL import Image

    import infer_tdm
    from tdm.toy.evaluate import scatter_panel
    from tdm.trajectory import StepGrid

    def sample(weights, *flags):
        png = tmp_path / "toy.png"
        assert infer_tdm.main(["--weights", str(weights), "--output", str(png), "--num_samples",
                               "500", *flags]) == 0
        image, points = np.asarray(Image.open(png).convert("RGB")), np.load(tmp_path / "toy.npz")
        assert image.shape == (360, 640, 3)                        # two titled 320 px panels
        for i, key in enumerate(("student", "teacher")):
            assert points[key].shape == (500, 2)
            drawn = np.asarray(scatter_panel(points[key], "title"))[40:]
            np.testing.assert_array_equal(image[40:, 320 * i:320 * (i + 1)], drawn)
        return points["student"], points["teacher"]

    same = toy_run(tiny_models, tmp_path / "same", 1.0)
    ddim4 = ",".join(map(str, StepGrid.uniform(4, 1000).timesteps))
    student, teacher = sample(same, "--timesteps", ddim4, "--teacher_steps", "4")
    np.testing.assert_array_equal(student, teacher)
    out = capsys.readouterr().out
    assert "toy2d, 500 points a panel" in out and "teacher DDIM 4 with cfg 1" in out
    changed = toy_run(tiny_models, tmp_path / "changed", 0.9)
    student, teacher = sample(changed / "denoiser", "--timesteps", ddim4, "--teacher_steps", "4")
    assert np.abs(student - teacher).max() > 1e-3
    sample(changed, "--prompt", "1", "--prompt", "2")             # class labels; DDIM 50 by default
    assert "teacher DDIM 50 with cfg 1" in capsys.readouterr().out


def test_toy_seeds_trace_leaves_training_unchanged_and_scores_the_student(tmp_path, monkeypatch):
    """scripts/toy_seeds.py: with its trace the run's losses equal a plain run's; the trace's last
    line equals SWD/MMD² recomputed on the exported student from the trace's noise; it records
    one gradient norm per update (3 fake, 3 student per 3 steps), and train_tdm's
    --fake_score_updates 2 makes it two fake-score updates per student update."""
    import train_tdm
    from scripts import toy_seeds
    from tdm.metrics import sliced_wasserstein
    from tdm.toy.evaluate import mmd2_unbiased
    from tdm.trajectory import StepGrid, rollout

    originals = {name: getattr(train_tdm, name)
                 for name in ("update", "all_finite", "log_validation", "tdm_iteration")}
    for name, value in originals.items():
        monkeypatch.setattr(train_tdm, name, value)   # restored after the test
    backbone = toy(tmp_path)
    counts = []

    class Counting(toy_seeds.Tracer):
        def __call__(self, accelerator, args, run, step, measures=None):
            counts.append({who: len(v) for who, v in self.norms.items()})
            super().__call__(accelerator, args, run, step, measures)

    tracer = Counting(backbone, str(tmp_path / "trace.jsonl"), n=300)
    toy_seeds.wrap_update(train_tdm, tracer)
    assert train_tdm.main(toy_run_args(tmp_path, "traced", "--validation_steps", "3")) == 0
    assert counts == [{"fake": 3, "student": 3}] * 2
    rows = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and all(r["gn_student_mean"] > 0 for r in rows)
    student = backbone.denoiser(backbone.load_student(str(tmp_path / "traced")).eval())
    args = toy_run_args(tmp_path, "plain")
    x = rollout(student, tracer.noise, backbone.encode_prompts([""] * 300), StepGrid(args.timesteps),
                backbone.path).sample
    assert rows[-1]["swd"] == pytest.approx(sliced_wasserstein(x, tracer.reference, 128, 0), rel=1e-6)
    assert rows[-1]["mmd"] == pytest.approx(mmd2_unbiased(x, tracer.reference[:300], 0.1), rel=1e-6, abs=1e-12)

    for name, value in originals.items():   # the plain run: train_tdm as shipped
        setattr(train_tdm, name, value)
    assert train_tdm.main(toy_run_args(tmp_path, "plain", "--validation_steps", "0")) == 0
    losses = lambda folder: [(l["loss_fake_score"], l["loss_student"]) for l in map(  # noqa: E731
        json.loads, (tmp_path / folder / "train_log.jsonl").read_text().splitlines()) if "loss_student" in l]
    assert losses("plain") == losses("traced") and len(losses("plain")) == 6

    counts.clear()
    toy_seeds.wrap_update(train_tdm, tracer)
    assert train_tdm.main(toy_run_args(tmp_path, "two_fake", "--validation_steps", "3",
                                       "--fake_score_updates", "2")) == 0
    assert counts == [{"fake": 6, "student": 3}] * 2


def test_toy_seeds_students_tabulates_the_rescored_students_of_each_teacher(tmp_path, monkeypatch, capsys):
    """scripts/toy_seeds.py students: per teacher, the rescored ratios of its runs in --tags order,
    mean ± std (1.0 and 1.2: 1.10 ± 0.14) and the count within 10 % by both (MMD² 1.2 fails);
    a tag without a run of that teacher is left out; a run without rescore.json stops it."""
    from scripts import toy_seeds

    monkeypatch.setattr(toy_seeds, "OUT", str(tmp_path))
    for tag, r_swd, r_mmd in (("a", 1.0, 0.5), ("b", 1.2, 1.2)):
        (tmp_path / tag / "ring6_s1").mkdir(parents=True)
        (tmp_path / tag / "ring6_s1" / "rescore.json").write_text(json.dumps({"r_swd": r_swd, "r_mmd": r_mmd}))
    toy_seeds.students(["ring6:1", "--tags", "b", "a", "absent"])
    assert capsys.readouterr().out.splitlines()[-1] == "| ring6 1 | 1.20, 1.00 | 1.10 ± 0.14 | 1.20, 0.50 | 1 of 2 |"
    (tmp_path / "c" / "ring6_s1").mkdir(parents=True)
    with pytest.raises(SystemExit, match="has no rescore.json"):
        toy_seeds.students(["ring6:1", "--tags", "a", "c"])


def test_idealised_takes_out_one_kind_of_error():
    """scripts/toy_seeds.py decompose: modes (0, 0) std 0.1 and (1, 0) std 0.2; 4,000 points
    squeezed onto mode 0, 1,000 onto mode 1, 1,000 at (0.5, 1) (off: z = 5.6 of mode 1, 11.2 of
    mode 0). Bridges removed: no off-mode point left, the on-mode ones untouched; true shapes: the
    off-mode ones untouched, the modes' widths 1; weights only: the off-mode points join mode 1,
    every width 1."""
    from scripts import toy_seeds
    from tdm.toy.evaluate import mode_statistics
    from tdm.toy.mixture import GaussianMixture

    mixture = GaussianMixture.from_options({"means": [[0, 0], [1, 0]], "std": [0.1, 0.2]})
    rng = torch.Generator().manual_seed(0)
    x = torch.cat([0.02 * torch.randn(4000, 2, generator=rng),
                   torch.tensor([1.0, 0.0]) + 0.02 * torch.randn(1000, 2, generator=rng),
                   torch.tensor([0.5, 1.0]).expand(1000, 2)]).double()
    on = torch.arange(6000) < 5000
    versions = toy_seeds.idealised(x, mixture, torch.Generator().manual_seed(1))
    assert torch.equal(versions["as sampled"], x)
    assert torch.equal(versions["bridges removed"][on], x[on])
    assert mode_statistics(versions["bridges removed"], mixture)["off_mode"] == 0.0
    assert torch.equal(versions["true shapes"][~on], x[~on])
    shapes = mode_statistics(versions["true shapes"], mixture)
    assert shapes["off_mode"] == pytest.approx(1 / 6, abs=2e-3)
    assert shapes["width"] == pytest.approx([1.0, 1.0], abs=0.05)
    weights = mode_statistics(versions["weights only"], mixture)
    assert weights["off_mode"] < 2e-3 and weights["weights"] == pytest.approx([2 / 3, 1 / 3], abs=2e-3)
    assert weights["width"] == pytest.approx([1.0, 1.0], abs=0.05)


def test_effective_sample_size_by_hand():
    """scripts/toy_seeds.py: Kish's (Σw)²/(N·Σw²); w = (1, 1, 2): 16 / (3 · 6) = 8/9; equal weights: 1."""
    from scripts import toy_seeds

    assert toy_seeds.effective_sample_size(torch.tensor([1.0, 1.0, 2.0])) == pytest.approx(8 / 9, rel=1e-12)
    assert toy_seeds.effective_sample_size(torch.full((5,), 0.3)) == pytest.approx(1.0, rel=1e-12)
    assert toy_seeds.draw_repeats(3, 3) == [3, 1300, 1301]   # the protocol's noise first
