"""A CLIP tokenizer trained locally (byte-level BPE with CLIP's `</w>` end-of-word suffix), and the
2-layer CLIP text encoder of the tiny SD3 and FLUX pipelines."""
from __future__ import annotations

from typing import Optional

from .common import TINY_PROMPTS

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def build_clip_tokenizer(vocab_size: int = 400, model_max_length: int = 77):
    """transformers' CLIPTokenizer with a vocabulary and merges trained on TINY_PROMPTS.

    Trained with the same normalisation and pre-tokenisation that CLIPTokenizer applies, then
    handed over as `vocab` (dict) and `merges` (list of pairs), so that save/load round-trips.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>",
                               unk_token=SPECIALS[1]))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_PROMPTS * 4, trainer=trainer)
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
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
