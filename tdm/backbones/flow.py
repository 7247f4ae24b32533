"""What the flow-matching families (SD3, FLUX, SANA, Wan) share (docs/method.md §1, §7).

Path. A rectified flow x_t = (1 − σ)·x0 + σ·ε whose network predicts the velocity v = ε − x0
(path.x0_eps 'flow'). The path index t ∈ {0, …, 999} is the scheduler's timestep t + 1:

    σ_t = σ((t + 1)/1000),  α_t = 1 − σ_t,   so σ_999 = 1 (pure noise), σ_0 = σ(0.001) > 0,

with σ(u) the teacher's shifted sigma (fixed shift s: s·u / (1 + (s − 1)·u)). A high index is
more noise, as for the DDPM family, and T = 1000 puts the first step of the grid 999, 749, 499,
249 on pure noise exactly. α_999 = 0 is harmless: the flow conversion never divides by α, and the
transition of docs/method.md §3.5 divides by α_{t_e} only, with t_e ≤ τ_{K−1} + 1 < 999 for any
grid whose first two steps are not 999, 998. The network reads the scheduler's timestep σ_t · 1000
(not the index t).

Sampling on the training grid (docs/method.md §7). The stock FlowMatchEulerDiscreteScheduler steps
x' = x + (σ' − σ)·v. With x̂0 = x − σv and ε̂ = x + (1 − σ)v, the DDIM move of docs/method.md §2 is

    α' x̂0 + σ' ε̂ = (1 − σ')(x − σv) + σ'(x + (1 − σ)v) = x + (σ' − σ)·v,

the same update; the last step goes to σ' = 0, where x' = x − σv = x̂0. The teacher's own scheduler
config (shift s) shifts the `sigmas` it is given, so it is given the unshifted values
u = (τ + 1)/1000 (`training_sigmas`), which it maps to σ(u) = σ_τ, the path's sigma at each grid
index.

`FlowMatchingBackbone` holds these pieces and the loading every flow family does the same way:
the denoiser, the pipeline's text encoders (the pipeline without transformer, VAE and scheduler),
the VAE, and the stock pipeline with the student. An adapter names its classes
(`pipeline_class_names[0]`, `denoiser_class_name`, `vae_class_name`, `text_encoder_names`) and
overrides what its family does differently.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..path import GaussianPath
from .base import Backbone


def flow_path(scheduler) -> GaussianPath:
    """α_t = 1 − σ_t, σ_t = the scheduler's shifted training sigma of timestep t + 1 (docs/method.md §1)."""
    if scheduler.config.get("use_dynamic_shifting"):
        raise ValueError("this flow path needs a fixed shift (use_dynamic_shifting=False)")
    sigma = scheduler.sigmas.flip(0)
    if sigma.shape[0] != scheduler.config.num_train_timesteps:
        raise ValueError("expected the scheduler's training sigmas (set_timesteps was called?)")
    return GaussianPath.flow(sigma)


def sampling_scheduler(scheduler_config, **overrides):
    """The stock FlowMatchEulerDiscreteScheduler of the model, deterministic and without the
    schedule reshaping options (terminal stretch, Karras/exponential/beta sigmas) that would move
    a given sigma off the path; the resolution shift (dynamic or fixed) is kept unless
    `overrides` change it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(
        scheduler_config, invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, stochastic_sampling=False, **overrides)


class FlowMatchingBackbone(Backbone):
    """A flow-matching family (module docstring); no adapter by itself (no `name`)."""

    prediction_type = "flow"
    denoiser_class_name: str = ""                       # e.g. "SD3Transformer2DModel"
    vae_class_name: str = "AutoencoderKL"
    text_encoder_names: Sequence[str] = ("text_encoder",)   # pipeline components of the text

    @property
    def num_train_timesteps(self) -> int:
        """T of the path: the teacher scheduler's training timesteps (1000)."""
        return self.scheduler.config.num_train_timesteps

    def denoiser_class(self):
        import diffusers

        return getattr(diffusers, self.denoiser_class_name)

    # -- models ---------------------------------------------------------------------------
    def load_denoiser(self, dtype=torch.float32) -> torch.nn.Module:
        return self.denoiser_class().from_pretrained(
            self.model_path, subfolder=self.denoiser_subfolder, variant=self.variant, dtype=dtype,
            **self._load_kwargs())

    def load_text_encoders(self, device, dtype) -> None:
        """The pipeline's tokenizers and text encoders (`text_encoder_names`), without transformer,
        VAE and scheduler: its own encode_prompt then embeds prompts exactly as inference does."""
        self.text_pipeline = self.stock_pipeline_class().from_pretrained(
            self.model_path, transformer=None, vae=None, scheduler=None, dtype=dtype,
            variant=self.variant, **self._load_kwargs())
        for name in self.text_encoder_names:
            getattr(self.text_pipeline, name).requires_grad_(False).eval().to(device)

    def offload_text_encoders(self) -> None:
        for name in self.text_encoder_names:
            getattr(self.text_pipeline, name).to("cpu")

    def load_vae(self, device, dtype) -> None:
        import diffusers

        self.vae = getattr(diffusers, self.vae_class_name).from_pretrained(
            self.model_path, subfolder="vae", dtype=dtype, **self._load_kwargs())
        self.vae.requires_grad_(False).eval().to(device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """As the SD3 and FLUX pipelines: z / scaling_factor + shift_factor, then the VAE."""
        config = self.vae.config
        latents = latents.to(self.vae.dtype) / config.scaling_factor + config.shift_factor
        return (self.vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)

    # -- network call ---------------------------------------------------------------------
    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input for path indices t: the scheduler's timestep σ_t · 1000."""
        sigma = self.path.sigma.to(t.device)[t.long()]
        return sigma * self.num_train_timesteps

    # -- inference ------------------------------------------------------------------------
    def training_sigmas(self, timesteps: List[int]) -> List[float]:
        """The grid's unshifted sigmas u = (τ + 1)/1000, which the teacher's shift maps onto σ_τ."""
        total = self.num_train_timesteps
        return [(t + 1) / total for t in timesteps]

    def load_pipeline(self, dtype, weights=None, lora_scale: float = 1.0):
        """The stock pipeline with the student: a LoRA through the pipeline's own
        load_lora_weights / set_adapters (adapter "tdm" at `lora_scale`), or a full transformer
        folder as its `transformer`."""
        kind, location = weights if weights else (None, None)
        extra = {}
        if kind == "full":
            extra["transformer"] = self.denoiser_class().from_pretrained(location, dtype=dtype)
        pipe = self.stock_pipeline_class().from_pretrained(
            self.model_path, dtype=dtype, variant=self.variant, **self._load_kwargs(), **extra)
        if kind == "lora":
            pipe.load_lora_weights(location, adapter_name="tdm")
            pipe.set_adapters(["tdm"], [lora_scale])
        return pipe

    def use_training_grid(self, pipe, timesteps: List[int]) -> dict:
        """The exact training rollout with the stock FlowMatchEulerDiscreteScheduler on the grid's
        unshifted sigmas, at the teacher's fixed shift (docs/method.md §7; the Euler step is the
        DDIM move of §2, module docstring)."""
        pipe.scheduler = sampling_scheduler(self.scheduler.config, use_dynamic_shifting=False)
        return {"sigmas": self.training_sigmas(timesteps)}

    def pipeline_kwargs(self, num_frames: Optional[int] = None) -> dict:
        return {"max_sequence_length": self.max_sequence_length}
