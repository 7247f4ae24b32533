"""Stable Diffusion 1.x (Dreamshaper-7 by default): UNet2DConditionModel, one CLIP text encoder,
the prediction type of the scheduler config (ε for SD1.5), DDPM table with scaled_linear betas
(docs/method.md §1). The unconditional branch of the teacher is the empty prompt (docs/method.md §5)."""
from __future__ import annotations

from typing import List, Optional

import torch

from ..path import GaussianPath
from .base import Backbone

# Attention and feed-forward projections of the UNet's transformer blocks, plus the linear/1×1
# projections around them: the module names diffusers' SD LoRA loaders and kohya's names cover.
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                     "proj_in", "proj_out"]


class StableDiffusionBackbone(Backbone):
    name = "sd15"
    pipeline_class_names = ("StableDiffusionPipeline",)
    pipeline_class = "StableDiffusionPipeline"
    lora_prefix = "unet"
    denoiser_subfolder = "unet"
    lora_target_modules = UNET_LORA_TARGETS
    # pipeline component name -> transformers class, in the pipeline's encode_prompt order
    text_components = {"tokenizer": "CLIPTokenizer", "text_encoder": "CLIPTextModel"}

    def __init__(self, model_path: str, revision: Optional[str] = None,
                 variant: Optional[str] = None, options: Optional[dict] = None,
                 resolution: Optional[int] = None):
        super().__init__(model_path, revision, variant, options, resolution)
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        kw = self._load_kwargs()
        # Whatever scheduler the pipeline ships (PNDM, Euler, DPM-Solver …), its betas give ᾱ_t.
        self.scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", **kw)
        self.prediction_type = self.scheduler.config.prediction_type
        self.path = GaussianPath.from_scheduler(self.scheduler)
        self.read_configs(UNet2DConditionModel, AutoencoderKL)
        if self.resolution is None:   # the UNet's own size
            self.resolution = self.denoiser_config["sample_size"] * self.vae_scale_factor
        self.text_pipeline = None
        self.vae = None

    def _pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    # -- models ---------------------------------------------------------------------------
    def load_denoiser(self, dtype=torch.float32) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(self.model_path, subfolder="unet",
                                                    variant=self.variant, dtype=dtype,
                                                    **self._load_kwargs())

    def load_text_encoders(self, device, dtype) -> None:
        """Tokenizers and text encoders in a pipeline without UNet/VAE, so that training embeds
        prompts with the same `encode_prompt` as the stock pipeline at inference."""
        import transformers

        kw = self._load_kwargs()
        parts = {}
        for name, class_name in self.text_components.items():
            cls = getattr(transformers, class_name)
            if "tokenizer" in name:
                parts[name] = cls.from_pretrained(self.model_path, subfolder=name, **kw)
            else:
                parts[name] = cls.from_pretrained(self.model_path, subfolder=name, dtype=dtype,
                                                  variant=self.variant, **kw)
                parts[name].requires_grad_(False).eval().to(device)
        self.text_pipeline = self._pipeline_cls()(vae=None, unet=None, scheduler=None,
                                                  **parts, **self._text_pipeline_extras())

    def offload_text_encoders(self) -> None:
        for name in self.text_components:
            if name.startswith("text_encoder"):
                getattr(self.text_pipeline, name).to("cpu")

    def _text_pipeline_extras(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def load_vae(self, device, dtype) -> None:
        """The VAE for validation images; kept in fp32 where its config asks to be upcast."""
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(self.model_path, subfolder="vae", **self._load_kwargs())
        if not self.vae.config.get("force_upcast", False):
            self.vae.to(dtype)
        self.vae.requires_grad_(False).eval().to(device)

    # -- data -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> dict:
        embeds, _ = self.text_pipeline.encode_prompt(list(prompts), device=self._text_device(),
                                                     num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds}

    def _text_device(self):
        return self.text_pipeline.text_encoder.device

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return (self.vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)

    # -- network call ---------------------------------------------------------------------
    def added_cond_kwargs(self, cond: dict, dtype) -> Optional[dict]:
        """SDXL's pooled text embeddings and time ids; none for SD1.x."""
        return None

    def network_output(self, module, x_t, t, cond) -> torch.Tensor:
        """The UNet's raw prediction; t are the integer DDPM timesteps the UNet embeds."""
        dtype = next(module.parameters()).dtype
        return module(x_t.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                      added_cond_kwargs=self.added_cond_kwargs(cond, dtype), return_dict=False)[0]

    # -- inference ------------------------------------------------------------------------
    def load_pipeline(self, dtype, weights=None, lora_scale: float = 1.0):
        """The stock pipeline; a LoRA (diffusers or kohya file) through `load_lora_weights` as
        adapter "tdm" at `lora_scale`, a full student as the `unet=` component."""
        from diffusers import UNet2DConditionModel

        kind, location = weights if weights else (None, None)
        components = {}
        if kind == "full":
            components["unet"] = UNet2DConditionModel.from_pretrained(location, dtype=dtype)
        pipe = self._pipeline_cls().from_pretrained(self.model_path, dtype=dtype, variant=self.variant,
                                                    **components, **self._load_kwargs())
        if kind == "lora":
            # use_safetensors: read rank/alpha from the file header (see README, PixArt section)
            pipe.load_lora_weights(location, adapter_name="tdm", use_safetensors=True)
            pipe.set_adapters(["tdm"], [lora_scale])
        return pipe
