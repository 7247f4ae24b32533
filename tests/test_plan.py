"""The run planner (tdm/plan.py, tdm/simulate.py): its accounting by hand, and its plan of every
family's tiny model against the same accounting of a real run on this CPU."""
import os

import pytest
import torch

from conftest import FAMILIES, ROOT
from harness import TOY_PROMPTS, train_args

from tdm.simulate import (SIMULATED, MemoryTrace, OptimiserFootprint, SimulatedDevice,
                          cuda_autocast, weightless_loading)

KiB = 1024


def test_memory_trace_counts_each_live_storage_once_by_kind_rounded_to_blocks():
    with MemoryTrace(torch.device("cpu"), block=512) as trace:
        a = torch.zeros(100)                          # 400 B -> one 512 B block
        view = a[10:]                                 # the same storage: not counted again
        with trace.labelled("x"):
            b = torch.zeros(1000, dtype=torch.float64)   # 8000 B -> 8192 B
        assert trace.current == {"other": 512, "x": 8192} and trace.peak == 8704
        del b
        assert trace.total == 512 and trace.peak == 8704 and trace.at_peak == {"other": 512, "x": 8192}
        trace.relabel(view, "y")
        assert trace.current["y"] == 512 and trace.current["other"] == 0
        c = torch.ones(3)                             # 12 B -> 512 B
        trace.keep_only([c])
        assert trace.total == 512 and trace.peak == 512
    del a, c


def test_optimiser_footprint_holds_the_states_of_fused_and_8bit_adam():
    with MemoryTrace(torch.device("cpu")) as trace:
        big, small = torch.nn.Parameter(torch.zeros(10000)), torch.nn.Parameter(torch.zeros(100))
        before = trace.total
        fused = OptimiserFootprint([big, small])
        fused.allocate()                                         # 2 × 4 B per value + 4 B step each
        assert trace.total - before == 2 * 4 * 10100 + 2 * 4
        before = trace.total
        eight_bit = OptimiserFootprint([big, small], eight_bit=True)
        eight_bit.allocate()
        # ≥ 4096 values: 2 uint8 states + 2 × 40 float32 absmax (256 values a block); fewer: 32-bit
        assert trace.total - before == 2 * 10000 + 2 * 4 * 40 + (2 * 4 * 100 + 4)


def test_simulated_device_fakes_device_tensors_and_runs_host_work():
    from torch._subclasses.fake_tensor import FakeTensor

    with SimulatedDevice():
        host = torch.randint(0, 10, (5,), generator=torch.Generator().manual_seed(0))
        device = torch.ones(1 << 30, device=SIMULATED)           # 4 GiB: costs nothing here
        assert not isinstance(host, FakeTensor) and host.tolist() == torch.randint(
            0, 10, (5,), generator=torch.Generator().manual_seed(0)).tolist()
        assert isinstance(device, FakeTensor) and device.device == SIMULATED
        assert bool(torch.isfinite(device).all().item())          # device values read back true
        made = torch.tensor([1.0, 2.0], device=SIMULATED)         # (a CPU build would drop :1)
        assert isinstance(made, FakeTensor) and made.device == SIMULATED
        assert (host.to(SIMULATED) + device[:5]).device == SIMULATED
    assert not isinstance(torch.tensor([1.0]), FakeTensor)


def test_weightless_loading_builds_the_architecture_from_configs_only(tmp_path):
    from diffusers import PixArtTransformer2DModel
    from transformers import T5EncoderModel

    from tdm.tiny import build_tiny_pixart

    real_folder = build_tiny_pixart(str(tmp_path / "real"))
    folder = build_tiny_pixart(str(tmp_path / "configs"), weights=False)
    assert not [f for _, _, files in os.walk(folder) for f in files if f.endswith(".safetensors")]
    real = PixArtTransformer2DModel.from_pretrained(real_folder, subfolder="transformer")
    with SimulatedDevice(), weightless_loading():
        net = PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=torch.bfloat16)
        text = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.bfloat16)
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(net) == shapes(real)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert {p.device for p in [*net.parameters(), *text.parameters()]} == {SIMULATED}


