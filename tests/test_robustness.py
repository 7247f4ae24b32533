"""Training that survives a cluster: bad input refused up front, atomic checkpoints, preemption,
non-finite values, several processes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, accelerate_launch, run_script
from tdm.checkpoint import latest_checkpoint

TRAIN = os.path.join(ROOT, "train_tdm.py")
INFER = os.path.join(ROOT, "infer_tdm.py")
FAULTS = os.path.join(ROOT, "tests", "fault_injection.py")   # train_tdm.py with NaN losses, slow saves


def tiny_run(model, out, steps, *extra):
    return ["--pretrained_model_name_or_path", model, "--output_dir", str(out), "--resolution", "32",
            "--max_train_steps", str(steps), "--seed", "0", "--validation_steps", "0",
            "--report_to", "none", "--lora_rank", "4", *extra]


def log_lines(out):
    path = out / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- bad input ---------------------------------------------------------------------------------
def bad_inputs(tmp, model):
    blank = tmp / "blank.txt"
    blank.write_text("\n  \n")
    table = tmp / "table.csv"
    table.write_text("id,body\n1,a red car\n")
    config = tmp / "typo.yaml"
    config.write_text("learnig_rate: 1.0e-5\n")
    not_a_pipeline = tmp / "empty_model"
    not_a_pipeline.mkdir(exist_ok=True)
    a_file = tmp / "a_file"
    a_file.write_text("x")
    fake_bnb = tmp / "no_bnb" / "bitsandbytes"
    fake_bnb.mkdir(parents=True, exist_ok=True)
    (fake_bnb / "__init__.py").write_text("raise ImportError('no GPU build of bitsandbytes')\n")
    base = ["--pretrained_model_name_or_path", model, "--resolution", "32", "--lora_rank", "4"]
    return {
        "prompts missing": (base + ["--prompts", str(tmp / "nope.txt")], "no such file"),
        "prompts blank": (base + ["--prompts", str(blank)], "no non-blank prompt"),
        "caption column absent": (base + ["--prompts", str(table), "--caption_column", "caption"],
                                  "its columns are: id, body"),
        "unknown config key": (base + ["--config", str(config)], "did you mean 'learning_rate'"),
        "cfg not positive": (base + ["--cfg", "-1"], "--cfg must be > 0"),
        "timesteps and num_steps disagree": (base + ["--timesteps", "999,500", "--num_steps", "4"],
                                             "--num_steps is 4"),
        "total_steps below num_steps": (base + ["--total_steps", "2"], "--total_steps (2)"),
        "timesteps not decreasing": (base + ["--timesteps", "500,999"], "strictly decreasing"),
        "timesteps out of range": (base + ["--timesteps", "1500,700"], "outside the scheduler's range"),
        "unify with an explicit grid": (base + ["--unify_steps", "1,2,4", "--timesteps", "999,500"],
                                        "drop --timesteps"),
        "resolution not divisible": (["--pretrained_model_name_or_path", model, "--resolution", "30"],
                                     "must be a multiple of 4"),
        "model path missing": (["--pretrained_model_name_or_path", str(tmp / "none")], "no such folder"),
        "not a diffusers folder": (["--pretrained_model_name_or_path", str(not_a_pipeline)],
                                   "not a diffusers pipeline folder"),
        "resume path missing": (base + ["--resume_from_checkpoint", str(tmp / "checkpoint-9")],
                                "no such folder"),
        "8-bit Adam cannot run": (base + ["--use_8bit_adam"], "bitsandbytes cannot run here"),
        "output_dir not writable": (base + ["--output_dir", str(a_file / "out")], "is not writable"),
    }


CASES = ["prompts missing", "prompts blank", "caption column absent", "unknown config key",
         "cfg not positive", "timesteps and num_steps disagree", "total_steps below num_steps",
         "timesteps not decreasing", "timesteps out of range", "unify with an explicit grid",
         "resolution not divisible",
         "model path missing", "not a diffusers folder", "resume path missing",
         "8-bit Adam cannot run", "output_dir not writable"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_in_one_line(case, tiny_pixart, tmp_path):
    argv, message = bad_inputs(tmp_path, tiny_pixart)[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    if "--output_dir" not in argv:
        argv = argv + ["--output_dir", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path / "no_bnb")] * (case == "8-bit Adam cannot run") + [ROOT]))
    proc = subprocess.run([sys.executable, TRAIN, *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_lora_file_of_another_model_is_refused(tiny_pixart, tmp_path):
    bad = tmp_path / "other.safetensors"
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 99),
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(16, 4)}, str(bad))
    proc = run_script([sys.executable, INFER, "--pretrained_model_name_or_path", tiny_pixart,
                       "--weights", str(bad), "--prompt", "a cat", "--output", str(tmp_path / "x.png")])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and "does not match" in lines[-1]
    assert not (tmp_path / "x.png").exists()


# -- checkpoints, preemption, non-finite values ------------------------------------------------
def start(argv, env_extra=None, script=(TRAIN,)):
    env = dict(os.environ, PYTHONPATH=ROOT, **(env_extra or {}))
    return subprocess.Popen([sys.executable, *script, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_save_leaves_the_previous_checkpoint_intact(tiny_pixart, tmp_path):
    out = tmp_path / "run"
    first = run_script([sys.executable, TRAIN, *tiny_run(tiny_pixart, out, 2, "--checkpointing_steps", "2")])
    assert first.returncode == 0, first.stderr[-3000:]
    before = load_file(str(out / "checkpoint-2" / "lora.safetensors"))
    proc = start(tiny_run(tiny_pixart, out, 6, "--checkpointing_steps", "1", "--checkpoints_total_limit",
                          "1", "--resume_from_checkpoint", "latest"), {"TDM_TEST_SAVE_DELAY": "60"},
                 script=(FAULTS, ""))   # every save held 60 s before its manifest
    wait_for(lambda: (out / "checkpoint-3.incomplete" / "lora.safetensors").exists())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")   # rotation spared it
    after = load_file(str(out / "checkpoint-2" / "lora.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    resumed = run_script([sys.executable, TRAIN, *tiny_run(tiny_pixart, out, 3, "--checkpointing_steps",
                                                           "1", "--resume_from_checkpoint", "latest")])
    assert resumed.returncode == 0 and "at step 2" in resumed.stderr, resumed.stderr[-3000:]
    assert not (out / "checkpoint-3.incomplete").exists() and (out / "checkpoint-3").is_dir()


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tiny_pixart, tmp_path):
    out = tmp_path / "run"
    proc = start(tiny_run(tiny_pixart, out, 100000, "--checkpointing_steps", "0"))
    wait_for(lambda: len(log_lines(out)) >= 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    path = latest_checkpoint(str(out))
    step = int(path.rsplit("-", 1)[1])
    assert step >= 2 and f"SIGTERM received: saved {path}" in stderr
    resumed = run_script([sys.executable, TRAIN, *tiny_run(tiny_pixart, out, step + 1,
                                                           "--resume_from_checkpoint", "latest")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert log_lines(out)[-2]["step"] == step + 1


@pytest.mark.slow
def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(tiny_pixart, tmp_path):
    out = tmp_path / "skip"
    proc = run_script([sys.executable, FAULTS, "2", *tiny_run(tiny_pixart, out, 4, "--checkpointing_steps", "4")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [line for line in log_lines(out) if "loss_fake_score" in line]
    assert [line["nonfinite_skipped"] for line in logs] == [0, 2, 2, 2]
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "checkpoint-4" / "lora.safetensors")).values())
    assert all(line["loss_fake_score"] == line["loss_fake_score"] for line in logs[2:])   # finite again

    out = tmp_path / "stop"
    proc = run_script([sys.executable, FAULTS, "1,2,3", *tiny_run(tiny_pixart, out, 10, "--checkpointing_steps",
                                                                  "0", "--max_nonfinite", "3")])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "3 consecutive iterations with non-finite" in lines[-1]
    state = load_file(str(out / "checkpoint-3" / "lora.safetensors"))
    assert all(torch.count_nonzero(v) == 0 for k, v in state.items() if "lora_B" in k)   # never updated


# -- several processes -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_processes_agree_and_only_rank0_writes(tiny_pixart, tmp_path, mode):
    out = tmp_path / "ddp"
    proc = accelerate_launch(tiny_run(tiny_pixart, out, 3, "--train_mode", mode, "--log_prompts",
                                      "--checkpointing_steps", "3", "--validation_steps", "3",
                                      "--mixed_precision", "no"), processes=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = log_lines(out)
    checksums = logs[-1]["student_checksum_per_rank"]
    assert len(checksums) == 2 and checksums[0] == pytest.approx(checksums[1], rel=1e-6, abs=1e-6)
    steps = [line for line in logs if "loss_student" in line]   # not the validation's line
    assert len(steps) == 3
    for line in steps:
        rank0, rank1 = line["prompts_per_rank"]
        assert not set(rank0) & set(rank1)          # the ranks see different prompts
    assert sorted(os.listdir(out / "samples")) == ["step-000003.png"]
    assert os.listdir(out).count("checkpoint-3") == 1


# -- damaged and untrusted checkpoints ----------------------------------------------------------
@pytest.fixture(scope="module")
def two_checkpoints(tiny_pixart, tmp_path_factory):
    """A run with checkpoint-1 and checkpoint-2 (EMA on, so every kind of state file is there)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    proc = run_script([sys.executable, TRAIN, *tiny_run(tiny_pixart, out, 2, "--checkpointing_steps", "1",
                                                        "--use_ema")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def damaged_copy(source, tmp_path, damage):
    """A copy of the run folder with `damage(checkpoint-2 folder)` applied."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(source, out)
    damage(out / "checkpoint-2")
    return out


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF                    # same size, different contents
    path.write_bytes(bytes(data))


DAMAGES = {   # name -> (damage to checkpoint-2, what the message names)
    "truncated weights": (lambda c: truncate(c / "lora.safetensors"), "lora.safetensors: "),
    "optimiser deleted": (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin: missing"),
    "noise state corrupted": (lambda c: flip_a_byte(c / "training_rng_0.safetensors"),
                              "training_rng_0.safetensors: contents differ"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_is_named_and_latest_skips_it(two_checkpoints, tmp_path, damage):
    """In process (no training run): the verification both resume paths go through."""
    from tdm.checkpoint import DamagedCheckpoint, checkpoint_to_resume

    apply, message = DAMAGES[damage]
    out = damaged_copy(two_checkpoints, tmp_path, apply)
    with pytest.raises(DamagedCheckpoint, match=message.replace(".", r"\.")):
        checkpoint_to_resume(str(out), str(out / "checkpoint-2"))
    assert checkpoint_to_resume(str(out), "latest") == str(out / "checkpoint-1")
    assert checkpoint_to_resume(str(two_checkpoints), "latest") == str(two_checkpoints / "checkpoint-2")


@pytest.mark.slow
def test_resume_refuses_a_damaged_checkpoint_and_latest_falls_back(two_checkpoints, tiny_pixart, tmp_path):
    out = damaged_copy(two_checkpoints, tmp_path, DAMAGES["truncated weights"][0])
    explicit = run_script([sys.executable, TRAIN, *tiny_run(tiny_pixart, out, 3, "--use_ema",
                                                            "--resume_from_checkpoint", str(out / "checkpoint-2"))])
    last = explicit.stderr.strip().splitlines()[-1]
    assert explicit.returncode == 2 and last.startswith("error: --resume_from_checkpoint: damaged checkpoint")
    assert "checkpoint-2/lora.safetensors" in last and "truncated" in last
    latest = run_script([sys.executable, TRAIN, *tiny_run(tiny_pixart, out, 3, "--use_ema",
                                                          "--resume_from_checkpoint", "latest")])
    assert latest.returncode == 0, latest.stderr[-3000:]
    assert "skipping damaged checkpoint" in latest.stderr and "at step 1" in latest.stderr
    assert [line["step"] for line in log_lines(out) if "loss_student" in line][-2:] == [2, 3]


@pytest.mark.slow
def test_resume_never_runs_code_from_a_pickle(two_checkpoints, tiny_pixart, tmp_path):
    """A checkpoint file replaced by a pickle that would run a command (and no manifest to catch
    it): accelerate's weights-only loader refuses it; nothing of ours unpickles at all."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def plant(checkpoint):
        (checkpoint / "manifest.json").unlink()
        torch.save({"state": Payload()}, str(checkpoint / "optimizer.bin"))

    out = damaged_copy(two_checkpoints, tmp_path, plant)
    assert not [name for name in os.listdir(two_checkpoints / "checkpoint-2") if name.endswith(".pkl")
                and name.startswith("custom")]
    proc = run_script([sys.executable, TRAIN, *tiny_run(tiny_pixart, out, 3, "--use_ema",
                                                        "--resume_from_checkpoint", str(out / "checkpoint-2"))])
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "cannot load" in last and "UnpicklingError" in last, proc.stderr[-2000:]
    assert not marker.exists()


def test_user_weights_are_read_as_safetensors_only(tmp_path):
    """infer_tdm.py --weights: a pickle file, or a model folder with only a .bin, is refused
    unopened (its payload would run at load time); safetensors folders resolve."""
    from tdm.sampling import resolve_weights

    for name in ("student.bin", "student.pt", "student.ckpt"):
        (tmp_path / name).write_bytes(b"not opened")
        with pytest.raises(ValueError, match="is a pickle, which can run code"):
            resolve_weights(str(tmp_path / name))
    full = tmp_path / "out" / "transformer"
    full.mkdir(parents=True)
    (full / "config.json").write_text("{}")
    (full / "diffusion_pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ValueError, match="no .safetensors weights"):
        resolve_weights(str(tmp_path / "out"))
    (full / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert resolve_weights(str(tmp_path / "out")) == ("full", str(full))


def test_infer_refuses_a_pickle_in_one_line(tiny_pixart, tmp_path):
    bad = tmp_path / "student.ckpt"
    bad.write_bytes(b"not opened")
    proc = run_script([sys.executable, INFER, "--pretrained_model_name_or_path", tiny_pixart,
                       "--weights", str(bad), "--prompt", "a cat", "--output", str(tmp_path / "x.png")])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: --weights") and "pickle" in lines[-1]
    assert not (tmp_path / "x.png").exists()
