"""toy2d: TDM on a 2-D Gaussian mixture. An MLP ε-denoiser on PixArt's DDPM table (linear betas
1e-4→0.02, 1000 steps, docs/method.md §1); its teacher is pre-trained by denoising score matching the
first time a teacher folder is used, and cached there.

Options (`--backbone_options`, or `backbone_options:` in a config):
    mixture: {circle: {modes: 8, radius: 2.0}, std: 0.1}   # or means: [[x, y], ...]; weights;
                                                           # conditional: true or labels: [...]
    network: {hidden: 128, depth: 3, time_channels: 64}
    teacher: {steps: 4000, batch_size: 2048, lr: 2.0e-3, label_dropout: 0.1, ema: 0.995, seed: 0}
Prompts are class labels ("0".."M-1" by default) for a conditional mixture, "" is the empty
condition; an unconditional mixture ignores the prompt text.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import List, Optional

import torch

from ..config import UsageError
from ..path import GaussianPath
from ..toy2d import GaussianMixture, ToyDenoiser, pretrain_teacher
from .base import Backbone

SPEC_FILE = "toy2d.json"


def ddpm_scheduler():
    """PixArt's training table: 1000 steps, betas linear 1e-4 → 0.02."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                         beta_schedule="linear", prediction_type="epsilon")


class Toy2DBackbone(Backbone):
    name = "toy2d"
    prediction_type = "epsilon"
    lora_prefix = "denoiser"
    denoiser_subfolder = "denoiser"
    lora_target_modules = ["proj_in", "fc1", "fc2", "proj_out", "linear_1", "linear_2"]

    def __init__(self, model_path: str, revision: Optional[str] = None,
                 variant: Optional[str] = None, options: Optional[dict] = None,
                 resolution: Optional[int] = None):
        super().__init__(model_path, revision, variant, options, resolution)
        self.mixture = GaussianMixture.from_options(self.options.get("mixture", {}))
        self.path = GaussianPath.from_scheduler(ddpm_scheduler())
        self.device = torch.device("cpu")
        self.spec = {key: self.options.get(key, {}) for key in ("mixture", "network", "teacher")}
        self.ensure_teacher()

    # -- teacher cache --------------------------------------------------------------------
    def ensure_teacher(self) -> None:
        """Pre-train the teacher into `model_path` unless a matching one is cached there."""
        spec_path = os.path.join(self.model_path, SPEC_FILE)
        if os.path.isfile(spec_path):
            with open(spec_path) as f:
                cached = json.load(f)
            if cached != json.loads(json.dumps(self.spec)):
                raise UsageError(f"{self.model_path} holds a toy2d teacher for other settings "
                                 f"({cached}); delete it or pick another folder")
            return
        with torch.random.fork_rng(devices=[]):   # the initial weights follow the teacher seed too
            torch.manual_seed(self.spec["teacher"].get("seed", 0))
            net = ToyDenoiser(num_classes=self.mixture.num_classes, **self.spec["network"])
        teacher = pretrain_teacher(net, self.mixture, self.path, **self.spec["teacher"])
        self._save_teacher(teacher)

    def _save_teacher(self, teacher: ToyDenoiser) -> None:
        """Write to a sibling temporary folder, then move into place (atomic for readers)."""
        parent = os.path.dirname(os.path.abspath(self.model_path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".toy2d-teacher-")
        teacher.save_pretrained(os.path.join(tmp, self.denoiser_subfolder))
        ddpm_scheduler().save_pretrained(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, SPEC_FILE), "w") as f:
            json.dump(self.spec, f, indent=2)
        if os.path.isdir(self.model_path) and not os.listdir(self.model_path):
            os.rmdir(self.model_path)
        try:
            os.rename(tmp, self.model_path)
        except OSError:          # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)

    # -- models ---------------------------------------------------------------------------
    def load_denoiser(self, dtype=torch.float32) -> torch.nn.Module:
        return ToyDenoiser.from_pretrained(self.model_path, subfolder=self.denoiser_subfolder,
                                           dtype=dtype)

    def load_student(self, output_dir: str, dtype=torch.float32) -> torch.nn.Module:
        """The student exported by train_tdm.py: the LoRA on the teacher, or the full copy, with
        its step embedding if it was trained with --unify_steps (then choose K with
        tdm.step_condition.set_num_steps; it starts at 4)."""
        from ..lora import LORA_WEIGHT_NAME
        from ..step_condition import apply_step_embedding, find_step_embedding_file

        lora = os.path.join(output_dir, LORA_WEIGHT_NAME)
        if os.path.isfile(lora):
            net = self.load_denoiser(dtype)
            net.load_lora_adapter(lora, prefix=self.lora_prefix, adapter_name="tdm")
            location = lora
        else:
            location = os.path.join(output_dir, self.denoiser_subfolder)
            net = ToyDenoiser.from_pretrained(location, dtype=dtype)
        steps = find_step_embedding_file(location)
        if steps:
            apply_step_embedding(net, steps, 4)
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

    def check_resolution(self, resolution: int) -> None:
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
    def model_output(self, module, x_t, t, cond) -> torch.Tensor:
        dtype = next(module.parameters()).dtype
        return module(x_t.to(dtype), t, cond["class_labels"])
