"""Flags, YAML configs and prompt sources."""
import argparse
import json
import os
import sys

import pytest

from conftest import ROOT, run_script
from tdm.config import UsageError, parse_args, step_timesteps
from tdm.data import load_prompts


def test_upstream_flags_parse_with_their_meaning():
    args = parse_args(["--train_batch_size=3", "--gradient_accumulation_steps=1", "--gradient_checkpointing",
                       "--max_train_steps=10001", "--learning_rate=2e-05", "--max_grad_norm=1",
                       "--enable_xformers_memory_efficient_attention", "--use_8bit_adam", "--cfg", "4.5",
                       "--total_steps", "900", "--lr_scheduler", "cosine_with_restarts",
                       "--lr_warmup_steps", "50", "--use_huber", "--use_separate"])
    assert args.train_batch_size == 3 and args.max_train_steps == 10001 and args.cfg == 4.5
    assert args.loss == "huber" and args.use_separate and not args.use_randmid
    assert step_timesteps(args) == [899, 674, 449, 224]
    assert args.train_mode == "lora" and args.lora_alpha == args.lora_rank


def test_explicit_timesteps_override_total_steps():
    args = parse_args(["--timesteps", "999,856,665,399", "--total_steps", "900"])
    assert step_timesteps(args) == [999, 856, 665, 399] and args.num_steps == 4
    with pytest.raises(UsageError, match="strictly decreasing"):
        parse_args(["--timesteps", "399,665"])
    with pytest.raises(UsageError, match="--num_steps is 3"):
        parse_args(["--timesteps", "999,856,665,399", "--num_steps", "3"])
    with pytest.raises(UsageError, match="--cfg must be > 0"):
        parse_args(["--cfg", "0"])


def test_extra_fake_score_updates_refuse_gradient_accumulation():
    assert parse_args(["--fake_score_updates", "2"]).fake_score_updates == 2
    with pytest.raises(UsageError, match="cannot accumulate"):
        parse_args(["--fake_score_updates", "2", "--gradient_accumulation_steps", "2"])
    with pytest.raises(UsageError, match="--fake_score_updates must be >= 1"):
        parse_args(["--fake_score_updates", "0"])


def test_the_run_config_is_resolved_once_and_read_only():
    args = parse_args(["--unify_steps", "4,1,2", "--total_steps", "900"])
    assert args.unify_steps == [1, 2, 4] and args.num_steps == 4
    assert args.timesteps == [899, 674, 449, 224] and len(args.validation_prompts) == 4
    with pytest.raises(AttributeError, match="read-only"):
        args.num_steps = 2
    variant = args.replace(unify_steps=None, num_steps=2, use_separate=True)   # derived anew
    assert variant.timesteps == [899, 449] and variant.use_separate and variant.loss == "mse"
    assert args.timesteps == [899, 674, 449, 224] and not args.use_separate   # unchanged
    with pytest.raises(UsageError, match="drop --timesteps"):
        args.replace(timesteps=[999, 500])
    with pytest.raises(ValueError, match="not flags"):
        args.replace(grid=[1])


def test_the_tdm_config_is_the_flags_of_the_same_names():
    from tdm.method import TDMConfig

    args = parse_args(["--use_separate", "--use_randmid", "--cfg", "2.5", "--snr_gamma", "3", "--loss",
                       "huber_norm", "--share_step_draw", "--unify_steps", "4,1,2", "--fake_step_condition",
                       "--no_importance_weight", "--full_rollout"])
    assert TDMConfig.from_flags(args) == TDMConfig(
        cfg=2.5, use_separate=True, use_randmid=True, loss="huber_norm", snr_gamma=3.0,
        importance_weight=False, full_rollout=True, share_step_draw=True, unify_steps=(1, 2, 4),
        fake_step_condition=True)
    assert TDMConfig.from_flags(parse_args([])) == TDMConfig()   # the flags' defaults are the config's


def test_a_switch_is_named_once_and_turned_off_with_no(tmp_path):
    """--importance_weight / --no_importance_weight on the command line; in YAML either name
    (a run's config.yaml written before the switch held no_importance_weight)."""
    assert parse_args([]).importance_weight and parse_args(["--importance_weight"]).importance_weight
    assert not parse_args(["--no_importance_weight"]).importance_weight
    assert parse_args(["--no_importance_weight", "--importance_weight"]).importance_weight   # the last wins
    for text, expected in [("importance_weight: false", False), ("no_importance_weight: true", False),
                           ("no_importance_weight: false", True)]:
        (tmp_path / "c.yaml").write_text(text + "\n")
        assert parse_args(["--config", str(tmp_path / "c.yaml")]).importance_weight is expected, text
    assert parse_args(["--config", str(tmp_path / "c.yaml"), "--no_importance_weight"]).importance_weight is False
    (tmp_path / "c.yaml").write_text("no_importance_weight: 1\n")
    with pytest.raises(UsageError, match="key 'no_importance_weight' must be true or false"):
        parse_args(["--config", str(tmp_path / "c.yaml")])
    with pytest.raises(UsageError, match="did you mean '--no_importance_weight'"):
        parse_args(["--no-importance_weight"])


