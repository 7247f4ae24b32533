"""The model card samples as the run was trained: every argument of its snippet's sampling call
(grid, size, frames, text length, guidance) is the run's config.yaml, for every family; and its
snippet runs from any folder and, for every image family, samples what infer_tdm.py samples."""
import ast
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import FAMILIES, ROOT, tiny_flags
from harness import card_snippet

# Per family, flags whose values differ from what a fresh adapter of the tiny model would use, so
# that a card reading anything but the config fails: the frames (Wan's default is 81, the tiny
# CogVideoX's 9), the text length, FLUX.1-dev's student guidance.
RUN_FLAGS = {
    "pixart": ["--max_sequence_length", "16"],
    "sd15": [], "sdxl": [],
    "sd3": ["--max_sequence_length", "32"],
    "cogvideox": ["--num_frames", "5"],
    "wan": ["--num_frames", "5", "--max_sequence_length", "16"],
    "flux": ["--max_sequence_length", "32", "--student_guidance", "2.5"],
    "pixart_sigma": ["--max_sequence_length", "16"],
    "sana": ["--max_sequence_length", "16"],
    "toy2d": ["--backbone", "toy2d", "--total_steps", "600"],
}


def toy_options():
    from harness import TOY_OPTIONS

    return TOY_OPTIONS


def run_config(family, model, out):
    """config.yaml of a run of `family` (as train_tdm.py writes it at the start), checked as the
    run checks it, and an (empty) LoRA export beside it."""
    from tdm.backbones import load_backbone
    from tdm.config import parse_args, save_resolved_config
    from tdm.lora import LORA_WEIGHT_NAME

    flags = ["--num_steps", "3"] + RUN_FLAGS[family]
    if family == "toy2d":
        flags = flags + ["--backbone_options", json.dumps(toy_options())]
    args = parse_args(tiny_flags(model, out, 1, *flags))
    checked = load_backbone(model, args.backbone, options=args.backbone_options)
    checked.check_fit(args)
    checked.set_guidance(args.guidance_embedding, args.student_guidance)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(args, str(out / "config.yaml"))
    (out / LORA_WEIGHT_NAME).write_bytes(b"")
    with open(out / "config.yaml") as f:
        return yaml.safe_load(f)


def call_arguments(snippet: str) -> dict:
    """The keyword arguments of the snippet's sampling call `pipe(…)` (toy: the rollout's grid),
    and `sigmas=` wherever the snippet binds them (Wan: to the scheduler's set_timesteps)."""
    found = {}
    for node in ast.walk(ast.parse(snippet)):
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if isinstance(node.func, ast.Name) and node.func.id == "pipe":
            found.update({name: ast.literal_eval(value) for name, value in keywords.items()
                          if name != "generator"})
        elif "sigmas" in keywords:
            found["sigmas"] = ast.literal_eval(keywords["sigmas"])
        elif isinstance(node.func, ast.Name) and node.func.id == "StepGrid":
            found["timesteps"] = ast.literal_eval(node.args[0])
    return found


def expected_arguments(backbone, config: dict) -> dict:
    """What the sampling call must say, from config.yaml alone (the grid as the family passes
    it: timesteps, or its flow sigmas)."""
    options = config.get("backbone_options") or {}
    grid = config["timesteps"]
    assert len(grid) == config["num_steps"]
    if backbone.name == "toy2d":
        return {"timesteps": grid}
    expected = {"height": options.get("height", config["resolution"]),
                "width": options.get("width", config["resolution"]),
                "guidance_scale": config["student_guidance"] if config.get("student_guidance") else 1.0}
    if config.get("num_frames"):
        expected["num_frames"] = config["num_frames"]
    if config.get("max_sequence_length"):
        expected["max_sequence_length"] = config["max_sequence_length"]
    if hasattr(backbone, "training_sigmas"):
        expected["sigmas"] = pytest.approx(backbone.training_sigmas(grid))
    else:
        expected["timesteps"] = grid
    return expected


