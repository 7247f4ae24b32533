"""PixArt-α: PixArtTransformer2DModel, ε-prediction with learned-sigma channels, T5 text
encoder with attention mask, DDPM table with linear betas (docs/method.md §1)."""
from __future__ import annotations

from typing import List, Optional

import torch

from ..path import GaussianPath
from .base import Backbone


def _transformer_with_lora_loader():
    """PixArtTransformer2DModel with diffusers' PEFT mixin, which this diffusers leaves out of
    the class: it adds load_lora_adapter / set_adapters / disable_adapters and nothing else."""
    from diffusers import PixArtTransformer2DModel
    from diffusers.loaders import PeftAdapterMixin

    class PixArtTransformer2DModelWithLoRA(PixArtTransformer2DModel, PeftAdapterMixin):
        pass

    return PixArtTransformer2DModelWithLoRA


class PixArtBackbone(Backbone):
    name = "pixart"
    pipeline_class_names = ("PixArtAlphaPipeline",)
    prediction_type = "epsilon"
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    step_embedding_site = "adaln_single.emb"     # timestep (+ size) embedding before adaLN
    max_sequence_length = 120

    def __init__(self, model_path: str, revision: Optional[str] = None,
                 variant: Optional[str] = None, options: Optional[dict] = None,
                 resolution: Optional[int] = None):
        super().__init__(model_path, revision, variant, options, resolution)
        from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel

        kw = self._load_kwargs()
        self.scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", **kw)
        self.path = GaussianPath.from_scheduler(self.scheduler)
        self.read_configs(PixArtTransformer2DModel, AutoencoderKL)
        self.text_pipeline = None
        self.vae = None

    # -- models ---------------------------------------------------------------------------
    def load_denoiser(self, dtype=torch.float32) -> torch.nn.Module:
        from diffusers import PixArtTransformer2DModel

        return PixArtTransformer2DModel.from_pretrained(
            self.model_path, subfolder="transformer", variant=self.variant, dtype=dtype,
            **self._load_kwargs())

    def load_text_encoders(self, device, dtype) -> None:
        """The stock pipeline's own encode_prompt, as inference (docs/method.md §7)."""
        self.text_pipeline = self.t5_text_pipeline(self.stock_pipeline_class(), device, dtype)

    def offload_text_encoders(self) -> None:
        self.text_pipeline.text_encoder.to("cpu")

    def load_vae(self, device, dtype) -> None:
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(self.model_path, subfolder="vae",
                                                 dtype=dtype, **self._load_kwargs())
        self.vae.requires_grad_(False).eval().to(device)

    # -- data -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> dict:
        device = self.text_pipeline.text_encoder.device
        embeds, mask, _, _ = self.text_pipeline.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=device, clean_caption=False,
            max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return (self.vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)

    # -- network call ---------------------------------------------------------------------
    def network_output(self, module, x_t, t, cond) -> torch.Tensor:
        """ε and, with learned σ (out_channels = 2 × in_channels), the variance channels."""
        dtype = next(module.parameters()).dtype
        return module(x_t.to(dtype), timestep=t,
                      encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                      encoder_attention_mask=cond["encoder_attention_mask"],
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                      return_dict=False)[0]

    def model_output(self, module, x_t, t, cond) -> torch.Tensor:
        out = self.network_output(module, x_t, t, cond)
        if out.shape[1] == 2 * x_t.shape[1]:   # learned sigma: keep the ε channels
            out = out.chunk(2, dim=1)[0]
        return out

    # -- inference ------------------------------------------------------------------------
    def load_pipeline(self, dtype, weights=None, lora_scale: float = 1.0):
        """The stock pipeline (`pipeline_class_names[0]`: PixArtAlphaPipeline) with the student.
        The PixArt pipelines have no LoRA loader, so the transformer is loaded as a subclass with
        diffusers' PEFT mixin and the LoRA goes in through `transformer.load_lora_adapter`."""
        from diffusers import PixArtTransformer2DModel

        kind, location = weights if weights else (None, None)
        kw = self._load_kwargs()
        if kind == "full":
            transformer = PixArtTransformer2DModel.from_pretrained(location, dtype=dtype)
        else:
            transformer = _transformer_with_lora_loader().from_pretrained(
                self.model_path, subfolder="transformer", dtype=dtype, variant=self.variant, **kw)
        pipe = self.stock_pipeline_class().from_pretrained(self.model_path, transformer=transformer,
                                                     dtype=dtype, variant=self.variant, **kw)
        if kind == "lora":
            pipe.transformer.load_lora_adapter(location, adapter_name="tdm", prefix=self.lora_prefix,
                                               use_safetensors=True)
            pipe.transformer.set_adapters(["tdm"], weights=[lora_scale])
        return pipe

    def pipeline_kwargs(self, num_frames=None) -> dict:
        return {"use_resolution_binning": False, "clean_caption": False,
                "max_sequence_length": self.max_sequence_length}

    def loading_snippet(self, weights_kind: str, student_location: str, timesteps: List[int],
                        num_frames=None) -> str:
        """A LoRA needs the transformer as a subclass with diffusers' PEFT mixin and
        `load_lora_adapter` (the PixArt pipelines have no LoRA loader), as `load_pipeline` does."""
        if weights_kind != "lora":
            return super().loading_snippet(weights_kind, student_location, timesteps, num_frames)
        from ..model_card import diffusers_snippet

        imports = ["from diffusers import PixArtTransformer2DModel",
                   "from diffusers.loaders import PeftAdapterMixin", "",
                   "class PixArtTransformerWithLoRA(PixArtTransformer2DModel, PeftAdapterMixin):",
                   "    pass   # the PEFT mixin this diffusers leaves out of the class"]
        load = ["transformer = PixArtTransformerWithLoRA.from_pretrained(base, subfolder=\"transformer\", "
                "dtype=dtype)",
                f"pipe = {self.pipeline_class_names[0]}.from_pretrained(base, transformer=transformer, "
                "dtype=dtype).to(device)",
                f"pipe.transformer.load_lora_adapter({student_location!r}, adapter_name=\"tdm\", "
                "prefix=\"transformer\", use_safetensors=True)",
                "pipe.transformer.set_adapters([\"tdm\"], weights=[1.0])   # LoRA scale"]
        return diffusers_snippet(self, weights_kind, student_location, timesteps, load, imports)