def test_yaml_config_and_command_line_precedence(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("cfg: 3.5\nlearning_rate: 1.0e-4\nuse_separate: true\ntimesteps: [999, 500]\n")
    args = parse_args(["--config", str(config), "--cfg", "2"])
    assert args.cfg == 2.0 and args.learning_rate == 1e-4 and args.use_separate
    assert step_timesteps(args) == [999, 500] and args.num_steps == 2
    config.write_text("learnig_rate: 1.0\n")
    with pytest.raises(UsageError, match="did you mean 'learning_rate'"):
        parse_args(["--config", str(config)])


def test_every_shipped_config_parses():
    folder = os.path.join(ROOT, "configs")
    names = [n for n in os.listdir(folder) if n.endswith(".yaml")]
    assert names
    for name in names:
        parse_args(["--config", os.path.join(folder, name)])


def test_prompt_sources(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    assert load_prompts(str(txt)) == ["a cat", "a dog"]
    rows = [{"id": 1, "caption": "a fox"}, {"id": 2, "caption": "a boat"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_prompts(str(jsonl)) == ["a fox", "a boat"]
    csv = tmp_path / "p.csv"
    csv.write_text("id,text,other\n1,a red car,x\n2,a green tree,y\n")
    assert load_prompts(str(csv), "text") == ["a red car", "a green tree"]
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["one", "two", " "]})
    ds.to_parquet(str(tmp_path / "p.parquet"))
    assert load_prompts(str(tmp_path / "p.parquet")) == ["one", "two"]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_prompts(str(tmp_path / "saved")) == ["one", "two"]


def test_prompt_errors_name_the_problem(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_prompts(str(tmp_path / "missing.txt"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n")
    with pytest.raises(UsageError, match="no non-blank prompt"):
        load_prompts(str(blank))
    csv = tmp_path / "p.csv"
    csv.write_text("id,body\n1,a red car\n")
    with pytest.raises(UsageError, match="its columns are: id, body"):
        load_prompts(str(csv), "caption")
    with pytest.raises(UsageError, match="pass --caption_column, one of: id, body"):
        load_prompts(str(csv))


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    out = tmp_path / "out"
    proc = run_script([sys.executable, os.path.join(ROOT, "train_tdm.py"), "--prompts",
                       str(tmp_path / "nope.txt"), "--output_dir", str(out)])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --prompts {tmp_path / 'nope.txt'}: no such file or folder"]
    assert not out.exists()


def test_help_shows_every_default_and_no_empty_one():
    """--help of the three scripts: a flag with a default value shows it (also one without a help
    text); a flag defaulting to None or off shows none."""
    import eval_tdm
    import infer_tdm
    from tdm.config import build_parser

    train_help = " ".join(build_parser().format_help().split())
    assert "--max_train_steps MAX_TRAIN_STEPS Optimiser steps" in train_help
    assert "(default: 500)" in train_help and "(default: lora)" in train_help
    assert "(default: None)" not in train_help and "(default: False)" not in train_help
    infer_help = " ".join(infer_tdm.build_parser().format_help().split())
    assert "--lora_scale LORA_SCALE (default: 1.0)" in infer_help   # no help text of its own
    assert "(default: None)" not in infer_help
    assert "(default: 4)" in " ".join(eval_tdm.build_parser().format_help().split())


@pytest.mark.parametrize("typed", ["--teacher_cfg", "--teacher_guidance"])
def test_a_flag_with_aliases_is_named_as_typed(typed):
    import eval_tdm

    with pytest.raises(UsageError) as error:
        eval_tdm.build_parser().parse_args(["--weights", "w", typed, "-1"])
    assert str(error.value) == f"{typed} must be >= 0, got -1.0"
    with pytest.raises(UsageError, match=f"^{typed} must be >= 0"):
        eval_tdm.build_parser().parse_args(["--weights", "w", f"{typed}=-2"])


def test_a_hub_id_not_in_the_cache_names_offline_mode_or_the_network(tmp_path, monkeypatch):
    """Offline (the tests run with HF_HUB_OFFLINE=1), a hub id that is not cached is one line that
    says so and what to do, not diffusers' "does not appear to have a file named
    model_index.json"; the same error without offline mode blames the network. Other errors get
    no hint."""
    from tdm.backbones import backbone_class
    from tdm.checks import model_error

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(OSError) as caught:
        backbone_class("auto", "tdm-tests/not-a-cached-model")
    message = str(model_error("--pretrained_model_name_or_path", "tdm-tests/not-a-cached-model",
                              caught.value))
    assert message == ("--pretrained_model_name_or_path tdm-tests/not-a-cached-model: not in the "
                       "local Hugging Face cache, and HF_HUB_OFFLINE is set (offline mode): give a "
                       "local folder, or download it once with network access (HF_HUB_OFFLINE=0)")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert "the hub cannot be reached (no network?)" in str(model_error("--x", "m", caught.value))
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError) as caught:
        backbone_class("auto", str(tmp_path / "folder"))
    assert str(model_error("--x", "f", caught.value)) == (
        f"--x f: {tmp_path / 'folder'} is not a diffusers pipeline folder (no model_index.json)")


def test_prompt_errors_name_the_flag_as_typed_and_offline_mode(capsys):
    """A missing prompt file is named by the flag the user typed (--prompts_file in infer_tdm.py
    and eval_tdm.py, --prompts in train_tdm.py); a datasets hub id offline says offline mode."""
    import eval_tdm
    import infer_tdm

    for main in (eval_tdm.main, infer_tdm.main):
        assert main(["--weights", "w", "--prompts_file", "missing.txt"]) == 2
        assert capsys.readouterr().err == "error: --prompts_file missing.txt: no such file or folder\n"
    with pytest.raises(UsageError) as error:
        load_prompts("tdm-tests/not-a-cached-dataset", flag="--prompts_file")
    assert str(error.value).startswith("--prompts_file tdm-tests/not-a-cached-dataset: not in the "
                                       "local Hugging Face cache, and HF_HUB_OFFLINE is set")


def test_flag_reference_documents_every_flag():
    from tdm.config import build_parser

    text = open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8").read()
    table = text.split("<!-- flags:start -->")[1].split("<!-- flags:end -->")[0]
    missing = [a.option_strings[0] for a in build_parser()._actions
               if a.option_strings and a.dest != "help" and a.help != argparse.SUPPRESS
               and f"`{a.option_strings[0]}`" not in table]
    assert not missing, (f"docs/flags.md flag table lacks {missing}; "
                         "run python scripts/flag_table.py --update docs/flags.md")


def test_layout_is_current():
    """docs/layout.md lists every file with its description, as scripts/readme_layout.py builds
    it from the tree now: a new, removed or re-described file fails until it is rerun."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_layout", os.path.join(ROOT, "scripts", "readme_layout.py"))
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    text = open(os.path.join(ROOT, "docs", "layout.md"), encoding="utf-8").read()
    block = text.split(layout.START)[1].split(layout.END)[0].strip("\n")
    assert block == layout.layout("../"), ("docs/layout.md is stale; run "
                                           "python scripts/readme_layout.py --update docs/layout.md")


@pytest.mark.parametrize("strategy, mode, refused", [
    ("MULTI_GPU", "lora", None), ("MULTI_GPU", "full", None), ("FSDP", "full", None),
    ("FSDP", "lora", "FSDP shards full fine-tunes only"), ("DEEPSPEED", "full", "DeepSpeed is not supported"),
])
def test_distributed_strategies_refused_with_the_fix(strategy, mode, refused):
    from tdm.config import check_distributed

    if refused is None:
        check_distributed(strategy, mode)
        return
    with pytest.raises(UsageError, match=refused):
        check_distributed(strategy, mode)


@pytest.mark.parametrize("environ, refused", [
    ({}, None),
    ({"ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_CPU": "true"}, "the FSDP launch config needs GPUs"),
    ({"ACCELERATE_USE_FSDP": "true"}, "needs GPUs"),   # this machine has no accelerator
])
def test_an_fsdp_launch_this_loop_cannot_run_is_one_line(environ, refused):
    """accelerate 1.15 either raises deep inside (CPU + fsdp config) or silently runs plain DDP."""
    from tdm.config import check_fsdp_launch

    if refused is None:
        check_fsdp_launch(environ)
        return
    with pytest.raises(UsageError, match=refused):
        check_fsdp_launch(environ)


def test_fsdp_version_2_is_refused_where_there_are_gpus(monkeypatch):
    import torch

    from tdm.config import check_fsdp_launch

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)   # as on a GPU machine
    check_fsdp_launch({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    with pytest.raises(UsageError, match="fsdp_version 2 is not supported"):
        check_fsdp_launch({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
