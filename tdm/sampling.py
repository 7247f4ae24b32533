"""Few-step sampling with stock diffusers schedulers (docs/method.md §7)."""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import yaml

from .lora import LORA_WEIGHT_NAME
from .trajectory import StepGrid


def exact_grid_scheduler(scheduler_config):
    """The training rollout of docs/method.md §2 as a stock scheduler.

    First-order DPM-Solver++ is algebraically the DDIM update x' = α' x̂0 + σ' ε̂, and
    final_sigmas_type='zero' makes the last step return x̂0. Pass the grid to the pipeline as
    `timesteps=`. Every option that would change the update is pinned.
    """
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(
        scheduler_config, algorithm_type="dpmsolver++", solver_order=1, final_sigmas_type="zero",
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_lu_lambdas=False, thresholding=False, variance_type=None)


PICKLE_REFUSAL = ("is a pickle, which can run code when loaded; only .safetensors weights are "
                  "read (convert it with safetensors.torch.save_file)")


def _has_safetensors(folder: str) -> bool:
    return any(name.endswith((".safetensors", ".safetensors.index.json")) for name in os.listdir(folder))


def resolve_weights(weights: Optional[str]) -> Optional[Tuple[str, str]]:
    """An output dir, a LoRA .safetensors or a full denoiser folder → ("lora"|"full", location).
    User-provided weights are read as safetensors only: a .bin/.pt/.ckpt is refused, unopened."""
    if not weights:
        return None
    if os.path.isfile(weights):
        if not weights.endswith(".safetensors"):
            raise ValueError(f"--weights {weights} {PICKLE_REFUSAL}" if weights.endswith(
                (".bin", ".pt", ".pth", ".ckpt", ".pkl")) else
                f"--weights {weights}: a LoRA must be a .safetensors file")
        return "lora", weights
    if not os.path.isdir(weights):
        raise FileNotFoundError(f"--weights {weights}: no such file or folder")
    if os.path.isfile(os.path.join(weights, LORA_WEIGHT_NAME)):
        return "lora", os.path.join(weights, LORA_WEIGHT_NAME)
    for folder in (weights, *(os.path.join(weights, sub) for sub in ("transformer", "unet", "denoiser"))):
        if os.path.isfile(os.path.join(folder, "config.json")):
            if not _has_safetensors(folder):
                raise ValueError(f"--weights {folder}: no .safetensors weights; a .bin model file "
                                 f"{PICKLE_REFUSAL}")
            return "full", folder
    raise FileNotFoundError(f"--weights {weights}: no {LORA_WEIGHT_NAME} and no model folder inside")


def training_config(weights: Optional[str]) -> dict:
    """The resolved config.yaml that train_tdm.py wrote beside the student, if any."""
    if not weights:
        return {}
    folder = weights if os.path.isdir(weights) else os.path.dirname(weights)
    for candidate in (folder, os.path.dirname(os.path.normpath(folder))):
        path = os.path.join(candidate, "config.yaml")
        if os.path.isfile(path):
            with open(path) as f:
                return yaml.safe_load(f) or {}
    return {}


def student_timesteps(num_steps: int, config: dict, timesteps: Optional[List[int]] = None) -> List[int]:
    """The grid to sample on: explicit, else the training grid when K matches, else k·T/K − 1.
    ValueError for a grid that is not strictly decreasing and >= 0 (e.g. K above T)."""
    if timesteps:
        return StepGrid(list(timesteps)).timesteps
    if config.get("timesteps") and len(config["timesteps"]) == num_steps:
        return list(config["timesteps"])
    return StepGrid.uniform(num_steps, int(config.get("total_steps", 900))).timesteps
