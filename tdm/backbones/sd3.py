"""Stable Diffusion 3: SD3Transformer2DModel, rectified flow with the teacher's shifted sigmas,
three text encoders (two CLIP with pooled projections, one T5) (docs/method.md §1).

Time convention. `FlowMatchEulerDiscreteScheduler(shift=s)` holds, right after construction, the
training sigmas of the timesteps 1000, 999, …, 1: σ(u) = s·u / (1 + (s − 1)·u) with u = timestep/1000.
The path index t ∈ {0, …, 999} is the timestep t + 1, i.e. `sigmas` read backwards:

    σ_t = σ((t + 1)/1000),  α_t = 1 − σ_t,   so σ_999 = 1 (pure noise), σ_0 = σ(0.001) > 0.

A high index is more noise, as for the DDPM family, and T = 1000 puts the first step of the grid
999, 749, 499, 249 on pure noise exactly. α_999 = 0 is harmless: the flow conversion never divides
by α, and the transition of docs/method.md §3.5 divides by α_{t_e} only, with t_e ≤ τ_{K−1} + 1 < 999
for any grid whose first two steps are not 999, 998. The network reads the scheduler's timestep
σ_t · 1000 (not the index t).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..path import GaussianPath
from .base import Backbone

# The scheduler of the upstream TDM-SD3 snippet: DPMSolverMultistepScheduler loaded from
# Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers (subfolder "scheduler"), which is not
# reachable here; this is that scheduler_config.json rebuilt by hand (DPM-Solver++ order 2,
# flow sigmas, flow-prediction, final sigma 0). The snippet then sets flow_shift (1–6; 6 in it).
UPSTREAM_DPM_SOLVER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, solver_order=2, prediction_type="flow_prediction", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="dpmsolver++",
    solver_type="midpoint", lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
    use_flow_sigmas=True, flow_shift=3.0, final_sigmas_type="zero",
    lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace",
    steps_offset=0, rescale_betas_zero_snr=False)
UPSTREAM_FLOW_SHIFT = 6.0   # the value the upstream snippet sets for the TDM student


def flow_path(scheduler) -> GaussianPath:
    """α_t = 1 − σ_t, σ_t = the scheduler's shifted training sigma of timestep t + 1 (docs/method.md §1)."""
    if scheduler.config.get("use_dynamic_shifting"):
        raise ValueError("the SD3 adapter needs a fixed shift (use_dynamic_shifting=False)")
    sigma = scheduler.sigmas.flip(0)
    if sigma.shape[0] != scheduler.config.num_train_timesteps:
        raise ValueError("expected the scheduler's training sigmas (set_timesteps was called?)")
    return GaussianPath(1.0 - sigma, sigma)


