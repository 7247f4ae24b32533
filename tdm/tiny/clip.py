"""A CLIP tokenizer trained locally: byte-level BPE with CLIP's `</w>` end-of-word suffix."""
from __future__ import annotations

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
