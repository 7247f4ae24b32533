"""A CLIP tokenizer made locally (byte-level BPE with CLIP's `</w>` end-of-word suffix), and the
2-layer CLIP text encoder of the tiny SD3 and FLUX pipelines."""
from __future__ import annotations

from typing import Optional

from .common import TINY_PROMPTS

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def build_clip_tokenizer(vocab_size: int = 400, model_max_length: int = 77):
    """transformers' CLIPTokenizer with a byte-level BPE built from TINY_PROMPTS, the same on every
    call (a trained BPE breaks ties differently in each process): the 256 byte symbols, alone and
    with CLIP's `</w>` end-of-word suffix, then merges that join each prompt word left to right,
    in sorted order, up to `vocab_size` tokens of merges. Handed over as `vocab` (dict) and
    `merges` (list of pairs), so that save/load round-trips."""
    import re

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbol = bytes_to_unicode()
    alphabet = [byte_symbol[b] for b in sorted(byte_symbol)]
    tokens = SPECIALS + alphabet + [c + "</w>" for c in alphabet]
    merges = []
    words = sorted({w for p in TINY_PROMPTS for w in re.findall(r"[a-z]+|[0-9]", p.lower())})
    for word in words:
        symbols = [byte_symbol[b] for b in word.encode()]
        symbols[-1] += "</w>"
        piece = symbols[0]
        for symbol in symbols[1:]:
            merged = piece + symbol
            if merged not in tokens:
                if len(merges) >= vocab_size:
                    break
                merges.append((piece, symbol))
                tokens.append(merged)
            piece = merged
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def clip_text_encoder(tokenizer, hidden_size: int, projection_dim: Optional[int] = None):
    """A 2-layer CLIP text encoder over `tokenizer`: CLIPTextModelWithProjection with
    `projection_dim` (SD3 reads its penultimate hidden state and the projected pooled output),
    else CLIPTextModel (FLUX reads only its pooled output)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    projection = {} if projection_dim is None else {"projection_dim": projection_dim}
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, **projection,
        hidden_act="gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return model(config).eval()
