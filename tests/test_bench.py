"""The benchmark scripts run and count what they claim (their numbers go to docs/benchmarks.md)."""
import json
import os
import sys

import pytest

from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "scripts"))


def test_launch_count_skips_views_allocations_and_detach():
    """bench_train.count_launches counts the aten ops that launch device work: not views (by
    schema, or an output that shares its input's storage), allocations without a fill or detach;
    in-place ops and copies count; ops inside optimizer.step do not."""
    import torch

    from bench_train import count_launches

    x = torch.randn(4, 6)
    param = torch.nn.Parameter(torch.randn(6))
    optimizer = torch.optim.SGD([param], lr=0.1)

    def iteration():
        y = x.view(2, 12).reshape(24)        # views: view, reshape of a contiguous tensor
        x.t().unsqueeze(0)                   # views
        z = torch.empty(3)                   # allocation
        w = x.detach()
        y = y + 1                            # 1
        y.mul_(2)                            # 2: in place
        z.fill_(0)                           # 3
        u = x.t().contiguous()               # 4: a copy
        loss = (w.sum() + u.sum() + (param * 2).sum())   # 5, 6, 7, 8, 9, 10
        loss.backward()                      # backward ops count too
        optimizer.step()                     # not counted
        optimizer.zero_grad(set_to_none=True)

    counts = count_launches(iteration, 2)
    forward = {"add.Tensor": 3, "mul_.Tensor": 1, "fill_.Scalar": 1, "clone.default": 1,
               "sum.default": 3, "mul.Tensor": 1}
    for op, n in forward.items():
        assert counts["launch_ops_top"].get(op, 0) >= n, (op, counts["launch_ops_top"])
    assert counts["launch_ops_top"]["clone.default"] == 1   # the reshape was a view
    names = set(counts["launch_ops_top"])
    assert not names & {"view.default", "t.default", "empty.memory_format", "detach.default",
                        "_unsafe_view.default", "_foreach_add_.List", "add_.Tensor"}, names
    assert counts["all_ops_per_iteration"] > counts["launch_ops_per_iteration"] > sum(forward.values())


@pytest.mark.slow
def test_bench_train_counts_forwards_and_backwards(tmp_path):
    md = tmp_path / "bench.md"
    proc = run_script([sys.executable, os.path.join(ROOT, "scripts", "bench_train.py"), "--iterations", "3",
                       "--warmup", "1", "--markdown", str(md)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["train_mode"] for r in rows] == ["lora", "full"]
    for r in rows:
        rows_per_sample = r["forward_rows_per_sample"]
        assert rows_per_sample["teacher"] == 2.0 and rows_per_sample["fake_score"] == 2.0   # cfg 4.5
        assert 2.0 <= rows_per_sample["student"] <= 5.0     # lazy rollout (1..4 rows) + 1 with grad
        assert r["backward_passes_per_iteration"] == {"student": 1.0, "fake_score": 1.0}
        # host syncs: one fused finiteness flag per update, the logged losses, and the PixArt
        # text pipeline's own (gone with --cache_text_embeddings)
        assert r["device_sync_sites"] == {"_local_scalar_dense survival.py:all_finite": 2,
                                          "tolist bench_train.py:iteration": 1,
                                          "_local_scalar_dense pixart.py:encode_prompts": 1}
        assert r["device_syncs"] == 4 and r["tflop_per_iteration"] > 0 and r["mfu"] is None
        assert r["all_ops_per_iteration"] > r["launch_ops_per_iteration"] > 0
    assert "| tiny" in md.read_text()


@pytest.mark.slow
def test_check_fsdp_script_compares_runs(tmp_path):
    """scripts/check_fsdp.py's own logic on CPU (its FSDP legs need GPUs): every leg runs, the
    resumed run is compared with the straight one, the export with the logged checksum."""
    proc = run_script([sys.executable, os.path.join(ROOT, "scripts", "check_fsdp.py"), "--reference_only",
                       "--size", "tiny", "--steps", "2", "--output_dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert sum(line.endswith("| yes |") for line in table) == 4
    assert os.path.isdir(tmp_path / "fsdp_resumed" / "checkpoint-1")


@pytest.mark.slow
def test_lr_match_measures_lora_against_full(tmp_path):
    """scripts/lr_match.py: full and LoRA rows at the config's lr × each multiplier, movement
    growing with the multiplier, and the matching multiplier (bracketed here by 1 and 100)."""
    md = tmp_path / "lr.md"
    proc = run_script([sys.executable, os.path.join(ROOT, "scripts", "lr_match.py"), "--model", "pixart-tiny",
                       "--config", os.path.join(ROOT, "configs", "pixart_alpha_512.yaml"), "--lora_rank", "4",
                       "--train_batch_size", "2", "--steps", "2", "--multipliers", "1,100",
                       "--models_dir", str(tmp_path / "models"), "--markdown", str(md)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
            if "mode" in r]   # one line per run (and a summary line)
    assert [(r["mode"], r["multiplier"]) for r in rows] == [("full", 1.0), ("lora", 1.0), ("lora", 100.0)]
    assert rows[1]["lr_fake"] * 100 == pytest.approx(rows[2]["lr_fake"])
    assert 0 < rows[1]["movement"][-1] < rows[0]["movement"][-1] < rows[2]["movement"][-1]
    assert "Matching LoRA multiplier" in md.read_text() and "×" in md.read_text()
