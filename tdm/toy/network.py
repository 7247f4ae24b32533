"""The toy's network: a residual MLP ε-denoiser with timestep and class embeddings.

A diffusers model, so that LoRA, gradient checkpointing and save/load work as for the image
backbones.
"""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps


class ToyDenoiser(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Residual MLP ε(x_t, t, class): sinusoidal timestep embedding plus a class embedding whose
    last row (`num_classes`) is the empty condition."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, hidden: int = 128, depth: int = 3, time_channels: int = 64,
                 num_classes: int = 0):
        super().__init__()
        self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_channels, hidden)
        self.class_embedding = torch.nn.Embedding(num_classes + 1, hidden)
        self.proj_in = torch.nn.Linear(2, hidden)
        self.blocks = torch.nn.ModuleList(ResidualBlock(hidden) for _ in range(depth))
        self.proj_out = torch.nn.Linear(hidden, 2)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
        emb = self.time_embedding(self.time_proj(timestep).to(x.dtype))
        emb = emb + self.class_embedding(class_labels)
        h = self.proj_in(x)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                h = self._gradient_checkpointing_func(block, h, emb)
            else:
                h = block(h, emb)
        return self.proj_out(torch.nn.functional.silu(h))


class ResidualBlock(torch.nn.Module):
    """h + fc2(silu(fc1(silu(h + emb)))): one block of ToyDenoiser (the unit it checkpoints)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(hidden, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)

    def forward(self, h, emb):
        act = torch.nn.functional.silu
        return h + self.fc2(act(self.fc1(act(h + emb))))
