"""Shared test setup: offline hub, the repository on sys.path, tiny-pipeline fixtures and helpers."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: thread start-up costs more than it saves, and CI shares two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs and script subprocesses, seconds each "
                            "(bash scripts/test.sh --fast, i.e. -m 'not slow', leaves them out)")


@pytest.fixture(scope="session")
def tiny_pixart(tmp_path_factory):
    """A tiny real PixArt-α pipeline folder (real diffusers/transformers classes, local tokenizer)."""
    from tdm.tiny import build_tiny_pixart

    return build_tiny_pixart(str(tmp_path_factory.mktemp("models") / "tiny-pixart"))


# every family with a tiny pipeline (tiny_models), in the order the tests run them
FAMILIES = ["pixart", "sd15", "sdxl", "sd3", "cogvideox", "wan", "flux", "pixart_sigma", "sana", "toy2d"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_pixart):
    """family -> folder of its tiny real pipeline, built once per session on first use."""
    from tdm.tiny.cogvideox import build_tiny_cogvideox
    from tdm.tiny.sd import build_tiny_sd15, build_tiny_sdxl
    from tdm.tiny.flux import build_tiny_flux
    from tdm.tiny.pixart_sigma import build_tiny_pixart_sigma
    from tdm.tiny.sana import build_tiny_sana
    from tdm.tiny.sd3 import build_tiny_sd3
    from tdm.tiny.wan import build_tiny_wan

    from harness import toy_model

    # toy2d: its teacher is pre-trained explicitly (tdm.toy.teacher.ensure_teacher)
    builders = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3,
                "cogvideox": build_tiny_cogvideox, "toy2d": toy_model, "wan": build_tiny_wan,
                "flux": build_tiny_flux, "pixart_sigma": build_tiny_pixart_sigma,
                "sana": build_tiny_sana}
    folders = {"pixart": tiny_pixart}

    def get(family):
        if family not in folders:
            folders[family] = builders[family](str(tmp_path_factory.mktemp("models") / family))
        return folders[family]

    return get


def loaded_backbone(path, options=None, resolution=None):
    """The adapter of a tiny pipeline with its text encoders and VAE on the CPU, in fp32."""
    import torch

    from tdm.backbones import load_backbone

    bb = load_backbone(path, options=options, resolution=resolution)
    if resolution:
        bb.check_resolution(resolution)
    bb.load_text_encoders("cpu", torch.float32)
    bb.load_vae("cpu", torch.float32)
    return bb


@pytest.fixture(scope="session")
def backbone(tiny_pixart):
    return loaded_backbone(tiny_pixart)


def stock_pipeline(model):
    """The stock pipeline of a tiny folder (model_index.json's class), progress bar off."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_full_student_becomes_the_transformer(backbone, latent, folder, prompt="a red cat on a mat"):
    """A full student folder (`transformer/`, as training exports it) is the pipeline's transformer
    in the adapter's load_pipeline: same output as the student on a random input."""
    import torch

    from tdm.sampling import resolve_weights

    net = backbone.load_denoiser()
    with torch.no_grad():
        net.proj_out.weight.add_(0.1)
    net.save_pretrained(str(folder / "transformer"))
    pipe = backbone.load_pipeline(torch.float32, resolve_weights(str(folder)))
    x, t, cond = torch.randn(1, *latent), torch.tensor([500]), backbone.encode_prompts([prompt])
    torch.testing.assert_close(backbone.model_output(pipe.transformer, x, t, cond),
                               backbone.model_output(net, x, t, cond))


def run_script(args, cwd=None, timeout=600, env=None):
    """Run a project script in a fresh interpreter; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run(args, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A free TCP port for the rendezvous of several processes (tests may run side by side)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script_args, extra_launch=(), timeout=600, processes=1):
    """`accelerate launch train_tdm.py …` on the CPU; several processes are gloo ranks."""
    if processes > 1:   # plain --cpu --num_processes N starts one process only
        devices = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(free_port())]
        env = {"ACCELERATE_USE_CPU": "true"}
    else:
        devices, env = ["--cpu", "--num_processes", "1"], {}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *devices,
           "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "bf16",
           *extra_launch, os.path.join(ROOT, "train_tdm.py"), *script_args]
    return run_script(cmd, timeout=timeout, env=env)


def teacher_and_lora_student(backbone):
    """(teacher network, a rank-4 LoRA student whose B is non-zero, so it differs from it)."""
    import torch

    from tdm.lora import attach_lora

    teacher = backbone.load_denoiser()
    student = backbone.load_denoiser()
    attach_lora(student, 4, 4, backbone.lora_target_modules)
    with torch.no_grad():   # a student that differs from the teacher
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return teacher, student


def tiny_flags(model, out, steps, *extra):
    """train_tdm.py flags for a few steps on a tiny pipeline at 32 px."""
    return ["--pretrained_model_name_or_path", model, "--output_dir", str(out), "--resolution", "32",
            "--max_train_steps", str(steps), "--prompts", os.path.join(ROOT, "assets", "prompts.txt"),
            "--seed", "0", "--lora_rank", "4", *extra]   # rank ≤ the tiny layers' width 16


def expect_success(proc):
    """A finished script run, or its output tails as the failure message."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc
