"""Nothing lost, no traceback, in 19 fault and bad-input cases: each ends in one line on stderr and a
non-zero exit (or its documented recovery), with no byte of an existing run folder changed; and the
checks behind them (YAML conversion, structural checkpoint verification, the run-folder plan).

The cases that touch a run folder run train_tdm.py as a user would (a fresh process, its own
logging); the input checks run the scripts' entry points in this process (the same code path,
without an interpreter start each).
"""
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Callable, Tuple

import pytest
from safetensors.torch import load_file, save_file

from conftest import ROOT, run_script, tiny_flags

TRAIN = os.path.join(ROOT, "train_tdm.py")


def flags(model, out, steps, *extra):
    return tiny_flags(model, out, steps, "--validation_steps", "0", "--report_to", "none", *extra)


def folder_state(path) -> dict:
    """Every file (its bytes' SHA-256) and folder under `path`; None where `path` is absent."""
    if not os.path.exists(path):
        return None
    state = {}
    for root, folders, files in os.walk(path):
        for name in folders:
            state[os.path.relpath(os.path.join(root, name), path)] = "folder"
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                state[os.path.relpath(os.path.join(root, name), path)] = hashlib.sha256(f.read()).hexdigest()
    return state


@pytest.fixture(scope="module")
def finished_run(tiny_pixart, tmp_path_factory):
    """A finished run: checkpoint-1, checkpoint-2 (with manifests), the exported LoRA, config.yaml."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run_script([sys.executable, TRAIN, *flags(tiny_pixart, out, 2, "--checkpointing_steps", "1")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def copy_run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def other_width_model(model, folder):
    """The tiny PixArt with a wider transformer (24 features instead of 16)."""
    from diffusers import PixArtTransformer2DModel

    shutil.copytree(model, folder)
    config = dict(PixArtTransformer2DModel.load_config(os.path.join(model, "transformer")))
    wider = PixArtTransformer2DModel.from_config({**config, "attention_head_dim": 12})
    shutil.rmtree(folder / "transformer")
    wider.save_pretrained(str(folder / "transformer"))
    return str(folder)


def uneven_lora(run, path):
    """The run's LoRA with one B tensor of rank 3 beside its A of rank 4."""
    state = load_file(str(run / "pytorch_lora_weights.safetensors"))
    key = sorted(k for k in state if "lora_B" in k)[0]
    state[key] = state[key][:, :3].contiguous()
    save_file(state, str(path))
    return str(path)


# -- the cases ---------------------------------------------------------------------------------
@dataclass
class Case:
    script: str                     # train (a fresh process), train_cli / infer / eval (in process)
    make: Callable                  # (tmp_path, model, run) -> (argv, folder that must not change)
    says: Tuple[str, ...]           # what the one line contains
    exit: int = 2
    keeps: Tuple[str, ...] = ("",)  # what must not change, inside that folder (a recovery writes)


def train_case(make_argv, *says):
    """A bad input to train_tdm.py with an --output_dir that already holds a file."""
    def make(tmp, model, run):
        out = tmp / "out"
        out.mkdir()
        (out / "keep.txt").write_text("precious")
        return [*flags(model, out, 2), *make_argv(tmp)], out
    return Case("train_cli", make, says)


def prompts_file(name, data):
    def make_argv(tmp):
        path = tmp / name
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)
        return ["--prompts", str(path)]
    return make_argv


def yaml_config(tmp):
    (tmp / "c.yaml").write_text("resolution: 16.0\n")
    return ["--config", str(tmp / "c.yaml")]


def in_run(argv):
    """train_tdm.py flags on a copy of the finished run."""
    def make(tmp, model, run):
        out = copy_run(run, tmp)
        return [*flags(model, out, 3), *argv(tmp, model, out)], out
    return make


def damage_every_scheduler(tmp, model, out):
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        flip_last_byte(out / checkpoint / "scheduler.bin")
    return ["--resume_from_checkpoint", "latest"]


