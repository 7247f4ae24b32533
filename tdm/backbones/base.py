"""What every backbone adapter provides, and the denoiser callable the loop sees."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..path import GaussianPath
from ..roles import role_scope


class Backbone:
    """Everything model-specific about one model family.

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

    def denoiser_skeleton(self) -> Optional[torch.nn.Module]:
        """The denoiser's architecture without weights (meta tensors), to check files against;
        None where the model is not a diffusers pipeline folder."""
        import diffusers
        from accelerate import init_empty_weights

        try:
            index = diffusers.DiffusionPipeline.load_config(self.model_path, revision=self.revision)
        except OSError:   # no model_index.json (the toy)
            return None
        if self.denoiser_subfolder not in index:
            return None
        cls = getattr(diffusers, index[self.denoiser_subfolder][1])
        config = cls.load_config(self.model_path, subfolder=self.denoiser_subfolder,
                                 revision=self.revision)
        with init_empty_weights():
            return cls.from_config(config)

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

    def check_resolution(self, resolution: int, flag: str = "--resolution") -> None:
        """Raise ValueError unless latents of this size fit the VAE factor and the patch size
        (`flag`: the option named in the message, e.g. infer_tdm.py's --height)."""
        patch = self.denoiser_config.get("patch_size") or 1
        factor = self.vae_scale_factor * patch
        if resolution <= 0 or resolution % factor:
            raise ValueError(f"{flag} {resolution} must be a multiple of {factor} "
                             f"(VAE factor {self.vae_scale_factor} × patch size {patch})")

    def check_fit(self, args) -> None:
        """Raise ValueError, one line naming the value, the limit and the fix, unless the run's
        sizes fit the model (read from its configs, before any weight is loaded). `args` is the
        run's config: resolution, num_frames, max_sequence_length, lora_rank, train_mode.
        Families with more limits (text length, frames) extend this and call super()."""
        self.check_resolution(args.resolution)
        self.check_positions(args.resolution)
        self.check_text_length(args.max_sequence_length)
        if args.train_mode == "lora":
            self.check_lora_rank(args.lora_rank)

    # docs/method.md §5.1: whether the teacher is guided through a guidance input (FLUX.1-dev)
    guidance_embedding: bool = False

    def set_guidance(self, embedding: Optional[bool], student_guidance: Optional[float]) -> bool:
        """Apply --guidance_embedding (None: the family's default) and --student_guidance
        (docs/method.md §5.1) once, before training; return whether the teacher target is one call
        with the guidance input. A family without a guidance input refuses both flags."""
        if embedding or student_guidance is not None:
            raise ValueError(f"--guidance_embedding on and --student_guidance need a guidance-"
                             f"distilled model (FLUX.1-dev); {self.name} has no guidance input: "
                             "drop them (--cfg is classifier-free guidance here)")
        return False

    def sampling_guidance(self) -> float:
        """The guidance_scale the stock pipeline is called with for the student: 1 (no CFG:
        the teacher's guidance is distilled into it, docs/method.md §7)."""
        return 1.0

    def check_positions(self, resolution: int) -> None:
        """A DiT with a fixed table of positions (`pos_embed_max_size`, SD3) takes at most that
        many patches per side."""
        most = getattr(self, "denoiser_config", {}).get("pos_embed_max_size")
        if not most:
            return
        factor = self.vae_scale_factor * (self.denoiser_config.get("patch_size") or 1)
        for side in self.image_size(resolution):
            if side // factor > most:
                raise ValueError(f"{side} px is {side // factor} patches, more than the {most} "
                                 f"positions of the denoiser (pos_embed_max_size); use --resolution "
                                 f"≤ {most * factor}")

    def text_token_limit(self) -> Optional[int]:
        """The most prompt tokens the (T5) text encoder's tokenizer takes: its model_max_length."""
        config = self._read_json("tokenizer", "tokenizer_config.json") or {}
        limit = config.get("model_max_length")
        return int(limit) if limit and limit < 1e9 else None

    def check_text_length(self, tokens: Optional[int]) -> None:
        if tokens is None:
            return
        if self.max_sequence_length is None:
            raise ValueError(f"--max_sequence_length does not apply to {self.name}: its CLIP text "
                             "encoders read 77 tokens; remove the flag")
        limit = self.text_token_limit()
        if tokens < 1 or (limit and tokens > limit):
            raise ValueError(f"--max_sequence_length {tokens}: the text encoder's tokenizer takes "
                             f"1 to {limit} tokens; use ≤ {limit} (the family's default is "
                             f"{type(self).max_sequence_length})")

    def check_lora_rank(self, rank: int) -> None:
        """The rank must not exceed the narrowest LoRA target layer (in and out features)."""
        skeleton = self.denoiser_skeleton()
        if skeleton is None:
            return
        targets = [(name, m) for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)
                   and any(name == t or name.endswith("." + t) for t in self.lora_target_modules)]
        if not targets:
            raise ValueError(f"none of the LoRA target modules {self.lora_target_modules} is in the "
                             "denoiser; use --train_mode full or a model of this family")
        name, narrowest = min(targets, key=lambda nm: min(nm[1].in_features, nm[1].out_features))
        width = min(narrowest.in_features, narrowest.out_features)
        if rank > width:
            raise ValueError(f"--lora_rank {rank} exceeds {width}, the width of the narrowest LoRA "
                             f"target ({name}: {narrowest.in_features} → {narrowest.out_features}); "
                             f"use --lora_rank ≤ {width}")

    def _read_json(self, subfolder: str, filename: str) -> Optional[dict]:
        """A small config file of the model folder or hub repo (None where it has none)."""
        import json
        import os

        if os.path.isdir(self.model_path):
            path = os.path.join(self.model_path, subfolder, filename)
        else:
            from huggingface_hub import hf_hub_download

            try:
                path = hf_hub_download(self.model_path, filename, subfolder=subfolder,
                                       revision=self.revision)
            except Exception:   # not in the repo (or offline and not cached): nothing to check
                return None
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def image_size(self, resolution: int) -> tuple:
        """(height, width) in pixels for --resolution: square unless the family reads its own
        size (CogVideoX: --backbone_options height/width)."""
        return resolution, resolution

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

    # Where the step condition of docs/method.md §6 is added: the module whose output is the
    # timestep embedding ([batch, dim]) of the denoiser.
    step_embedding_site: str = "time_embedding"

    # -- inference ------------------------------------------------------------------------
    def stock_pipeline_class(self):
        """The diffusers class of `pipeline_class_names[0]`, the family's stock pipeline."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_names[0])

    def load_pipeline(self, dtype, weights: Optional[str] = None, lora_scale: float = 1.0):
        """A stock diffusers pipeline of the teacher with the student applied."""
        raise NotImplementedError

    def use_training_grid(self, pipe, timesteps: List[int]) -> dict:
        """Give `pipe` a stock scheduler that reproduces the training rollout on `timesteps`
        (docs/method.md §7) and return the pipeline-call arguments that select the grid. DDPM family:
        first-order DPM-Solver++, which is the DDIM update of §2."""
        from ..sampling import exact_grid_scheduler

        pipe.scheduler = exact_grid_scheduler(pipe.scheduler.config)
        return {"timesteps": list(timesteps)}

    def use_upstream_sampler(self, pipe, num_inference_steps: int, flow_shift: Optional[float] = None) -> dict:
        """The sampler of the family's published TDM snippet (DDPM family: DPM-Solver++ multistep
        with the model's scheduler config); returns the pipeline-call arguments."""
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        return {"num_inference_steps": num_inference_steps}

    def pipeline_kwargs(self, num_frames: Optional[int] = None) -> dict:
        """Extra arguments for the pipeline's __call__ (switches of one family, video frames)."""
        return {}

    def loading_snippet(self, weights_kind: str, student_location: str, timesteps: List[int],
                        num_frames: Optional[int] = None) -> str:
        """Python for the model card that loads the student ("lora" file or "full" model folder at
        `student_location`) in plain diffusers and samples it on `timesteps` (`num_frames`: the
        run's, video families). Default: built from `pipeline_class_names[0]` and the scheduler
        `use_training_grid` sets (tdm.model_card); override where the family's pipeline loads a
        student differently."""
        from ..model_card import diffusers_snippet

        return diffusers_snippet(self, weights_kind, student_location, timesteps, num_frames=num_frames)

    is_video: bool = False   # pipelines return `.frames` (lists of frames) instead of `.images`


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
        with self.scope.acting(self.role, cond):
            out = self.backbone.model_output(self.module, x_t, t, cond)
        return self.backbone.path.x0_eps(out, x_t, t, self.backbone.prediction_type)
