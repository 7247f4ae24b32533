"""scripts/soak.py, briefly: it trains both modes, samples memory and open files, and reports.
(The 5,000-step soak itself is not part of the suite: docs/benchmarks.md has its numbers.)"""
import json
import os
import sys

import pytest
import yaml

from conftest import ROOT, run_script

pytestmark = pytest.mark.slow


def test_soak_script_runs_both_modes_and_reports(tmp_path):
    from harness import TOY_OPTIONS

    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "toy2d.yaml")))
    options = {**TOY_OPTIONS, "mixture": {**TOY_OPTIONS["mixture"], "conditional": False}}  # prompts 0..7
    config.update(pretrained_model_name_or_path=str(tmp_path / "teacher"), backbone_options=options,
                  train_batch_size=64, lora_rank=4)
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(config))
    report = tmp_path / "soak.json"
    proc = run_script([sys.executable, os.path.join(ROOT, "scripts", "soak.py"), "--steps", "60",
                       "--every", "20", "--warmup_steps", "20", "--max_growth", "100",
                       "--config", str(tmp_path / "toy.yaml"), "--output_dir", str(tmp_path / "out"),
                       "--report", str(report)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(report.read_text())
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from soak import MODE_FIELDS, REPORT_FIELDS

    assert set(REPORT_FIELDS) <= set(data) and data["passed"] is True and data["steps"] == 60
    assert sorted(data["modes"]) == ["full", "lora"]
    for mode in data["modes"].values():
        assert set(MODE_FIELDS) <= set(mode)
        assert [s["step"] for s in mode["samples"]] == [0, 20, 40, 60]
        assert all(s["rss_mb"] > 10 and s["fds"] >= 3 for s in mode["samples"])
        assert mode["fds_constant"] is True
    assert "| lora | 60 |" in proc.stdout and "| full | 60 |" in proc.stdout
    # the runs trained: 60 logged steps each
    for mode in ("lora", "full"):
        lines = (tmp_path / "out" / mode / "train_log.jsonl").read_text().splitlines()
        assert sum("loss_fake_score" in line for line in lines) == 60
