"""Stable Diffusion XL: the SD1.x adapter with two CLIP text encoders (penultimate hidden states
concatenated), the pooled embedding of the second one, and the added time ids
(original size, crop (0, 0), target size = the training resolution) passed to the UNet as
`added_cond_kwargs` (docs/method.md §1; the condition dict carries them batch-first)."""
from __future__ import annotations

from typing import List

import torch

from .sd15 import StableDiffusionBackbone


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    name = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    pipeline_class = "StableDiffusionXLPipeline"
    text_components = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer",
                       "text_encoder": "CLIPTextModel",
                       "text_encoder_2": "CLIPTextModelWithProjection"}

    def _text_pipeline_extras(self) -> dict:
        return {"add_watermarker": False}

    def _text_device(self):
        return self.text_pipeline.text_encoder_2.device

    def time_ids(self, batch: int) -> torch.Tensor:
        """(original H, W, crop top, left, target H, W), as the pipeline builds them for a square
        image of the training resolution with no crop."""
        size = self.resolution
        return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(batch, 1)

    def condition_key(self) -> str:
        return f"{super().condition_key()}|{self.resolution}"   # the time ids hold it

    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> dict:
        embeds, _, pooled, _ = self.text_pipeline.encode_prompt(
            list(prompts), device=self._text_device(), num_images_per_prompt=1,
            do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled,
                "time_ids": self.time_ids(len(prompts)).to(embeds.device)}

    def added_cond_kwargs(self, cond: dict, dtype) -> dict:
        return {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