class SD3Backbone(Backbone):
    name = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    prediction_type = "flow"
    # The joint blocks' attention projections (image and context streams), as in diffusers'
    # SD3 LoRA examples; StableDiffusion3Pipeline.load_lora_weights reads them back.
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0",
                           "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    max_sequence_length = 256   # T5 tokens, StableDiffusion3Pipeline's default
    step_embedding_site = "time_text_embed"     # timestep + pooled-text embedding

    def __init__(self, model_path: str, revision: Optional[str] = None,
                 variant: Optional[str] = None, options: Optional[dict] = None,
                 resolution: Optional[int] = None):
        super().__init__(model_path, revision, variant, options, resolution)
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            model_path, subfolder="scheduler", revision=revision)
        self.path = flow_path(self.scheduler)
        self.read_configs(SD3Transformer2DModel, AutoencoderKL)
        self.text_pipeline = None
        self.vae = None

    # -- models ---------------------------------------------------------------------------
    def load_denoiser(self, dtype=torch.float32) -> torch.nn.Module:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel.from_pretrained(
            self.model_path, subfolder=self.denoiser_subfolder, variant=self.variant, dtype=dtype,
            revision=self.revision)

    def load_text_encoders(self, device, dtype) -> None:
        """The pipeline's three tokenizers and text encoders, without transformer, VAE and
        scheduler: its own encode_prompt then embeds prompts exactly as inference does."""
        from diffusers import StableDiffusion3Pipeline

        self.text_pipeline = StableDiffusion3Pipeline.from_pretrained(
            self.model_path, transformer=None, vae=None, scheduler=None, dtype=dtype,
            variant=self.variant, revision=self.revision)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            getattr(self.text_pipeline, name).requires_grad_(False).eval().to(device)

    def offload_text_encoders(self) -> None:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            getattr(self.text_pipeline, name).to("cpu")

    def load_vae(self, device, dtype) -> None:
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(self.model_path, subfolder="vae", dtype=dtype,
                                                 revision=self.revision)
        self.vae.requires_grad_(False).eval().to(device)

    # -- data -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> dict:
        """{encoder_hidden_states: [B, 77 + L, D] (CLIP-L ‖ CLIP-G padded, then T5),
        pooled_projections: [B, P] (the two CLIP pooled projections side by side)}."""
        pipe = self.text_pipeline
        embeds, _, pooled, _ = pipe.encode_prompt(
            list(prompts), None, None, device=pipe.text_encoder.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    # The same 2-D latent geometry as PixArt (VAE factor × patch size): shared, not copied.

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """As StableDiffusion3Pipeline: z / scaling_factor + shift_factor, then the VAE."""
        config = self.vae.config
        latents = latents.to(self.vae.dtype) / config.scaling_factor + config.shift_factor
        return (self.vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)

    # -- network call ---------------------------------------------------------------------
    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input for path indices t: the scheduler's timestep σ_t · 1000."""
        sigma = self.path.sigma.to(t.device)[t.long()]
        return sigma * self.scheduler.config.num_train_timesteps

    def model_output(self, module, x_t, t, cond) -> torch.Tensor:
        """The velocity v = ε − x0 (path.x0_eps 'flow': x̂0 = x_t − σ v, ε̂ = x_t + α v)."""
        dtype = next(module.parameters()).dtype
        return module(hidden_states=x_t.to(dtype), timestep=self.timestep(t),
                      encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                      pooled_projections=cond["pooled_projections"].to(dtype),
                      return_dict=False)[0]

    # -- inference ------------------------------------------------------------------------
    def load_pipeline(self, dtype, weights=None, lora_scale: float = 1.0):
        """The stock StableDiffusion3Pipeline with the student: a LoRA through the pipeline's own
        load_lora_weights / set_adapters (as the upstream snippet), or a full transformer."""
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        kind, location = weights if weights else (None, None)
        extra = {}
        if kind == "full":
            extra["transformer"] = SD3Transformer2DModel.from_pretrained(location, dtype=dtype)
        pipe = StableDiffusion3Pipeline.from_pretrained(
            self.model_path, dtype=dtype, variant=self.variant, revision=self.revision, **extra)
        if kind == "lora":
            pipe.load_lora_weights(location, adapter_name="tdm")
            pipe.set_adapters(["tdm"], [lora_scale])
        return pipe

    def use_training_grid(self, pipe, timesteps: List[int]) -> dict:
        """The exact training rollout with the stock FlowMatchEulerDiscreteScheduler (docs/method.md §7).

        Its step is Euler: x' = x + (σ' − σ)·v. With x̂0 = x − σv and ε̂ = x + (1 − σ)v, the DDIM
        move of docs/method.md §2 is
            α' x̂0 + σ' ε̂ = (1 − σ')(x − σv) + σ'(x + (1 − σ)v) = x + (σ' − σ)·v,
        the same update; the last step goes to σ' = 0, where x' = x − σv = x̂0. The teacher's own
        scheduler config (shift s) shifts the `sigmas` it is given, so it is given the unshifted
        values u = (τ + 1)/1000, which it maps to σ(u) = σ_τ, the path's sigma at each grid index.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            self.scheduler.config, use_dynamic_shifting=False, invert_sigmas=False,
            shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
            use_beta_sigmas=False, stochastic_sampling=False)
        total = self.scheduler.config.num_train_timesteps
        return {"sigmas": [(t + 1) / total for t in timesteps]}

    def use_upstream_sampler(self, pipe, num_inference_steps: int, flow_shift: Optional[float] = None) -> dict:
        """The upstream TDM-SD3 sampler: DPM-Solver++(2M) with flow sigmas and `flow_shift`
        (default 6, the snippet's value), on UPSTREAM_DPM_SOLVER_CONFIG (the Sana scheduler
        config the snippet downloads, rebuilt locally)."""
        from diffusers import DPMSolverMultistepScheduler

        shift = UPSTREAM_FLOW_SHIFT if flow_shift is None else flow_shift
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            {**UPSTREAM_DPM_SOLVER_CONFIG, "flow_shift": shift})
        return {"num_inference_steps": num_inference_steps}

    def pipeline_kwargs(self, num_frames=None) -> dict:
        return {"max_sequence_length": self.max_sequence_length}
