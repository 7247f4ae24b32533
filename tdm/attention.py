"""diffusers' AttnProcessor2_0 (PixArt, SD1.5, SDXL) with fewer device operations per call and
the same values, for training networks (tdm.networks): the padding mask broadcast over heads
instead of repeated per head, the input cast to the autocast dtype once for the query, key and
value projections instead of once each, and no division by a rescale factor of 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lean_attention(module: torch.nn.Module) -> int:
    """Give every attention layer of `module` that runs diffusers' stock AttnProcessor2_0 the lean
    one; returns how many."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    layers = [m for m in module.modules() if isinstance(m, Attention) and type(m.processor) is AttnProcessor2_0]
    for layer in layers:
        layer.set_processor(LeanAttnProcessor())
    return len(layers)


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype autocast would cast it to for a matmul (itself outside autocast)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or not x.is_floating_point():
        return x
    return x.to(torch.get_autocast_dtype(device))


class LeanAttnProcessor:
    """AttnProcessor2_0 for the layouts training uses (no spatial or group norm, no 4-D input,
    a mask of one row per sample, [B, 1, S]); anything else goes to the stock processor."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.stock = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if (args or kwargs or attn.spatial_norm is not None or attn.group_norm is not None
                or hidden_states.ndim != 3 or attn.norm_cross
                or (attention_mask is not None and (attention_mask.ndim != 3 or attention_mask.shape[1] != 1))):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        hidden_states = to_autocast_dtype(hidden_states)
        context = hidden_states if encoder_hidden_states is None else to_autocast_dtype(encoder_hidden_states)
        if attention_mask is not None:   # [B, 1, S] → [B, 1, 1, S]: the same mask for every head
            if attention_mask.shape[-1] != context.shape[1]:
                return self.stock(attn, residual, encoder_hidden_states, attention_mask, temb)
            attention_mask = attention_mask.unsqueeze(1)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                             for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        if attn.rescale_output_factor != 1.0:
            out = out / attn.rescale_output_factor
        return out