def test_cuda_autocast_runs_norms_and_softmax_in_float32_as_cuda_does():
    F = torch.nn.functional
    layer_norm = F.layer_norm
    x, w = torch.randn(2, 4, 8).bfloat16(), torch.randn(8, 8)
    with SimulatedDevice(), cuda_autocast():
        x, w = x.to(SIMULATED), w.to(SIMULATED)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert F.layer_norm(x, (8,)).dtype == torch.float32
            assert F.group_norm(x, 2).dtype == torch.float32
            assert F.softmax(x, -1).dtype == torch.float32
            assert F.linear(x, w).dtype == torch.bfloat16         # the CPU's list already agrees
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16      # autocast off: untouched
    assert F.layer_norm is layer_norm                             # restored on exit


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_agrees_with_the_memory_of_a_real_run_on_the_cpu(family, tiny_models, tmp_path):
    """plan() on fake tensors from the folder's configs equals measure(), the same accounting of
    the run with its weights on this CPU (CPU autocast lists, no block rounding, mixed
    precision off as the harness trains): what is loaded to the byte, the training peak within
    1 % (the rollout's rows differ: the real run's noise draws from the same generator as the
    step draws, the simulated device's fake noise does not)."""
    from tdm.plan import measure, plan

    args = train_args(tiny_models(family), str(tmp_path), family=family,
                      **({"prompts": TOY_PROMPTS} if family == "toy2d" else {}))
    planned = plan(args, gpu_autocast=False, allocator_block=1)
    measured = measure(args)
    assert sum(planned.loaded.values()) == sum(measured.loaded.values())
    assert planned.training_peak == pytest.approx(measured.training_peak, rel=0.01)
    assert planned.parameters == measured.parameters


def test_plan_agrees_in_full_mode_with_checkpointing_and_bf16(tiny_models, tmp_path):
    from tdm.plan import measure, plan

    args = train_args(tiny_models("pixart"), str(tmp_path), ["--train_mode", "full",
                      "--gradient_checkpointing", "--mixed_precision", "bf16",
                      "--gradient_accumulation_steps", "2"])
    planned, measured = plan(args, gpu_autocast=False, allocator_block=1), measure(args)
    assert sum(planned.loaded.values()) == sum(measured.loaded.values())
    assert planned.training_peak == pytest.approx(measured.training_peak, rel=0.01)
    assert planned.at_peak.get("gradients", 0) > 0      # accumulating: gradients held at the peak


def test_plan_counts_the_rows_and_flops_of_a_full_rollout_by_hand(tiny_models, tmp_path):
    """The toy (hidden 32, depth 2, time channels 16), full mode, --full_rollout, K = 4, CFG on,
    batch 2. Rows per sample (docs/method.md §2–5): the student 4 in the rollout + 1 with
    gradient, the teacher's two CFG branches 2, the fake score 2 (its loss, then read by the
    student's). One row's forward: the Linear layers time 16→32, 32→32, in 2→32, 2 blocks ×
    2 × 32→32, out 32→2, at 2·in·out FLOPs each: 11,520. Backward of the two rows with gradient
    (fake score, student): 2·in·out for every weight's gradient and every input's, but for the
    two layers whose input needs none (the noisy sample and the sinusoids): 2 · 11,520 − 128 −
    1,024 = 21,888. An iteration: 2 · (9 · 11,520 + 2 · 21,888) = 294,912 FLOPs."""
    from tdm.plan import plan

    args = train_args(tiny_models("toy2d"), str(tmp_path), ["--train_mode", "full", "--full_rollout"],
                      family="toy2d", prompts=TOY_PROMPTS)
    assert (args.num_steps, args.cfg, args.train_batch_size) == (4, 3.0, 2)
    planned = plan(args, gpu_autocast=False, allocator_block=1)
    assert planned.rows == {"fake_score": 2.0, "student": 5.0, "teacher": 2.0}
    forward = 2 * (16 * 32 + 32 * 32 + 2 * 32 + 2 * 2 * 32 * 32 + 32 * 2)
    backward = 2 * forward - 2 * 2 * 32 - 2 * 16 * 32
    assert (forward, backward) == (11520, 21888)
    assert planned.tflop * 1e12 == pytest.approx(2 * (9 * forward + 2 * backward), rel=1e-12)


def test_every_shipped_config_plans_its_published_model_from_the_repository():
    """Each config's teacher has its configs in tdm/published/ (no download): the adapter
    reads them and accepts the config's sizes before any weight is loaded."""
    import glob

    from tdm.backbones import load_backbone
    from tdm.config import parse_args
    from tdm.plan import model_folder
    from tdm.published import published_models

    configs = [c for c in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
               if "toy2d" not in c]
    for config in configs:
        args = parse_args(["--config", config])
        assert args.pretrained_model_name_or_path in published_models(), config
        folder = model_folder(args.pretrained_model_name_or_path)
        backbone = load_backbone(folder, args.backbone, options=args.backbone_options,
                                 resolution=args.resolution)
        backbone.check_fit(args)