def manifestless_newest_truncated(tmp, model, out):
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        (out / checkpoint / "manifest.json").unlink()
    truncate(out / "checkpoint-2" / "lora.safetensors")
    return ["--resume_from_checkpoint", "latest", "--max_train_steps", "1"]   # resume, no step


def renamed_copy(tmp, model, run):
    copy = tmp / "copied-under-another-name"
    shutil.copytree(run / "checkpoint-2", copy)
    return [*flags(model, tmp / "resumed", 2, "--resume_from_checkpoint", str(copy))], copy


def infer_case(extra, says, output=lambda tmp, run: tmp / "images" / "x.png", weights=None):
    """infer_tdm.py on a copy of the finished run, into a folder that holds a file: neither changes."""
    def make(tmp, model, run):
        run = copy_run(run, tmp)
        (tmp / "images").mkdir()
        (tmp / "images" / "keep.txt").write_text("precious")
        return (["--weights", str(run) if weights is None else weights(tmp, run), "--prompt", "a cat",
                 "--pretrained_model_name_or_path", model, "--output", str(output(tmp, run)), *extra], tmp)
    return Case("infer", make, says)


def unreadable_reference(tmp, model, run):
    """eval_tdm.py on a copy of the finished run (it writes its eval/ and model card there)."""
    run = copy_run(run, tmp)
    references = tmp / "references"
    references.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(references / f"{i}.png")
    (references / "2.png").write_bytes(b"not an image")
    return (["--weights", str(run), "--prompt", "a cat", "--prompt", "a dog", "--metrics", "fid",
             "--reference_dir", str(references), "--teacher_steps", "0"], tmp)


CASES = {
    # runs destroyed or overwritten
    "1 refused resume (another width) keeps config.yaml": Case("train", in_run(
        lambda tmp, model, out: ["--resume_from_checkpoint", "latest", "--pretrained_model_name_or_path",
                                 other_width_model(model, tmp / "wider")]),
        ("--resume_from_checkpoint latest: cannot load", "does not match the model")),
    "2 latest with every checkpoint damaged": Case("train", in_run(damage_every_scheduler),
        ("no whole checkpoint", "checkpoint-2/scheduler.bin: contents differ",
         "checkpoint-1/scheduler.bin", "--overwrite_output_dir")),
    "3 manifest-less checkpoints: latest falls back": Case("train", in_run(manifestless_newest_truncated),
        ("skipping damaged checkpoint", "checkpoint-2/lora.safetensors: ", "(truncated?)",
         "checkpoint-1 at step 1"), exit=0, keeps=("checkpoint-1", "checkpoint-2")),
    "4 new run into a finished run's folder": Case("train", in_run(lambda tmp, model, out: []),
        ("holds another run (checkpoint-1, checkpoint-2, pytorch_lora_weights.safetensors)",
         "--resume_from_checkpoint latest", "another --output_dir", "--overwrite_output_dir")),
    # tracebacks instead of one line
    "5 resume from a checkpoint copied under another name": Case("train", renamed_copy,
        ("copied-under-another-name at step 2",), exit=0),
    "6a prompts not UTF-8": train_case(prompts_file("p.txt", b"a cat\n\xff\xfe a dog\n"),
                                       "not UTF-8 text (byte 0xff at offset 6)"),
    "6b prompts a corrupt parquet": train_case(prompts_file("p.parquet", b"PAR1 not a parquet file"),
                                               "cannot read it (ArrowInvalid"),
    "6c prompts an empty folder": train_case(prompts_file("empty", None), "empty folder"),
    "7 YAML float for an int flag": train_case(yaml_config, "key 'resolution' must be an integer, got 16.0"),
    "8a --train_batch_size 0": train_case(lambda tmp: ["--train_batch_size", "0"],
                                          "--train_batch_size must be >= 1, got 0"),
    "8b --lora_rank 0": train_case(lambda tmp: ["--lora_rank", "0"], "--lora_rank must be >= 1, got 0"),
    "8c unknown --lr_scheduler": train_case(lambda tmp: ["--lr_scheduler", "cosin"],
                                            "--lr_scheduler: unknown 'cosin'; did you mean 'cosine'?"),
    "8d unknown --report_to": train_case(lambda tmp: ["--report_to", "tensorbord"],
                                         "--report_to: unknown 'tensorbord'; did you mean 'tensorboard'?"),
    "9a infer --num_inference_steps 0": infer_case(["--num_inference_steps", "0"],
                                                   ("--num_inference_steps must be >= 1, got 0",)),
    "9b infer --height 17": infer_case(["--height", "17"], ("--height 17 must be a multiple of 4",)),
    "9c infer --output under a regular file": infer_case(
        [], ("is not writable", "config.yaml is a file"), output=lambda tmp, run: run / "config.yaml" / "x.png"),
    "9d infer --output .xyz": infer_case([], ("unknown file type '.xyz'",),
                                         output=lambda tmp, run: tmp / "images" / "x.xyz"),
    "9e infer LoRA with B of another rank than A": infer_case(
        [], ("is not a consistent LoRA", "lora_A has rank 4, lora_B rank 3"),
        weights=lambda tmp, run: uneven_lora(run, tmp / "uneven.safetensors")),
    "10 eval with an unreadable reference image": Case("eval", unreadable_reference,
                                                       ("--reference_dir", "cannot read 2.png")),
}


