"""Wan2.1 text-to-video: WanTransformer3DModel, flow matching, UMT5 text encoder, causal 3-D VAE
(AutoencoderKLWan), latents [C, F, H, W] per video as WanPipeline.prepare_latents makes them.

Path and shift (docs/method.md §1, rectified flow). Wan2.1 is a flow-matching model,
x_t = (1 − σ)·x0 + σ·ε, whose network reads σ·1000 and predicts the velocity v = ε − x0. The
released pipelines (Wan-AI/Wan2.1-T2V-*-Diffusers) sample with UniPCMultistepScheduler on flow
sigmas with `flow_shift` (3.0 at 480p, 5.0 at 720p); that scheduler's own ᾱ table is a DDPM one
that the model never used, so the path is not read from it. The line x_t = (1 − σ)x0 + σε is the
same for every shift; the shift only decides which σ each integer index t stands for. We take the
teacher's sampling shift s (scheduler config `flow_shift`, or `shift` for a
FlowMatchEulerDiscreteScheduler; `--backbone_options '{"flow_shift": s}'` overrides) and index the
path exactly as SD3 does (`flow.flow_path` on FlowMatchEulerDiscreteScheduler(shift=s)):

    σ_t = s·u / (1 + (s − 1)·u),  u = (t + 1)/1000,  α_t = 1 − σ_t,   σ_999 = 1,

so the student's steps and TDM's diffusion times sit where the teacher's own sampler spends its
steps at that resolution, and a grid whose first step is 999 starts on pure noise.

Sampling on the training grid (docs/method.md §7). The Euler step of the stock
FlowMatchEulerDiscreteScheduler, x' = x + (σ' − σ)·v, is the DDIM move of §2 (see
tdm/backbones/flow.py). WanPipeline.__call__ (diffusers 0.42) takes neither
`sigmas=` nor `timesteps=`: it calls `scheduler.set_timesteps(num_inference_steps, device=…)`, so
the grid's unshifted sigmas (τ + 1)/1000 are bound to that scheduler's own `set_timesteps`
(functools.partial) and the pipeline is called with num_inference_steps = K.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch

from .flow import FlowMatchingBackbone, flow_path

WAN_TEXT_LENGTH = 512    # UMT5 tokens: Wan2.1's text_len and WanPipeline's default max_sequence_length
WAN_NUM_FRAMES = 81      # WanPipeline's default length (the model card's 81 frames, 16 fps)


def flow_shift_of(scheduler_config: dict) -> float:
    """The sampling shift of a Wan scheduler config: `flow_shift` of UniPC/DPM-Solver on flow
    sigmas, `shift` of FlowMatchEulerDiscreteScheduler."""
    if "flow_shift" in scheduler_config:
        if not scheduler_config.get("use_flow_sigmas", False):
            raise ValueError(f"{scheduler_config.get('_class_name', 'the scheduler')} without "
                             "use_flow_sigmas is not a flow-matching scheduler")
        return float(scheduler_config["flow_shift"])
    if scheduler_config.get("use_dynamic_shifting"):
        raise ValueError("the Wan adapter needs a fixed shift (use_dynamic_shifting=False)")
    return float(scheduler_config.get("shift", 1.0))


class WanBackbone(FlowMatchingBackbone):
    name = "wan"
    pipeline_class_names = ("WanPipeline",)
    denoiser_class_name = "WanTransformer3DModel"
    # Self- and cross-attention projections of every block (attn1, attn2), the layers of
    # diffusers' Wan LoRA examples; WanPipeline.load_lora_weights reads them back.
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    max_sequence_length = WAN_TEXT_LENGTH
    # temb [B, dim]: input of both the blocks' time_proj and the output norm's shift/scale
    step_embedding_site = "condition_embedder.time_embedder"
    is_video = True

    def __init__(self, model_path: str, revision: Optional[str] = None,
                 variant: Optional[str] = None, options: Optional[dict] = None,
                 resolution: Optional[int] = None):
        super().__init__(model_path, revision, variant, options, resolution)
        import diffusers
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

        kw = self._load_kwargs()
        index = diffusers.DiffusionPipeline.load_config(model_path, **kw)
        if index.get("boundary_ratio") is not None or (index.get("transformer_2") or [None])[0]:
            raise ValueError("two-expert Wan pipelines (Wan2.2 A14B: transformer_2, boundary_ratio) "
                             "are not supported; the adapter distils one transformer (Wan2.1)")
        config = diffusers.UniPCMultistepScheduler.load_config(model_path, subfolder="scheduler", **kw)
        # the teacher's own sampler as shipped (UniPC for Wan2.1), for --sampler upstream
        self.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
        self.flow_shift = float(self.options.get("flow_shift", flow_shift_of(config)))
        self.path = flow_path(FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.num_train_timesteps, shift=self.flow_shift))
        self.denoiser_config = WanTransformer3DModel.load_config(
            model_path, subfolder=self.denoiser_subfolder, **kw)
        vae_config = AutoencoderKLWan.load_config(model_path, subfolder="vae", **kw)
        # older Wan2.1 VAE configs lack scale_factor_*: derive them as the VAE's blocks do
        self.vae_scale_factor = int(vae_config.get("scale_factor_spatial")
                                    or 2 ** (len(vae_config["dim_mult"]) - 1))
        self.vae_temporal_factor = int(vae_config.get("scale_factor_temporal")
                                       or 2 ** sum(vae_config["temperal_downsample"]))
        self.text_pipeline = None
        self.vae_pipeline = None

    # -- models ---------------------------------------------------------------------------
    # The denoiser: FlowMatchingBackbone's. The text encoder and the VAE are held by WanPipelines
    # built from their parts (WanPipeline has no component to leave out of from_pretrained).

    def load_text_encoders(self, device, dtype) -> None:
        """A WanPipeline holding only the tokenizer and the UMT5 encoder, so that training embeds
        prompts with the pipeline's own encode_prompt (prompt cleaning, zero padding), exactly
        as inference does."""
        from diffusers import WanPipeline
        from transformers import AutoTokenizer, UMT5EncoderModel

        kw = self._load_kwargs()
        tokenizer = AutoTokenizer.from_pretrained(self.model_path, subfolder="tokenizer", **kw)
        text_encoder = UMT5EncoderModel.from_pretrained(
            self.model_path, subfolder="text_encoder", variant=self.variant, dtype=dtype, **kw)
        text_encoder.requires_grad_(False).eval().to(device)
        self.text_pipeline = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None,
                                         scheduler=None, transformer=None)

    def load_vae(self, device, dtype) -> None:
        from diffusers import AutoencoderKLWan, WanPipeline

        vae = AutoencoderKLWan.from_pretrained(self.model_path, subfolder="vae", dtype=dtype,
                                               **self._load_kwargs())
        vae.requires_grad_(False).eval().to(device)
        self.vae_pipeline = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=None,
                                        transformer=None)

    # -- data -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> dict:
        """{encoder_hidden_states: [B, max_sequence_length, D]}: UMT5 states of the prompt's
        tokens, zero beyond them (WanPipeline.encode_prompt; the transformer has no text mask)."""
        pipe = self.text_pipeline
        embeds, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                       device=pipe.text_encoder.device,
                                       max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds}

    def image_size(self, resolution: int) -> tuple:
        """(height, width) in pixels: `--backbone_options` height/width (Wan2.1 is 480×832),
        else the square --resolution."""
        return int(self.options.get("height", resolution)), int(self.options.get("width", resolution))

    def num_frames(self, num_frames: Optional[int] = None) -> int:
        return num_frames or WAN_NUM_FRAMES

    def latent_frames(self, num_frames: Optional[int] = None) -> int:
        """(frames − 1)/temporal factor + 1: the causal VAE keeps the first frame on its own."""
        return (self.num_frames(num_frames) - 1) // self.vae_temporal_factor + 1

    def latent_shape(self, resolution: int, num_frames: Optional[int] = None) -> tuple:
        """(C, latent frames, h, w): one video of WanPipeline.prepare_latents' [B, C, F, H, W]."""
        height, width = self.image_size(resolution)
        return (self.denoiser_config["in_channels"], self.latent_frames(num_frames),
                height // self.vae_scale_factor, width // self.vae_scale_factor)

    def check_resolution(self, resolution: int, flag: str = "--resolution") -> None:
        """Height and width: multiples of VAE factor × patch (WanPipeline would silently round
        them down), and within the rotary table of `rope_max_seq_len` positions per axis."""
        _, patch_h, patch_w = self.denoiser_config["patch_size"]
        rope = self.denoiser_config.get("rope_max_seq_len", 1024)
        for what, side, patch in zip(("height", "width"), self.image_size(resolution), (patch_h, patch_w)):
            factor = self.vae_scale_factor * patch
            if side <= 0 or side % factor:
                below = side // factor * factor
                nearest = f"{below} or {below + factor}" if below > 0 else f"{factor}"
                raise ValueError(f"{what} {side} must be a multiple of {factor} (VAE factor "
                                 f"{self.vae_scale_factor} × patch size {patch}); use {nearest}")
            if side // factor > rope:
                raise ValueError(f"{what} {side} gives {side // factor} patches, more than the "
                                 f"transformer's {rope} rotary positions (rope_max_seq_len); use at "
                                 f"most {rope * factor}")

    def check_fit(self, args) -> None:
        """Model-fit checks, from the configs before any weight is loaded. Beyond the image size:
        `--num_frames` must be 4k + 1 for the causal VAE (temporal factor 4), its latent frames
        within the temporal patch and the rotary table; `--max_sequence_length` within Wan's 512
        UMT5 tokens (check_text_length). Each failure is one ValueError line: value, limit, fix."""
        super().check_fit(args)
        factor = self.vae_temporal_factor
        frames = self.num_frames(getattr(args, "num_frames", None))
        if frames < 1 or (frames - 1) % factor:
            below = max(1, (frames - 1) // factor * factor + 1)
            above = below + factor if frames > below else below
            options = f"{below} or {above}" if above != below else f"{below}"
            raise ValueError(f"--num_frames {frames} must be {factor}k + 1 for the VAE's temporal "
                             f"compression {factor}; use {options}")
        patch_t = self.denoiser_config["patch_size"][0]
        latent = self.latent_frames(frames)
        if latent % patch_t:
            raise ValueError(f"--num_frames {frames} gives {latent} latent frames, not a multiple of "
                             f"the temporal patch size {patch_t}")
        rope = self.denoiser_config.get("rope_max_seq_len", 1024)
        if latent // patch_t > rope:
            raise ValueError(f"--num_frames {frames} gives {latent // patch_t} latent frames, more "
                             f"than the transformer's {rope} rotary positions; use at most "
                             f"{(rope * patch_t - 1) * factor + 1}")
        self.check_text_length(getattr(args, "max_sequence_length", None))   # idempotent

    def check_text_length(self, tokens: Optional[int]) -> None:
        """Wan2.1 reads at most 512 UMT5 tokens (its text_len), fewer where the tokenizer's
        model_max_length says so."""
        if tokens is None:
            return
        tokenizer_limit = getattr(self, "text_token_limit", lambda: None)()
        limit = min(WAN_TEXT_LENGTH, tokenizer_limit or WAN_TEXT_LENGTH)
        if not 0 < tokens <= limit:
            raise ValueError(f"--max_sequence_length {tokens} is outside Wan's text capacity of "
                             f"{limit} UMT5 tokens; use 1 to {limit}")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """A cheap preview for the validation grid: the first latent frame, which the causal VAE
        decodes on its own to the video's first frame, de-normalised as WanPipeline does
        (z·latents_std + latents_mean); images [B, 3, H, W] in [0, 1]."""
        vae = self.vae_pipeline.vae
        first = latents[:, :, :1].to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=first.dtype, device=first.device).view(shape)
        std = torch.tensor(vae.config.latents_std, dtype=first.dtype, device=first.device).view(shape)
        video = vae.decode(first * std + mean, return_dict=False)[0]
        return (video[:, :, 0].float() / 2 + 0.5).clamp(0, 1)

    # -- network call ---------------------------------------------------------------------
    # The time input σ_t·1000: FlowMatchingBackbone.timestep.

    def network_output(self, module, x_t, t, cond) -> torch.Tensor:
        """The velocity v = ε − x0 (path.x0_eps 'flow': x̂0 = x_t − σv, ε̂ = x_t + αv); rotary
        positions are computed inside the transformer from the latent's shape."""
        dtype = next(module.parameters()).dtype
        return module(hidden_states=x_t.to(dtype), timestep=self.timestep(t),
                      encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                      return_dict=False)[0]

    # -- inference ------------------------------------------------------------------------
    # The stock WanPipeline with the student (its own load_lora_weights / set_adapters, or a full
    # transformer folder): FlowMatchingBackbone.load_pipeline.

    def training_grid_scheduler(self, timesteps: List[int]):
        """A stock FlowMatchEulerDiscreteScheduler with the path's shift whose `set_timesteps`
        is bound to the grid's unshifted sigmas (τ + 1)/1000; its own shift maps them onto σ_τ."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps,
                                                    shift=self.flow_shift)
        scheduler.set_timesteps = functools.partial(scheduler.set_timesteps,
                                                    sigmas=self.training_sigmas(timesteps))
        return scheduler

    def use_training_grid(self, pipe, timesteps: List[int]) -> dict:
        """The exact training rollout in the stock WanPipeline (docs/method.md §7): Euler on the
        grid's sigmas is the DDIM move of §2 (module docstring); the pipeline takes only
        num_inference_steps, so the grid travels with the scheduler."""
        pipe.scheduler = self.training_grid_scheduler(timesteps)
        return {"num_inference_steps": len(timesteps)}

    def use_upstream_sampler(self, pipe, num_inference_steps: int, flow_shift=None) -> dict:
        """No TDM snippet exists for Wan: the pipeline's own scheduler as shipped (Wan2.1:
        UniPC, flow sigmas), with `flow_shift` if given (--flow_shift), K uniform steps."""
        config = dict(self.scheduler.config)
        if flow_shift is not None:
            config["flow_shift" if "flow_shift" in config else "shift"] = flow_shift
        pipe.scheduler = type(self.scheduler).from_config(config)
        return {"num_inference_steps": num_inference_steps}

    def loading_snippet(self, weights_kind: str, student_location: str, timesteps: List[int],
                        num_frames: Optional[int] = None) -> str:
        """The model card's snippet (tdm.model_card) with the grid bound to the scheduler's
        set_timesteps, as `use_training_grid` does: WanPipeline takes no `sigmas=`."""
        from ..model_card import diffusers_snippet

        lines = diffusers_snippet(self, weights_kind, student_location, timesteps,
                                  imports=["import functools"],
                                  num_frames=num_frames).rstrip("\n").split("\n")
        at = next(i for i, line in enumerate(lines) if line.startswith("pipe.scheduler = "))
        sigmas = ", ".join(repr(round(u, 10)) for u in self.training_sigmas(timesteps))
        lines[at + 1:at + 1] = [
            "# the training grid (τ + 1)/1000, shifted by the scheduler; WanPipeline takes no sigmas=",
            f"pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps, "
            f"sigmas=[{sigmas}])"]
        return "\n".join(lines) + "\n"

    def pipeline_kwargs(self, num_frames: Optional[int] = None) -> dict:
        return {"num_frames": self.num_frames(num_frames),
                "max_sequence_length": self.max_sequence_length}
