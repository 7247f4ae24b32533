"""The checks that a run fits its model, read from the model's configs before any weight loads
(sizes, positions, text length, LoRA rank): the part of the backbone contract `check_fit` runs."""
from __future__ import annotations

from typing import Optional

import torch


class FitChecks:
    """Mixed into Backbone: reads its denoiser_config, vae_scale_factor, lora_target_modules and
    max_sequence_length. Families with more limits extend `check_fit` and call super()."""

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

    def check_resolution(self, resolution: int, flag: str = "--resolution") -> None:
        """Raise ValueError unless latents of this size fit the VAE factor and the patch size
        (`flag`: the option named in the message, e.g. infer_tdm.py's --height)."""
        patch = self.denoiser_config.get("patch_size") or 1
        factor = self.vae_scale_factor * patch
        if resolution <= 0 or resolution % factor:
            raise ValueError(f"{flag} {resolution} must be a multiple of {factor} "
                             f"(VAE factor {self.vae_scale_factor} × patch size {patch})")

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
