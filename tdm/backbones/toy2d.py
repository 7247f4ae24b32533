"""toy2d: TDM on a 2-D Gaussian mixture. An MLP ε-denoiser on PixArt's DDPM table (linear betas
1e-4→0.02, 1000 steps, docs/method.md §1). This adapter only loads a teacher folder; pre-train it
first (tdm/toy/teacher.py):

    python -m tdm.toy.teacher --config configs/toy2d.yaml

A folder without a teacher, or with one trained for other options, is a UsageError that names the
command.

Options (`--backbone_options`, or `backbone_options:` in a config):
    mixture: {circle: {modes: 8, radius: 2.0}, std: 0.1}   # or means: [[x, y], ...] or grid:
                                                           # {rows, cols, spacing}; std: one or
                                                           # one per mode; weights; conditional:
                                                           # true or labels: [...]
    (configs/toy2d_grid.yaml and configs/toy2d_asym.yaml are two other mixtures)
    network: {hidden: 128, depth: 3, time_channels: 64}
    teacher: {steps: 4000, batch_size: 2048, lr: 2.0e-3, label_dropout: 0.1, ema: 0.995, seed: 0}
Prompts are class labels ("0".."M-1" by default) for a conditional mixture, "" is the empty
condition; an unconditional mixture ignores the prompt text.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch

from ..config import UsageError
from ..path import GaussianPath
from ..step_condition import apply_step_embedding, find_step_embedding_file
from ..toy.mixture import GaussianMixture
from ..toy.network import ToyDenoiser
from ..toy.teacher import DENOISER_SUBFOLDER, check_teacher, ddpm_scheduler, teacher_spec
from .base import Backbone


class Toy2DBackbone(Backbone):
    name = "toy2d"
    prediction_type = "epsilon"
    lora_prefix = "denoiser"
    denoiser_subfolder = DENOISER_SUBFOLDER
    lora_target_modules = ["proj_in", "fc1", "fc2", "proj_out", "linear_1", "linear_2"]

    def __init__(self, model_path: str, revision: Optional[str] = None,
                 variant: Optional[str] = None, options: Optional[dict] = None,
                 resolution: Optional[int] = None):
        super().__init__(model_path, revision, variant, options, resolution)
        self.mixture = GaussianMixture.from_options(self.options.get("mixture", {}))
        self.path = GaussianPath.from_scheduler(ddpm_scheduler())
        self.device = torch.device("cpu")
        self.spec = teacher_spec(self.options)
        check_teacher(self.model_path, self.options)   # loads only: pre-training is its own step

    # -- models ---------------------------------------------------------------------------
    def load_denoiser(self, dtype=torch.float32) -> torch.nn.Module:
        return ToyDenoiser.from_pretrained(self.model_path, subfolder=self.denoiser_subfolder,
                                           dtype=dtype)

    def load_student(self, output_dir: str, dtype=torch.float32) -> torch.nn.Module:
        """The student exported by train_tdm.py: the LoRA on the teacher, or the full copy, with
        its step embedding if it was trained with --unify_steps (then choose K with
        tdm.step_condition.set_num_steps; it starts at 4)."""
        from ..lora import LORA_WEIGHT_NAME
        lora = os.path.join(output_dir, LORA_WEIGHT_NAME)
        kind, location = (("lora", lora) if os.path.isfile(lora)
                          else ("full", os.path.join(output_dir, self.denoiser_subfolder)))
        net = self.load_weights(kind, location, dtype)
        steps = find_step_embedding_file(location)
        if steps:
            apply_step_embedding(net, steps, 4)
        return net

    def load_weights(self, kind: str, location: str, dtype=torch.float32) -> torch.nn.Module:
        """The student at `location` ("lora": a LoRA file on the teacher; "full": a ToyDenoiser
        folder), as tdm.sampling.resolve_weights names it; without its step embedding."""
        if kind == "full":
            return ToyDenoiser.from_pretrained(location, dtype=dtype)
        net = self.load_denoiser(dtype)
        net.load_lora_adapter(location, prefix=self.lora_prefix, adapter_name="tdm")
        return net

    def load_text_encoders(self, device, dtype) -> None:
        self.device = torch.device(device)

    def load_vae(self, device, dtype) -> None:
        pass

    # -- data -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> dict:
        """Class index per prompt; "" (and every prompt of an unconditional mixture) is the
        empty condition, index `num_classes`."""
        null = self.mixture.num_classes
        index = {label: i for i, label in enumerate(self.mixture.labels or [])}
        index[""] = null
        if self.mixture.labels:
            unknown = sorted({p for p in prompts if p not in index})
            if unknown:
                raise UsageError(f"toy2d prompts must be class labels {self.mixture.labels} or "
                                 f"''; got {unknown[:5]}")
        labels = [index.get(p, null) for p in prompts]
        return {"class_labels": torch.tensor(labels, dtype=torch.long, device=self.device)}

    def latent_shape(self, resolution: int, num_frames=None) -> tuple:
        return (2,)

    def check_resolution(self, resolution: int, flag: str = "--resolution") -> None:
        """The toy has no image resolution; any value is accepted."""

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, size: int = 64, extent: float = 3.0) -> torch.Tensor:
        """One small image per point: the point in red over the mixture means in grey."""
        images = torch.ones((latents.shape[0], 3, size, size))

        def pixel(xy):
            ij = ((xy.float().cpu() / extent + 1) / 2 * (size - 1)).round().long()
            return ij.clamp(0, size - 1)

        means = pixel(self.mixture.means)
        images[:, :, size - 1 - means[:, 1], means[:, 0]] = 0.6
        points = pixel(latents)
        rows = torch.arange(latents.shape[0])
        images[rows, :, size - 1 - points[:, 1], points[:, 0]] = torch.tensor([1.0, 0.0, 0.0])
        return images

    # -- network call ---------------------------------------------------------------------
    def network_output(self, module, x_t, t, cond) -> torch.Tensor:
        dtype = next(module.parameters()).dtype
        return module(x_t.to(dtype), t, cond["class_labels"])

    def loading_snippet(self, weights_kind: str, student_location: str, timesteps: List[int],
                        num_frames=None) -> str:
        """The toy has no diffusers pipeline: load the student with this repository's adapter and
        roll it out on its grid (`tdm` installed: `pip install -e .` in the checkout)."""
        output_dir = os.path.dirname(student_location)
        return "\n".join([
            "import torch",
            "from tdm.backbones import load_backbone",
            "from tdm.trajectory import StepGrid, rollout", "",
            f"backbone = load_backbone({os.path.abspath(self.model_path)!r}, \"toy2d\", "
            f"options={self.options!r})",
            f"student = backbone.denoiser(backbone.load_student({output_dir!r}).eval())",
            "cond = backbone.encode_prompts([\"\"] * 1000)   # or class labels of a conditional mixture",
            "noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))",
            "with torch.no_grad():",
            f"    points = rollout(student, noise, cond, StepGrid({list(timesteps)!r}), backbone.path).sample",
        ]) + "\n"