def test_cards_fit_with_reserve_and_headroom_and_the_smallest_change_is_planned():
    from tdm.config import parse_args
    from tdm.plan import CARDS, GiB, Plan, changes_to_try, fits, smallest_changes

    assert fits(int(20 * GiB), int(23 * GiB)) and not fits(int(21 * GiB), int(23 * GiB))  # ×1.1 + 1
    args = parse_args(["--train_mode", "full", "--train_batch_size", "4"])
    ladder = changes_to_try(args)
    assert ladder[0] == {"cache_text_embeddings": True}
    assert ladder[2] == {"cache_text_embeddings": True, "gradient_checkpointing": True,
                         "use_8bit_adam": True}
    assert [c.get("train_batch_size") for c in ladder[3:]] == [2, 1, 4, 2, 1]
    assert ladder[5]["train_mode"] == "lora" and ladder[6]["gradient_accumulation_steps"] == 2

    peaks = iter([60, 30, 20, 10])   # GiB planned for the ladder's first changes
    planner = lambda a, n: Plan({}, int(next(peaks) * GiB), {}, {}, 0, 0.0, {})  # noqa: E731
    base = Plan({}, int(100 * GiB), {}, {}, 0, 0.0, {})
    found = smallest_changes(args, base, planner=planner)
    assert found["80 GB"][0] == ladder[0] and found["48 GB"][0] == ladder[1]
    assert found["24 GB"][0] == ladder[2] and "141 GB" not in found and set(found) <= set(CARDS)


def test_memory_warning_is_one_line_and_only_when_the_plan_does_not_fit():
    from tdm.plan import GiB, Plan, memory_warning

    planned = Plan({}, int(30 * GiB), {}, {}, 0, 0.0, {})
    line = memory_warning(planned, int(24 * GiB), "NVIDIA RTX 4090")
    assert line.startswith("warning:") and "\n" not in line and "30.0 GiB" in line and "RTX 4090" in line
    assert memory_warning(planned, int(80 * GiB)) is None


def test_cli_plans_once_per_config_and_refuses_bad_flags_in_one_line(tiny_models, tmp_path,
                                                                     monkeypatch, capsys):
    from tdm.plan import cache_path, main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = train_args(tiny_models("pixart"), str(tmp_path / "run"))
    flags = ["--config", str(tmp_path / "run" / "flags.yaml"), "--no_suggest"]
    import yaml

    with open(flags[1], "w") as f:
        yaml.safe_dump({k: v for k, v in args._flags.items() if k != "config"}, f)
    assert main(flags) == 0
    first = capsys.readouterr().out
    assert "peak GPU memory" in first and "24 GB" in first and os.path.isfile(cache_path(args))
    assert main(flags) == 0 and capsys.readouterr().out == first     # read back from the cache
    assert main(flags + ["--num_processes", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --num_processes") and err.count("\n") == 1


@pytest.mark.slow   # a fresh interpreter imports torch and diffusers (~15 s idle)
def test_train_tdm_plans_in_a_subprocess_once_per_config(tiny_models, tmp_path, monkeypatch):
    """What train_tdm.build runs on a GPU before loading weights (tdm.plan.warn_if_over_memory):
    the plan in a fresh interpreter from the run's flags, cached for the next launch."""
    from tdm.plan import cache_path, cached_plan, plan, plan_in_subprocess

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = train_args(tiny_models("pixart"), str(tmp_path / "run"), ["--train_batch_size", "4"])
    with monkeypatch.context() as launched:   # as a launcher sets them for the run's ranks
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
            launched.setenv(name, value)
        planned = plan_in_subprocess(args, timeout=600)
    assert os.path.isfile(cache_path(args)) and cached_plan(args) == planned
    assert planned.settings["train_batch_size"] == 4
    assert planned.peak == plan(args).peak      # the flags went through the YAML unchanged


def test_the_planner_runs_outside_the_launch(monkeypatch):
    """The planning subprocess gets no launcher variables (it would join the run's process group)
    and no GPU; the rest of the environment is kept."""
    from tdm.plan import planner_environment

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "ACCELERATE_MIXED_PRECISION", "FSDP_SHARDING_STRATEGY", "KEEP_ME"):
        monkeypatch.setenv(name, "1")
    env = planner_environment()
    assert env["KEEP_ME"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "ACCELERATE_MIXED_PRECISION", "FSDP_SHARDING_STRATEGY"} & set(env)


def test_a_launch_of_several_processes_plans_nothing_before_training(tiny_models, tmp_path, monkeypatch,
                                                                      caplog):
    """warn_if_over_memory on rank 0 of a 2-process CUDA launch without a cached plan: no planning
    (the other ranks would wait in their first collective), one hint, no cache written."""
    import logging
    from types import SimpleNamespace

    from tdm import plan as planner

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(planner, "plan_in_subprocess", lambda *a, **k: pytest.fail("planned"))
    args = train_args(tiny_models("pixart"), str(tmp_path / "run"))
    accelerator = SimpleNamespace(device=torch.device("cuda", 0), is_main_process=True, num_processes=2,
                                  mixed_precision="bf16")
    with caplog.at_level(logging.INFO, logger="tdm"):
        assert planner.warn_if_over_memory(args, accelerator) is None
    assert "--num_processes 2" in caplog.text and not os.path.exists(tmp_path / "cache")
