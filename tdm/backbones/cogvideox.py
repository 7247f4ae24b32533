"""CogVideoX (text-to-video): CogVideoXTransformer3DModel, v-prediction on a zero-terminal-SNR
path whose ᾱ table is the CogVideoX scheduler's own (SNR shift, then rescale; docs/method.md §1), T5
text encoder without attention mask, latents [F, C, H, W] per video, rotary position embeddings
(CogVideoX-5B) computed as CogVideoXPipeline computes them."""
from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional

import torch

from ..path import GaussianPath
from .base import Backbone

# The smallest 1 − β a float32 table holds: ᾱ_999 = 0 would give the stock DPM-Solver an
# infinite σ/α, so the last step keeps ᾱ_999 = ᾱ_998·2⁻²⁴ (α_999 < 1e-7 for CogVideoX-2B).
_MIN_ONE_MINUS_BETA = 2.0 ** -24


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> List[float]:
    """β_t = 1 − ᾱ_t/ᾱ_{t−1} (ᾱ_{−1} = 1), clamped below 1 (see _MIN_ONE_MINUS_BETA), so that a
    scheduler built from `trained_betas` has the same ᾱ table up to float32 rounding."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    previous = torch.cat([ac.new_ones(1), ac[:-1]])
    return (1.0 - ac / previous).clamp(max=1.0 - _MIN_ONE_MINUS_BETA).tolist()


class CogVideoXBackbone(Backbone):
    name = "cogvideox"
    pipeline_class_names = ("CogVideoXPipeline",)
    prediction_type = "v_prediction"
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    is_video = True

    def __init__(self, model_path: str, revision: Optional[str] = None,
                 variant: Optional[str] = None, options: Optional[dict] = None,
                 resolution: Optional[int] = None):
        super().__init__(model_path, revision, variant, options, resolution)
        import diffusers
        from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler,
                               CogVideoXTransformer3DModel)

        kw = self._load_kwargs()
        config = CogVideoXDDIMScheduler.load_config(model_path, subfolder="scheduler", **kw)
        # CogVideoXDDIMScheduler (2B) or CogVideoXDPMScheduler (5B): both shift the SNR before
        # the zero-SNR rescale, so the path must come from their own alphas_cumprod.
        self.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
        self.prediction_type = self.scheduler.config.prediction_type
        self.path = GaussianPath.from_scheduler(self.scheduler)
        vae_config = self.read_configs(CogVideoXTransformer3DModel, AutoencoderKLCogVideoX)
        self.max_sequence_length = self.denoiser_config["max_text_seq_length"]
        self.vae_temporal_factor = vae_config["temporal_compression_ratio"]
        self.text_pipeline = None
        self.vae_pipeline = None

    # -- models ---------------------------------------------------------------------------
    def load_denoiser(self, dtype=torch.float32) -> torch.nn.Module:
        from diffusers import CogVideoXTransformer3DModel

        return CogVideoXTransformer3DModel.from_pretrained(
            self.model_path, subfolder="transformer", variant=self.variant, dtype=dtype,
            **self._load_kwargs())

    def load_text_encoders(self, device, dtype) -> None:
        from diffusers import CogVideoXPipeline

        self.text_pipeline = self.t5_text_pipeline(CogVideoXPipeline, device, dtype)

    def load_vae(self, device, dtype) -> None:
        from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline

        vae = AutoencoderKLCogVideoX.from_pretrained(self.model_path, subfolder="vae", dtype=dtype,
                                                     **self._load_kwargs())
        vae.requires_grad_(False).eval().to(device)
        self.vae_pipeline = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                              transformer=None, scheduler=None)

    # -- data -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> dict:
        device = self.text_pipeline.text_encoder.device
        embeds, _ = self.text_pipeline.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=device,
            max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds}

    def image_size(self, resolution: int) -> tuple:
        """(height, width) in pixels: `--backbone_options` height/width (CogVideoX is 480×720),
        else the square --resolution."""
        return int(self.options.get("height", resolution)), int(self.options.get("width", resolution))

    def num_frames(self, num_frames: Optional[int] = None) -> int:
        return num_frames or self.denoiser_config["sample_frames"]

    def latent_shape(self, resolution: int, num_frames: Optional[int] = None) -> tuple:
        """(latent frames, C, h, w), the per-video shape of the pipeline's [B, F, C, H, W]
        latents; CogVideoX 1.5 (patch_size_t) pads the frames as the pipeline does."""
        frames = (self.num_frames(num_frames) - 1) // self.vae_temporal_factor + 1
        patch_t = self.denoiser_config.get("patch_size_t")
        if patch_t:
            frames += -frames % patch_t
        height, width = self.image_size(resolution)
        return (frames, self.denoiser_config["in_channels"], height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def check_fit(self, args) -> None:
        """As every family, and: frames 4k + 1 (the VAE's temporal compression); the text exactly
        the length the transformer's joint positional table holds; learned positions (5B I2V)
        only at the model's own size."""
        frames, factor = self.num_frames(args.num_frames), self.vae_temporal_factor
        if frames < 1 or (frames - 1) % factor:
            below = max((frames - 1) // factor * factor + 1, 1)
            raise ValueError(f"--num_frames {frames}: the VAE compresses time by {factor}, so "
                             f"frames must be {factor}k + 1; use {below} or {below + factor}")
        config = self.denoiser_config
        if config.get("use_learned_positional_embeddings"):
            size = (config["sample_height"] * self.vae_scale_factor,
                    config["sample_width"] * self.vae_scale_factor)
            if self.image_size(args.resolution) != size:
                raise ValueError(f"this CogVideoX has learned positions for {size[0]}×{size[1]} "
                                 "only; set --backbone_options height/width to that size")
        super().check_fit(args)

    def check_text_length(self, tokens: Optional[int]) -> None:
        capacity = self.denoiser_config["max_text_seq_length"]
        if tokens is not None and tokens != capacity and (
                self.denoiser_config.get("use_positional_embeddings", True)
                or self.denoiser_config.get("use_learned_positional_embeddings")):
            raise ValueError(f"--max_sequence_length {tokens}: this CogVideoX's positional table "
                             f"holds exactly {capacity} text tokens; use {capacity} (or drop the flag)")

    def check_resolution(self, resolution: int, flag: str = "--resolution") -> None:
        factor = self.vae_scale_factor * self.denoiser_config["patch_size"]
        for side in self.image_size(resolution):
            if side <= 0 or side % factor:
                raise ValueError(f"height and width must be multiples of {factor} (VAE factor "
                                 f"{self.vae_scale_factor} × patch size "
                                 f"{self.denoiser_config['patch_size']}), got {side}")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """A cheap preview for the validation grid: the first latent frame decoded on its own
        (the causal VAE's first video frame), as images [B, 3, H, W] in [0, 1]."""
        vae = self.vae_pipeline.vae
        frames = self.vae_pipeline.decode_latents(latents[:, :1].to(vae.dtype))
        return (frames[:, :, 0].float() / 2 + 0.5).clamp(0, 1)

    # -- network call ---------------------------------------------------------------------
    def rotary_embeddings(self, x_t: torch.Tensor):
        """cos/sin tables for latents x_t [B, F, C, h, w], from CogVideoXPipeline's own
        `_prepare_rotary_positional_embeddings`; None where the model has no rotary positions."""
        if not self.denoiser_config.get("use_rotary_positional_embeddings"):
            return None
        from diffusers import CogVideoXPipeline

        frames, _, height, width = x_t.shape[1:]
        pipeline_view = SimpleNamespace(vae_scale_factor_spatial=self.vae_scale_factor,
                                        transformer=SimpleNamespace(config=SimpleNamespace(
                                            **self.denoiser_config)))
        return CogVideoXPipeline._prepare_rotary_positional_embeddings(
            pipeline_view, height * self.vae_scale_factor, width * self.vae_scale_factor, frames,
            x_t.device)

    def network_output(self, module, x_t, t, cond) -> torch.Tensor:
        """The transformer's v-prediction; `t` is the scheduler's integer timestep as the
        pipeline passes it."""
        dtype = next(module.parameters()).dtype
        return module(hidden_states=x_t.to(dtype), timestep=t,
                      encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                      image_rotary_emb=self.rotary_embeddings(x_t), return_dict=False)[0]

    # -- inference ------------------------------------------------------------------------
    def load_pipeline(self, dtype, weights=None, lora_scale: float = 1.0):
        """The stock CogVideoXPipeline with the student: a LoRA through its own
        `load_lora_weights` (adapter "tdm" at `lora_scale`), or a full transformer folder."""
        from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

        kind, location = weights if weights else (None, None)
        extra = {}
        if kind == "full":
            extra["transformer"] = CogVideoXTransformer3DModel.from_pretrained(location, dtype=dtype)
        pipe = CogVideoXPipeline.from_pretrained(self.model_path, dtype=dtype, variant=self.variant,
                                                 **extra, **self._load_kwargs())
        if kind == "lora":
            pipe.load_lora_weights(location, adapter_name="tdm")
            pipe.set_adapters(["tdm"], [lora_scale])
        return pipe

    def use_training_grid(self, pipe, timesteps: List[int]) -> dict:
        """First-order DPM-Solver++ (the DDIM update of docs/method.md §2, see
        `sampling.exact_grid_scheduler`) on the CogVideoX ᾱ table passed as `trained_betas`:
        DPMSolverMultistepScheduler knows no SNR shift, and CogVideoXDDIMScheduler takes no
        custom timesteps."""
        from ..sampling import exact_grid_scheduler

        config = dict(self.scheduler.config, rescale_betas_zero_snr=False,
                      trained_betas=betas_from_alphas_cumprod(self.scheduler.alphas_cumprod))
        pipe.scheduler = exact_grid_scheduler(config)
        return {"timesteps": list(timesteps)}

    def use_upstream_sampler(self, pipe, num_inference_steps: int, flow_shift=None) -> dict:
        """The upstream snippet samples with the pipeline's own scheduler as loaded
        (CogVideoX-2B: CogVideoXDDIMScheduler, trailing spacing)."""
        pipe.scheduler = type(self.scheduler).from_config(self.scheduler.config)
        return {"num_inference_steps": num_inference_steps}

    def pipeline_kwargs(self, num_frames: Optional[int] = None) -> dict:
        return {"num_frames": self.num_frames(num_frames),
                "max_sequence_length": self.max_sequence_length}

    def loading_snippet(self, weights_kind: str, student_location: str, timesteps: List[int],
                        num_frames: Optional[int] = None) -> str:
        """The generic snippet with the ᾱ table as `trained_betas` computed from the pipeline's own
        scheduler in the snippet (as `use_training_grid` does) instead of a list of 1000 values."""
        import re

        snippet = super().loading_snippet(weights_kind, student_location, timesteps, num_frames)
        lines = [re.sub(r"trained_betas=\[[^\]]*\]", "trained_betas=betas", line)
                 if line.startswith("pipe.scheduler = ") else line for line in snippet.split("\n")]
        at = next(i for i, line in enumerate(lines) if line.startswith("pipe.scheduler = "))
        lines[at:at] = [
            "ac = pipe.scheduler.alphas_cumprod.double()   # the SNR-shifted, zero-SNR table of training",
            "betas = (1 - ac / torch.cat([ac.new_ones(1), ac[:-1]]))"
            f".clamp(max=1 - {_MIN_ONE_MINUS_BETA!r}).tolist()"]
        return "\n".join(lines)
