"""FLUX.1 (dev and schnell): FluxTransformer2DModel, rectified flow with the scheduler's shift at
the training resolution, packed 2×2 latents, T5 + pooled CLIP text, and for FLUX.1-dev the
guidance embedding (docs/method.md §1, §5.1).

Path. FLUX.1-dev's FlowMatchEulerDiscreteScheduler shifts by resolution (use_dynamic_shifting):
FluxPipeline computes μ = calculate_shift(image tokens) from the number of packed image tokens
(H/16 · W/16) and maps a sigma u to σ(u) = e^μ / (e^μ + 1/u − 1), which is the fixed shift
s·u / (1 + (s − 1)·u) with s = e^μ. The path is therefore fixed per training resolution: μ of
`--resolution`, computed exactly as FluxPipeline does, and

    σ_t = the scheduler's σ((t + 1)/1000) under that μ,  α_t = 1 − σ_t,

so σ_999 = 1 (pure noise), as for SD3 (tdm/backbones/flow.py explains the index convention).
FLUX.1-schnell's scheduler has a fixed shift (1: no shift) and ignores μ: the same code gives its
path. The stock FluxPipeline sampling at the training resolution computes the same μ, so given
the grid as `sigmas=[(τ + 1)/1000]` it steps on exactly the training sigmas (`use_training_grid`);
at another resolution it applies FLUX's own shift for that resolution.

Latents are kept in the VAE's unpacked layout [16, H/8, W/8] (what `latent_shape` gives and
`decode` reads); `model_output` packs them into 2×2 patches (FluxPipeline._pack_latents), builds
the image/text position ids from the shapes (FluxPipeline._prepare_latent_image_ids; text ids are
zeros) and unpacks the velocity. FluxPipeline's `latents=` argument and `output_type="latent"`
are packed: pack/unpack with the same two static methods.

Guidance. A FLUX.1-dev transformer (config guidance_embeds=True) takes the guidance scale as an
input instead of running classifier-free guidance. The condition may carry it under the key
`guidance` ([B], the teacher's target of docs/method.md §5.1 does); without it the network gets
`student_guidance` (default 1.0), the fixed value the student and the fake score see, which the
stock pipeline must be given as `guidance_scale` at inference.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..method import GUIDANCE   # the condition key of the guidance value
from ..path import GaussianPath
from .flow import FlowMatchingBackbone, sampling_scheduler

DEFAULT_STUDENT_GUIDANCE = 1.0  # docs/method.md §5.1: the student samples with guidance 1 (§7)
T5_LIMIT = 512                  # FluxPipeline.check_inputs refuses longer T5 sequences


def image_seq_len(height: int, width: int, vae_scale_factor: int) -> int:
    """Packed image tokens of an image: (H / (VAE factor · 2)) · (W / (VAE factor · 2))."""
    factor = vae_scale_factor * 2
    return (height // factor) * (width // factor)


def shift_mu(scheduler_config, seq_len: int) -> float:
    """μ of FluxPipeline for `seq_len` image tokens (its own calculate_shift and config keys)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(seq_len, scheduler_config.get("base_image_seq_len", 256),
                           scheduler_config.get("max_image_seq_len", 4096),
                           scheduler_config.get("base_shift", 0.5),
                           scheduler_config.get("max_shift", 1.15))


def flux_path(scheduler_config, mu: float) -> GaussianPath:
    """α_t = 1 − σ_t, σ_t = the scheduler's shifted sigma of u = (t + 1)/1000 under `mu`
    (docs/method.md §1), computed by the scheduler's own set_timesteps, so that the stock pipeline
    given those u reproduces it bit for bit."""
    scheduler = sampling_scheduler(scheduler_config)
    total = scheduler.config.num_train_timesteps
    scheduler.set_timesteps(sigmas=[(t + 1) / total for t in range(total)], mu=mu)
    sigma = scheduler.sigmas[:total].float()   # the appended terminal 0 dropped
    return GaussianPath.flow(sigma)


