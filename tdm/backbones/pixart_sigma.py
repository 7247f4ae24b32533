"""PixArt-Σ: PixArt-α's successor (docs/method.md §1). The same PixArtTransformer2DModel,
ε-prediction with learned-σ channels, T5 text encoder with attention mask and DDPM table with
linear betas, so everything but the pipeline class and the text length is PixArt-α's adapter
(which loads, embeds prompts and writes its model-card snippet with `pipeline_class_names[0]`):

- the pipeline is PixArtSigmaPipeline (its encode_prompt is PixArt-α's with 120 → 300 tokens);
- 300 T5 tokens, the length PixArt-Σ was trained on (the α adapter: 120);
- the VAE is SDXL's (scaling factor 0.13025), read from the model's own config as for α.

KV-compressed attention (PixArt-Σ paper, for 4K) has no counterpart in diffusers'
PixArtTransformer2DModel and the released diffusers checkpoints do not use it; `check_fit`
refuses a transformer config that asks for it rather than silently running without it.
"""
from __future__ import annotations

from .pixart import PixArtBackbone

SIGMA_MAX_SEQUENCE_LENGTH = 300   # PixArtSigmaPipeline's default, the length Σ was trained on


class PixArtSigmaBackbone(PixArtBackbone):
    name = "pixart_sigma"
    pipeline_class_names = ("PixArtSigmaPipeline",)
    max_sequence_length = SIGMA_MAX_SEQUENCE_LENGTH

    def check_fit(self, args) -> None:
        """PixArt-α's checks, then: at most 300 text tokens; no KV compression asked for."""
        super().check_fit(args)
        length = args.max_sequence_length or self.max_sequence_length
        if not 0 < length <= SIGMA_MAX_SEQUENCE_LENGTH:
            raise ValueError(f"--max_sequence_length {length}: PixArt-Σ takes 1 to "
                             f"{SIGMA_MAX_SEQUENCE_LENGTH} T5 tokens (its training length); "
                             f"pass --max_sequence_length {SIGMA_MAX_SEQUENCE_LENGTH} or less")
        asked = sorted(k for k in self.denoiser_config if "kv_compress" in k)
        if asked:
            raise ValueError(f"transformer config key {asked[0]}: KV-compressed attention is not "
                             "implemented by diffusers' PixArtTransformer2DModel; use a checkpoint "
                             "without it (the released PixArt-Σ 512/1024/2K models)")