@pytest.mark.parametrize("family", FAMILIES)
def test_card_snippet_samples_with_the_run_config(family, tiny_models, tmp_path):
    """The card is written with a fresh adapter of the base model (no resolution, text length,
    guidance or frames of the run) and the run's config.yaml: every sampling argument of its
    snippet must come from the config."""
    from tdm.backbones import load_backbone
    from tdm.model_card import write_model_card

    model = tiny_models(family)
    out = tmp_path / "run"
    config = run_config(family, model, out)
    fresh = load_backbone(model, config["backbone"], options=config.get("backbone_options"))
    write_model_card(str(out), fresh, config)
    card = (out / "README.md").read_text()
    snippet = card_snippet(card)
    found = call_arguments(snippet)
    expected = expected_arguments(fresh, config)
    assert {k: found.get(k) for k in expected} == expected, snippet
    if family != "toy2d":
        assert f"| sample size | {expected['height']}×{expected['width']} px" in card
    assert f"| step grid (timesteps) | {', '.join(map(str, config['timesteps']))} |" in card


@pytest.mark.slow
def test_toy_card_snippet_runs_from_any_folder(tiny_models, tmp_path):
    """The toy's card, written from a run whose paths are relative, runs in a fresh interpreter
    in another folder with `tdm` importable as an installed package (not from the checkout's
    working directory): its paths are absolute."""
    import torch

    from tdm.backbones import load_backbone
    from tdm.model_card import write_model_card

    work = tmp_path / "checkout"
    work.mkdir()
    os.symlink(tiny_models("toy2d"), work / "teacher")
    student = load_backbone(str(work / "teacher"), "toy2d", options=toy_options()).load_denoiser()
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.5)
    student.save_pretrained(str(work / "run" / "denoiser"))
    cwd = os.getcwd()
    os.chdir(work)   # the run's paths as a user gives them: relative to where it was started
    try:
        config = {**run_config("toy2d", "teacher", work / "run"), "output_dir": "run",
                  "pretrained_model_name_or_path": "teacher"}
        os.remove(work / "run" / "pytorch_lora_weights.safetensors")   # a full student here
        write_model_card("run", load_backbone("teacher", "toy2d", options=toy_options()), config)
    finally:
        os.chdir(cwd)
    card = (work / "run" / "README.md").read_text()
    snippet = card_snippet(card)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    site = tmp_path / "site"      # what `pip install` puts on the path: the package, not the repo
    site.mkdir()
    os.symlink(os.path.join(ROOT, "tdm"), site / "tdm")
    script = snippet + "\nprint(tuple(points.shape), float(points.abs().mean()))\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(site)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("(1000, 2) ")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("cogvideox", "wan", "toy2d")])
def test_card_snippet_samples_what_infer_tdm_samples(family, tiny_models, tmp_path):
    """Each image family's card snippet, run as written, gives infer_tdm.py's image of the same
    full student from the run's config.yaml: the lines that load and call, not only the arguments
    checked above. (Video: test_wan runs Wan's snippet; the toy's runs above.)"""
    import numpy as np
    import torch
    from PIL import Image

    import infer_tdm
    from tdm.backbones import load_backbone
    from tdm.lora import LORA_WEIGHT_NAME
    from tdm.model_card import EXAMPLE_PROMPT, write_model_card

    model, out = tiny_models(family), tmp_path / "run"
    config = run_config(family, model, out)
    os.remove(out / LORA_WEIGHT_NAME)   # a full student: the teacher's weights, perturbed
    backbone = load_backbone(model, config["backbone"])
    student = backbone.load_denoiser()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * p.std().nan_to_num() * torch.randn(p.shape, generator=generator))
    student.save_pretrained(str(out / backbone.denoiser_subfolder))
    write_model_card(str(out), backbone, config)
    namespace = {}
    exec(compile(card_snippet((out / "README.md").read_text()),
                 "model_card_snippet", "exec"), namespace)
    png = tmp_path / "infer.png"
    assert infer_tdm.main(["--weights", str(out / backbone.denoiser_subfolder), "--prompt", EXAMPLE_PROMPT,
                           "--num_inference_steps", str(config["num_steps"]), "--output", str(png),
                           "--seed", "0"]) == 0
    expected = np.asarray(Image.open(png).convert("RGB"), np.int16)
    snippet_image = np.asarray(namespace["image"].convert("RGB"), np.int16)
    assert snippet_image.shape == expected.shape and expected.std() > 0
    assert np.abs(snippet_image - expected).max() <= 1   # PNG of the same float image