def run_case(case, argv, capfd):
    """(exit status, stderr lines)."""
    if case.script == "train":
        proc = run_script([sys.executable, TRAIN, *argv])
        return proc.returncode, proc.stderr
    import eval_tdm
    import infer_tdm
    import train_tdm

    entry = {"train_cli": train_tdm.cli, "infer": infer_tdm.main, "eval": eval_tdm.main}[case.script]
    capfd.readouterr()
    code = entry(argv)
    return code, capfd.readouterr().err


SLOW = {"1", "3", "5"}   # load the model (and resume)


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] * (name.split()[0] in SLOW))
                                  for name in CASES])
def test_each_case_ends_in_one_line_and_changes_nothing(name, tiny_pixart, finished_run, tmp_path, capfd):
    case = CASES[name]
    argv, guarded = case.make(tmp_path, tiny_pixart, finished_run)
    before = [folder_state(guarded / keep) for keep in case.keeps]
    code, stderr = run_case(case, argv, capfd)
    lines = stderr.strip().splitlines()
    assert code == case.exit, stderr[-3000:]
    if case.exit == 0:   # a documented recovery: it says what it did
        assert all(any(text in line for line in lines) for text in case.says), stderr[-3000:]
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert all(text in lines[0] for text in case.says), lines[0]
    assert [folder_state(guarded / keep) for keep in case.keeps] == before


# -- --overwrite_output_dir --------------------------------------------------------------------
@pytest.mark.slow
def test_overwrite_output_dir_replaces_the_other_run(tiny_pixart, finished_run, tmp_path):
    """The old run's checkpoints and export go (a later `latest` cannot pick them); the prompt
    cache and files that are not the run's stay."""
    out = copy_run(finished_run, tmp_path)
    (out / "text_embeddings").mkdir()
    (out / "notes.txt").write_text("mine")
    proc = run_script([sys.executable, TRAIN, *flags(tiny_pixart, out, 1, "--checkpointing_steps", "1",
                                                     "--overwrite_output_dir")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deleted the previous run's checkpoint-1, checkpoint-2" in proc.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / "text_embeddings").is_dir() and (out / "notes.txt").read_text() == "mine"
    assert [line for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss_student"' in line]


# -- the checks behind the cases, in process -----------------------------------------------------
@pytest.mark.parametrize("yaml_text, message", [
    ("resolution: 16.0\n", "key 'resolution' must be an integer, got 16.0"),
    ("cfg: true\n", "key 'cfg' must be a number, got True"),
    ("train_batch_size: 0\n", "key 'train_batch_size' must be >= 1, got 0"),
    ("max_train_steps: null\n", "key 'max_train_steps' must have a value, got null"),
    ("use_separate: 'yes'\n", "key 'use_separate' must be true or false, got 'yes'"),
    ("train_mode: lorra\n", "key 'train_mode': unknown 'lorra'; did you mean 'lora'?"),
    ("timesteps: [999, 500.5]\n", "key 'timesteps' must be whole numbers, got 500.5"),
    ("output_dir: [a, b]\n", "key 'output_dir' must be a string"),
    ("learnig_rate: 1.0\n", "unknown key 'learnig_rate'; did you mean 'learning_rate'?"),
])
def test_yaml_values_get_the_command_lines_conversion_and_range(tmp_path, yaml_text, message):
    from tdm.config import UsageError, parse_args

    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    with pytest.raises(UsageError) as error:
        parse_args(["--config", str(config)])
    assert message in str(error.value) and str(error.value).startswith(f"--config {config}")


def test_yaml_values_convert_as_the_command_line_does(tmp_path):
    from tdm.config import parse_args

    config = tmp_path / "c.yaml"
    config.write_text("resolution: '64'\nlearning_rate: 1\nguidance_embedding: false\nrevision: 2\n"
                      "validation_prompts: a cat\nunify_steps: '1,2,4'\nlora_alpha: null\n")
    args = parse_args(["--config", str(config)])
    assert args.resolution == 64 and args.learning_rate == 1.0 and isinstance(args.learning_rate, float)
    assert args.guidance_embedding is False and args.revision == "2"
    assert args.validation_prompts == ["a cat"] and args.unify_steps == [1, 2, 4]


def test_a_runs_resolved_config_reads_back(finished_run):
    """config.yaml holds resolved values (guidance_embedding null, lora_alpha, the grid)."""
    from tdm.config import parse_args

    args = parse_args(["--config", str(finished_run / "config.yaml")])
    assert args.guidance_embedding is None and args.timesteps == [899, 674, 449, 224]


@pytest.mark.parametrize("argv, message", [
    (["--resolution", "16.0"], "--resolution must be an integer, got '16.0'"),
    (["--cfg", "nan"], "--cfg must be > 0 (1 disables guidance), got nan"),
    (["--adam_beta2", "1"], "--adam_beta2 must be >= 0 and < 1, got 1.0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--mixed_precision", "fp8"], "--mixed_precision: unknown 'fp8' (choose from no, fp16, bf16)"),
    (["--learnig_rate", "1"], "unrecognized arguments: --learnig_rate 1; did you mean '--learning_rate'?"),
    (["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "drop one of the two flags"),
])
def test_flags_are_refused_in_one_line_with_the_fix(argv, message):
    from tdm.config import UsageError, parse_args

    with pytest.raises(UsageError) as error:
        parse_args(argv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_values_set_in_code_get_the_same_ranges():
    from tdm.config import UsageError, parse_args

    with pytest.raises(UsageError, match="--train_batch_size must be >= 1, got 0"):
        parse_args([]).replace(train_batch_size=0)
    with pytest.raises(UsageError, match="--lr_scheduler: unknown 'cosin'"):
        parse_args([]).replace(lr_scheduler="cosin")


def checkpoint_copy(finished_run, tmp_path):
    """The finished run's checkpoints without their manifests (as an older version wrote them)."""
    out = copy_run(finished_run, tmp_path)
    for manifest in out.glob("checkpoint-*/manifest.json"):
        manifest.unlink()
    return out


def expected_files(**overrides):
    from tdm.config import parse_args
    from tdm.survival import checkpoint_files

    return checkpoint_files(parse_args([]).replace(**overrides), 1, sharded=False)


STRUCTURAL_DAMAGE = {   # damage to a manifest-less checkpoint -> what the refusal names
    "truncated safetensors": (lambda c: truncate(c / "lora.safetensors"), r"lora.safetensors: .* \(truncated\?\)"),
    "garbage header": (lambda c: (c / "training_rng_0.safetensors").write_bytes(b"\xff" * 64),
                       "training_rng_0.safetensors: not a whole safetensors file"),
    "expected file missing": (lambda c: (c / "optimizer_1.bin").unlink(), "optimizer_1.bin: missing"),
    "torch file truncated": (lambda c: truncate(c / "scheduler.bin"), "scheduler.bin: cannot load it weights-only"),
}


@pytest.mark.parametrize("damage", sorted(STRUCTURAL_DAMAGE))
def test_a_checkpoint_without_manifest_is_verified_by_its_structure(finished_run, tmp_path, damage):
    from tdm.checkpoint import DamagedCheckpoint, checkpoint_to_resume

    out = checkpoint_copy(finished_run, tmp_path)
    expected = expected_files()
    assert checkpoint_to_resume(str(out), "latest", expected) == str(out / "checkpoint-2")   # whole
    apply, message = STRUCTURAL_DAMAGE[damage]
    apply(out / "checkpoint-2")
    with pytest.raises(DamagedCheckpoint, match=message):
        checkpoint_to_resume(str(out), str(out / "checkpoint-2"), expected)
    assert checkpoint_to_resume(str(out), "latest", expected) == str(out / "checkpoint-1")


def test_the_expected_files_follow_the_run():
    assert "ema.safetensors" in expected_files(use_ema=True) and "ema.safetensors" not in expected_files()
    assert {"student.safetensors", "fake_score.safetensors"} <= set(expected_files(train_mode="full"))


def test_a_checkpoints_step_comes_from_its_manifest(finished_run, tmp_path):
    from tdm.checkpoint import checkpoint_step

    renamed = tmp_path / "backup"
    shutil.copytree(finished_run / "checkpoint-2", renamed)
    assert checkpoint_step(str(renamed)) == 2
    (renamed / "manifest.json").unlink()   # an older version's checkpoint, renamed: unknowable
    with pytest.raises(ValueError, match="rename it checkpoint-<its step>"):
        checkpoint_step(str(renamed))
    assert checkpoint_step(str(checkpoint_copy(finished_run, tmp_path) / "checkpoint-2")) == 2


def test_the_start_is_planned_from_what_the_folder_holds(finished_run, tmp_path):
    from tdm.config import UsageError
    from tdm.run_folder import plan_start

    out = str(copy_run(finished_run, tmp_path))
    assert plan_start(out, "latest", False) == (os.path.join(out, "checkpoint-2"), 2)
    assert plan_start(str(tmp_path / "new"), "latest", False) == (None, 0)   # nothing to resume yet
    assert plan_start(out, None, True) == (None, 0)                          # --overwrite_output_dir
    with pytest.raises(UsageError, match="holds another run"):
        plan_start(out, None, False)
    with pytest.raises(UsageError, match="would delete"):
        plan_start(out, os.path.join(out, "checkpoint-1"), True)
    elsewhere = tmp_path / "elsewhere" / "checkpoint-1"
    shutil.copytree(finished_run / "checkpoint-1", elsewhere)
    with pytest.raises(UsageError, match="is not one of its checkpoints"):   # would mix two runs
        plan_start(out, str(elsewhere), False)
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        shutil.rmtree(os.path.join(out, checkpoint))
    with pytest.raises(UsageError, match="holds no checkpoint, only another run's export"):
        plan_start(out, "latest", False)


def test_clearing_the_previous_run_keeps_what_is_not_its(finished_run, tmp_path):
    from tdm.run_folder import clear_previous_run

    out = copy_run(finished_run, tmp_path)
    (out / "text_embeddings").mkdir()
    (out / "notes.txt").write_text("mine")
    removed = clear_previous_run(str(out), "logs")
    assert {os.path.basename(p) for p in removed} >= {"checkpoint-1", "checkpoint-2", "config.yaml",
                                                      "pytorch_lora_weights.safetensors", "README.md"}
    assert sorted(os.listdir(out)) == ["notes.txt", "text_embeddings"]


def test_a_lora_whose_b_has_another_rank_is_refused(finished_run, backbone, tmp_path):
    from tdm.lora import check_lora_file

    check_lora_file(str(finished_run / "pytorch_lora_weights.safetensors"), backbone.denoiser_skeleton(),
                    backbone.lora_prefix)
    with pytest.raises(ValueError, match="layers A and B have different ranks"):
        check_lora_file(uneven_lora(finished_run, tmp_path / "u.safetensors"), backbone.denoiser_skeleton(),
                        backbone.lora_prefix)
