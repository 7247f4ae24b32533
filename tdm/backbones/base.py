"""What every backbone adapter provides for training, and the denoiser callable the loop sees."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..path import GaussianPath
from ..roles import role_scope
from .fit_checks import FitChecks
from .inference import Inference


class Backbone(FitChecks, Inference):
    """Everything model-specific about one model family, in three parts: what training calls
    (here: the models, prompt conditions, latents and the network call), the checks that the run
    fits the model (FitChecks, tdm/backbones/fit_checks.py) and what sampling and the model card
    call (Inference, tdm/backbones/inference.py). A family overrides what differs, in one file.

    The training loop only sees `Denoiser`s: (x_t, t, condition) -> (x̂0, ε̂), conditions as
    dicts of batch-first tensors, and latents of `latent_shape(resolution)`.
    """

    name: str = ""
    pipeline_class_names: Sequence[str] = ()
    prediction_type: str = "epsilon"
    lora_prefix: str = "transformer"              # key prefix of the diffusers LoRA format
    denoiser_subfolder: str = "transformer"       # where the denoiser lives in the pipeline folder
    lora_target_modules: List[str] = []
    max_sequence_length: Optional[int] = None     # text tokens, where the family has a limit
    # docs/method.md §5.1: whether the teacher is guided through a guidance input (FLUX.1-dev)
    guidance_embedding: bool = False
    # Where the step condition of docs/method.md §6 is added: the module whose output is the
    # timestep embedding ([batch, dim]) of the denoiser.
    step_embedding_site: str = "time_embedding"
    is_video: bool = False   # pipelines return `.frames` (lists of frames) instead of `.images`

    def __init__(self, model_path: str, revision: Optional[str] = None,
                 variant: Optional[str] = None, options: Optional[dict] = None,
                 resolution: Optional[int] = None):
        self.model_path = model_path
        self.resolution = resolution   # --resolution of training (None: the family's default)
        self.revision = revision
        self.variant = variant
        self.options = dict(options or {})   # --backbone_options
        self.path: GaussianPath = None

    def _load_kwargs(self) -> dict:
        return {"revision": self.revision} if self.revision else {}

    # -- models ---------------------------------------------------------------------------
    def load_denoiser(self, dtype=torch.float32) -> torch.nn.Module:
        """A fresh copy of the teacher network (UNet or transformer) in `dtype`."""
        raise NotImplementedError

    def load_text_encoders(self, device, dtype) -> None:
        raise NotImplementedError

    def t5_text_pipeline(self, pipeline_class, device, dtype):
        """`pipeline_class` holding only the model's tokenizer and T5 encoder, so that training
        embeds prompts with the pipeline's own encode_prompt, exactly as inference does."""
        from transformers import AutoTokenizer, T5EncoderModel

        kw = self._load_kwargs()
        tokenizer = AutoTokenizer.from_pretrained(self.model_path, subfolder="tokenizer", **kw)
        text_encoder = T5EncoderModel.from_pretrained(
            self.model_path, subfolder="text_encoder", variant=self.variant, dtype=dtype, **kw)
        text_encoder.requires_grad_(False).eval().to(device)
        return pipeline_class(tokenizer=tokenizer, text_encoder=text_encoder, vae=None,
                              transformer=None, scheduler=None)

    def load_vae(self, device, dtype) -> None:
        raise NotImplementedError

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU once every prompt is cached (default: keep them)."""

    # -- data -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> dict:
        raise NotImplementedError

    def held_out_data(self):
        """Held-out samples of the data the teacher learnt, to score the student against during
        training (tdm.validation): an object with `noise`, `cond` and `score(samples)`. None
        here: these families distil from prompts alone (the 2-D toy has one)."""
        return None

    def read_configs(self, denoiser_class, vae_class) -> dict:
        """The denoiser's and the VAE's configs, no weights: `denoiser_config` (channels, patch
        size) and `vae_scale_factor`. Returns the VAE config."""
        kw = self._load_kwargs()
        self.denoiser_config = denoiser_class.load_config(self.model_path,
                                                          subfolder=self.denoiser_subfolder, **kw)
        vae_config = vae_class.load_config(self.model_path, subfolder="vae", **kw)
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        return vae_config

    def latent_shape(self, resolution: int, num_frames: Optional[int] = None) -> tuple:
        """Shape of one sample's latent, without the batch dimension (default: an image latent
        of the denoiser's in_channels at resolution / VAE factor)."""
        size = resolution // self.vae_scale_factor
        return (self.denoiser_config["in_channels"], size, size)

    def set_guidance(self, embedding: Optional[bool], student_guidance: Optional[float]) -> bool:
        """Apply --guidance_embedding (None: the family's default) and --student_guidance
        (docs/method.md §5.1) once, before training; return whether the teacher target is one call
        with the guidance input. A family without a guidance input refuses both flags."""
        if embedding or student_guidance is not None:
            raise ValueError(f"--guidance_embedding on and --student_guidance need a guidance-"
                             f"distilled model (FLUX.1-dev); {self.name} has no guidance input: "
                             "drop them (--cfg is classifier-free guidance here)")
        return False

    def condition_key(self) -> str:
        """Everything a prompt's condition depends on besides the prompt (embedding-cache key)."""
        return "|".join(str(v) for v in (self.name, self.model_path, self.revision, self.variant,
                                         self.max_sequence_length))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [0, 1], [B, 3, H, W]."""
        raise NotImplementedError

    # -- network call ---------------------------------------------------------------------
    def network_output(self, module: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                       cond: dict) -> torch.Tensor:
        """The network's forward as the stock pipeline calls it (input packing, the time input
        for path indices t, position ids), returning all it returns in x_t's layout, extra
        channels included (PixArt's learned σ)."""
        raise NotImplementedError

    def model_output(self, module: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                     cond: dict) -> torch.Tensor:
        """The raw prediction of `prediction_type` for x_t: `network_output` less any extra
        channels (none unless a family says so)."""
        return self.network_output(module, x_t, t, cond)

    def denoiser(self, module: torch.nn.Module, role: Optional[str] = None) -> "Denoiser":
        return Denoiser(module, self, role)


class Denoiser:
    """(x_t, t, condition) -> (x̂0, ε̂) in float32 (docs/method.md §1). `role` (student, fake score,
    None for the teacher) is the scope of the call (tdm.roles): it selects the LoRA adapter on a
    shared base and the step embedding, for this call and its recompute in backward only."""

    def __init__(self, module: torch.nn.Module, backbone: Backbone, role: Optional[str] = None):
        self.module = module
        self.backbone = backbone
        self.role = role
        self.scope = role_scope(module)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict):
        """The role's (x̂0, ε̂). What the role changes is read inside the network from the scope's
        current call, not passed as arguments: the LoRA weights of the role (tdm.call_weights) and,
        on a step-conditioned network (§6), the role's step embedding of cond[NUM_STEPS] /
        cond[STEP_INDEX], added to the timestep embedding by a forward hook on
        `backbone.step_embedding_site` (tdm.step_condition.StepEmbeddings.add_to)."""
        with self.scope.acting(self.role, cond):
            out = self.backbone.model_output(self.module, x_t, t, cond)
        return self.backbone.path.x0_eps(out, x_t, t, self.backbone.prediction_type)