class FluxBackbone(FlowMatchingBackbone):
    name = "flux"
    pipeline_class_names = ("FluxPipeline",)
    denoiser_class_name = "FluxTransformer2DModel"
    text_encoder_names = ("text_encoder", "text_encoder_2")   # CLIP (pooled) and T5
    # The attention projections of both block kinds (double-stream: image and context streams;
    # single-stream: to_q/k/v), as in diffusers' FLUX LoRA examples; FluxPipeline.load_lora_weights
    # reads them back.
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0",
                           "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    max_sequence_length = T5_LIMIT   # T5 tokens, FluxPipeline's default
    step_embedding_site = "time_text_embed"     # timestep (+ guidance) + pooled-text embedding

    def __init__(self, model_path: str, revision: Optional[str] = None,
                 variant: Optional[str] = None, options: Optional[dict] = None,
                 resolution: Optional[int] = None):
        super().__init__(model_path, revision, variant, options, resolution)
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            model_path, subfolder="scheduler", revision=revision)
        self.read_configs(FluxTransformer2DModel, AutoencoderKL)
        # FluxPipeline's default size: default_sample_size 128 × the VAE factor (1024 px)
        size = resolution or 128 * self.vae_scale_factor
        self.mu = shift_mu(self.scheduler.config, image_seq_len(size, size, self.vae_scale_factor))
        self.path = flux_path(self.scheduler.config, self.mu)
        # docs/method.md §5.1: a guidance-distilled teacher (FLUX.1-dev) is guided through its
        # embedding; `set_guidance` applies --guidance_embedding / --student_guidance.
        self.has_guidance_embedding = bool(self.denoiser_config.get("guidance_embeds"))
        self.guidance_embedding = self.has_guidance_embedding
        self.student_guidance = DEFAULT_STUDENT_GUIDANCE
        self.text_pipeline = None
        self.vae = None

    # -- limits ---------------------------------------------------------------------------
    def check_resolution(self, resolution: int, flag: str = "--resolution") -> None:
        """Packing takes 2×2 latent patches: a multiple of VAE factor × 2 (16 for FLUX.1)."""
        factor = self.vae_scale_factor * 2
        if resolution <= 0 or resolution % factor:
            raise ValueError(f"{flag} {resolution} must be a multiple of {factor} (VAE factor "
                             f"{self.vae_scale_factor} × 2 for FLUX's 2×2 packing); use "
                             f"{max(factor, round(resolution / factor) * factor)}")

    def text_token_limit(self) -> int:
        """The T5 tokenizer's model_max_length (tokenizer_2: `tokenizer` is CLIP's, 77), at most
        FluxPipeline's 512; Backbone.check_fit checks `--max_sequence_length` against it."""
        config = self._read_json("tokenizer_2", "tokenizer_config.json") or {}
        return min(T5_LIMIT, int(config.get("model_max_length") or T5_LIMIT))

    def sampling_guidance(self) -> float:
        """FLUX.1-dev: the guidance input the student was trained with (docs/method.md §5.1),
        which FluxPipeline takes as `guidance_scale`; schnell: 1."""
        return self.student_guidance if self.has_guidance_embedding else 1.0

    def set_guidance(self, embedding: Optional[bool], student_guidance: Optional[float]) -> bool:
        """docs/method.md §5.1: `--guidance_embedding on` and `--student_guidance` need a
        guidance-embedded model (FLUX.1-dev); off runs classifier-free guidance on it. Sets the
        fixed guidance of student and fake score; returns the teacher's mode."""
        if embedding and not self.has_guidance_embedding:
            raise ValueError("--guidance_embedding on needs a guidance-distilled model (transformer "
                             "config guidance_embeds=True, FLUX.1-dev); this model has none: use "
                             "--guidance_embedding auto (classifier-free guidance with --cfg)")
        if student_guidance is not None and not self.has_guidance_embedding:
            raise ValueError(f"--student_guidance {student_guidance:g} needs a guidance-embedded "
                             "model (FLUX.1-dev); this model has no guidance input: drop the flag")
        if embedding is not None:
            self.guidance_embedding = bool(embedding)
        if student_guidance is not None:
            self.student_guidance = float(student_guidance)
        return self.guidance_embedding

    # Models, text encoders, VAE, decode (z / scaling_factor + shift_factor, as FluxPipeline after
    # unpacking) and the stock pipeline with the student: FlowMatchingBackbone's.

    # -- data -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> dict:
        """{prompt_embeds: [B, L, D] (T5), pooled_prompt_embeds: [B, P] (CLIP pooled)}; the text
        ids (zeros, not batch-first) are rebuilt from L in `model_output`."""
        pipe = self.text_pipeline
        embeds, pooled, _ = pipe.encode_prompt(
            list(prompts), None, device=pipe.text_encoder.device,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def latent_shape(self, resolution: int, num_frames: Optional[int] = None) -> tuple:
        """Unpacked: (in_channels / 4, H / VAE factor, W / VAE factor), FluxPipeline's
        num_channels_latents and latent size."""
        size = resolution // self.vae_scale_factor
        return (self.denoiser_config["in_channels"] // 4, size, size)

    # -- network call ---------------------------------------------------------------------
    def timestep(self, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """The transformer's time input for path indices t as FluxPipeline computes it: the
        scheduler's timestep σ_t · 1000 in the latent dtype, divided by 1000."""
        return super().timestep(t).to(dtype) / self.num_train_timesteps

    def guidance(self, cond: dict, batch: int, device) -> Optional[torch.Tensor]:
        """The guidance input ([B], float32 as in FluxPipeline): the condition's `guidance`, else
        `student_guidance`; None for a model without guidance embedding."""
        if not self.has_guidance_embedding:
            return None
        if GUIDANCE in cond:
            return cond[GUIDANCE].float()
        return torch.full((batch,), self.student_guidance, device=device, dtype=torch.float32)

    def network_output(self, module, x_t, t, cond) -> torch.Tensor:
        """The velocity v = ε − x0 in the unpacked layout (path.x0_eps 'flow')."""
        from diffusers import FluxPipeline

        dtype = next(module.parameters()).dtype
        batch, channels, height, width = x_t.shape
        embeds = cond["prompt_embeds"].to(dtype)
        packed = FluxPipeline._pack_latents(x_t.to(dtype), batch, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2,
                                                         x_t.device, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=dtype)
        out = module(hidden_states=packed, timestep=self.timestep(t, dtype),
                     guidance=self.guidance(cond, batch, x_t.device),
                     pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
                     encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids,
                     return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, height * self.vae_scale_factor,
                                            width * self.vae_scale_factor, self.vae_scale_factor)

    # -- inference ------------------------------------------------------------------------
    def use_training_grid(self, pipe, timesteps: List[int]) -> dict:
        """The exact training rollout with the stock FlowMatchEulerDiscreteScheduler (docs/method.md
        §7): its Euler step x + (σ' − σ)·v is the DDIM move of §2 (tdm/backbones/flow.py),
        ending at σ' = 0 with x̂0. The pipeline is given the unshifted u = (τ + 1)/1000 and shifts
        them itself with μ of the image size it samples, which at the training resolution is the
        path's μ: σ(u) = σ_τ exactly."""
        pipe.scheduler = sampling_scheduler(self.scheduler.config)
        return {"sigmas": self.training_sigmas(timesteps)}

    def use_upstream_sampler(self, pipe, num_inference_steps: int, flow_shift: Optional[float] = None) -> dict:
        """No TDM release covers FLUX: the stock pipeline's own sampler (FlowMatch Euler on
        linspace(1, 1/K, K) with the model's resolution shift); `flow_shift` replaces that shift
        by a fixed one."""
        if flow_shift is not None:
            pipe.scheduler = sampling_scheduler({**self.scheduler.config, "shift": flow_shift,
                                                 "use_dynamic_shifting": False})
        return {"num_inference_steps": num_inference_steps}
