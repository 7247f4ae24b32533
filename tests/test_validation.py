"""Quality during training (tdm/validation.py, docs/method.md §10): the agreement measure, the
guided teacher and the measures object, by value; what a run logs: tests/test_toy2d.py (the toy)
and below (an image family)."""
import json
import os

import pytest
import torch

from conftest import ROOT
from tdm.validation import ValidationMeasures, guided, mean_absolute_difference, summary_line


def test_mean_absolute_difference_is_zero_for_identical_samples_and_a_hand_value():
    a = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert mean_absolute_difference(a, a.clone()) == 0.0
    assert mean_absolute_difference(a, b) == pytest.approx(0.75, abs=1e-15)   # (1 + 0 + 0 + 2)/4
    with pytest.raises(ValueError):
        mean_absolute_difference(a, b[:1])


def linear_teacher(x_t, t, cond):
    """x̂0 = x + c, ε̂ = 2x − c with c the condition's value (0: a prompt, 1: the empty one)."""
    c = cond["c"].float()[:, None]
    return x_t + c, 2 * x_t - c


def test_guided_teacher_by_hand():
    x, t = torch.randn(3, 2), torch.zeros(3, dtype=torch.long)
    cond, uncond = {"c": torch.zeros(3, dtype=torch.long)}, {"c": torch.ones(1, dtype=torch.long)}
    x0, eps = guided(linear_teacher, uncond, 3.0)(x, t, cond)
    # x0_u + 3 (x0_c − x0_u) = (x + 1) + 3 (x − (x + 1)) = x − 2; ε: (2x − 1) + 3 · 1 = 2x + 2
    torch.testing.assert_close(x0, x - 2)
    torch.testing.assert_close(eps, 2 * x + 2)
    assert guided(linear_teacher, uncond, 1.0) is linear_teacher
    seen = {}

    def embedded(x_t, t, cond):   # a guidance-embedded teacher is called once, cfg in its condition
        seen.update(cond)
        return x_t, x_t

    guided(embedded, uncond, 3.5, "guidance")(x, t, cond)
    assert torch.equal(seen["guidance"], torch.full((3,), 3.5)) and torch.equal(seen["c"], cond["c"])


class CountingTeacher:
    def __init__(self):
        self.rows = 0

    def __call__(self, x_t, t, cond):
        self.rows += x_t.shape[0]
        return linear_teacher(x_t, t, cond)


class HeldOut:
    """Held-out data whose score is the mean of the samples (to check what is scored)."""
    noise = torch.ones(5, 2)
    cond = {"c": torch.zeros(5, dtype=torch.long)}

    def score(self, samples):
        return {"mean": samples.mean().item()}


def test_measures_compare_with_the_teacher_computed_once():
    """The teacher's DDIM samples are computed at the first call only; the agreement is the mean
    absolute difference per K; held-out data is scored for the student and the teacher."""
    from tdm.path import GaussianPath
    from tdm.toy.teacher import ddpm_scheduler
    from tdm.trajectory import StepGrid, rollout

    path = GaussianPath.from_scheduler(ddpm_scheduler())
    teacher = CountingTeacher()
    measures = ValidationMeasures(teacher, path, 5, HeldOut())
    noise, cond = torch.randn(4, 2), {"c": torch.zeros(4, dtype=torch.long)}
    expected_teacher = rollout(linear_teacher, noise, cond, StepGrid.uniform(5, 1000), path).sample
    latents = {2: expected_teacher + 0.5, 4: expected_teacher.clone()}
    first = measures(latents, noise, cond, lambda z, c: torch.full_like(z, 3.0))
    rows_after_first = teacher.rows
    assert rows_after_first == 5 * (4 + 5)          # 5 DDIM steps on the prompts and on the held-out noise
    second = measures(latents, noise, cond, lambda z, c: torch.full_like(z, 3.0))
    assert teacher.rows == rows_after_first and first == second
    assert first["val_teacher_mad_k2"] == pytest.approx(0.5) and first["val_teacher_mad_k4"] == 0.0
    assert first["val_mean"] == 3.0
    held_teacher = rollout(linear_teacher, HeldOut.noise, HeldOut.cond, StepGrid.uniform(5, 1000), path).sample
    assert first["val_teacher_mean"] == pytest.approx(held_teacher.mean().item())
    # no teacher steps: no teacher call, only the held-out score
    none = ValidationMeasures(CountingTeacher(), path, 0, HeldOut())
    assert none(latents, noise, cond, lambda z, c: torch.zeros_like(z)) == {"val_mean": 0.0}


def test_summary_line_puts_the_teachers_number_beside_the_students():
    line = summary_line({"val_teacher_mad_k4": 0.5, "val_swd": 0.05123, "val_teacher_swd": 0.04})
    assert line == "teacher_mad_k4 0.5, swd 0.05123 (teacher 0.04)"


@pytest.mark.slow
def test_image_run_logs_the_agreement_with_its_teacher_by_value(tiny_pixart, backbone, tmp_path):
    """A PixArt run with validation every 2 steps logs val_teacher_mad_k4: the mean absolute
    difference between the final student's 4-step latents and the teacher's DDIM (3 steps, CFG
    3.0) from the validation noise and prompts, recomputed here from the exported LoRA."""
    import train_tdm
    from infer_tdm import student_pipeline
    from tdm.config import parse_args
    from tdm.sampling import resolve_weights
    from tdm.trajectory import StepGrid, rollout

    out = tmp_path / "run"
    args = parse_args(["--pretrained_model_name_or_path", tiny_pixart, "--output_dir", str(out),
                       "--resolution", "32", "--max_train_steps", "2", "--seed", "0", "--lora_rank", "4",
                       "--prompts", os.path.join(ROOT, "assets", "prompts.txt"), "--cfg", "3.0",
                       "--validation_steps", "2", "--validation_teacher_steps", "3",
                       "--checkpointing_steps", "0", "--report_to", "none", "--learning_rate", "1e-3",
                       "--mixed_precision", "no"])
    assert train_tdm.main(args) == 0
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "val_teacher_mad_k4" in line]
    assert [line["step"] for line in logged] == [2]

    cond = backbone.encode_prompts(args.validation_prompts)
    noise = torch.randn((len(args.validation_prompts), *backbone.latent_shape(32)),
                        generator=torch.Generator().manual_seed(args.validation_seed))
    pipe, _ = student_pipeline(tiny_pixart, resolve_weights(str(out)), 1.0, torch.float32, "cpu")
    student = rollout(backbone.denoiser(pipe.transformer.eval()), noise, cond, StepGrid(args.timesteps),
                      backbone.path).sample
    plain = backbone.denoiser(backbone.load_denoiser().eval())
    teacher = rollout(guided(plain, backbone.encode_prompts([""]), 3.0), noise, cond,
                      StepGrid.uniform(3, 1000), backbone.path).sample
    assert logged[0]["val_teacher_mad_k4"] == pytest.approx((student - teacher).abs().mean().item(), rel=1e-4)
