"""Shared pieces of the tiny test pipelines: a prompt corpus, a T5 tokenizer trained on it
locally, a 2-layer T5 encoder and a 16-channel VAE (SD3, FLUX), and weight initialisation that
keeps tiny models input-dependent."""

from __future__ import annotations

import json
import os
import string

import torch

TINY_PROMPTS = [
    "a red cat sitting on a chair.",
    "a blue dog running in the park!",
    "a photo of a green apple on a table",
    "an oil painting of a mountain at sunset",
    "a small house near the river, with trees",
    "a yellow bird flying over the sea",
    "a portrait of an old man with a hat",
    "a cup of coffee on a wooden desk",
    "a city street at night, with lights and rain",
    "a white horse standing in a field of flowers",
    "two children playing with a ball on the beach",
    "a bowl of fruit: oranges, bananas and grapes",
    "a black car parked next to a tall building",
    "a watercolor drawing of a forest in autumn",
    "a cute panda eating bamboo",
    "a robot reading a book in a library?",
    "a plate of pasta with tomato sauce",
    "a snowy landscape with a frozen lake",
    "a astronaut riding a horse on the moon",
    "a close-up photo of a pink flower",
    "an orange fox sleeping under a tree",
    "a boat sailing on a calm blue lake",
    "a girl with long hair wearing a red dress",
    "a bright sun over green hills and a small farm",
    "a lighthouse on a rocky coast during a storm",
    "a bicycle leaning against a brick wall",
    "a bowl of soup and a piece of bread",
    "a cartoon of a happy frog on a leaf",
    "a desert with sand dunes and a camel",
    "a vase of roses by the window, in soft light",
    "a teddy bear on a bed",
    "a mug of tea; a slice of cake",
    "high quality, detailed, 4k, sharp focus",
    "a big castle on a hill, fantasy art",
    "a purple butterfly on a sunflower",
    "a train crossing a bridge over a valley",
]


def build_t5_tokenizer(model_max_length: int = 120):
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    # Same backend layout as transformers' T5Tokenizer builds on reload (no normalizer,
    # WhitespaceSplit + Metaspace pre-tokenizer, Unigram with unk_id=2), so that
    # save_pretrained / from_pretrained round-trips to an identical tokenizer.
    tok = Tokenizer(Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        shrinking_factor=0.75,
        max_piece_length=8,
        n_sub_iterations=2,
        show_progress=False,
    )
    tok.train_from_iterator(TINY_PROMPTS * 4, trainer=trainer)

    # The trainer orders equal-score pieces non-deterministically (multi-threaded); make the
    # vocabulary canonical: specials first, then by (rounded score desc, piece). Printable
    # ASCII characters absent from the corpus are appended with one low score so that e.g.
    # capitals and digits do not map to <unk>.
    specials = ["<pad>", "</s>", "<unk>"]
    trained = json.loads(tok.to_str())["model"]["vocab"]
    pieces = sorted(
        ((piece, round(float(score), 6)) for piece, score in trained if piece not in specials),
        key=lambda ps: (-ps[1], ps[0]),
    )
    known = {piece for piece, _ in pieces}
    low = min(score for _, score in pieces) - 1.0
    extra = sorted(set(string.ascii_letters + string.digits + string.punctuation) - known)
    vocab = [(sp, 0.0) for sp in specials] + pieces + [(ch, low) for ch in extra]
    pre_tokenizer, decoder = tok.pre_tokenizer, tok.decoder
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1 and tok.token_to_id("<unk>") == 2
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"],
        pair=["$A", "</s>", "$B", "</s>"],
        special_tokens=[("</s>", 1)],
    )
    tokenizer = T5TokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )
    return tokenizer


def reinit_zero_weights(module: torch.nn.Module, std: float = 0.02) -> list[str]:
    """Give every all-zero weight (ndim >= 2 or scale/shift tables) small random values."""
    names = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2 and torch.count_nonzero(p) == 0:
                p.normal_(0.0, std)
                names.append(name)
    return names


def t5_text_encoder(tokenizer, d_model: int):
    """A 2-layer T5EncoderModel over `tokenizer` (SD3's and FLUX's T5 branch)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2,
        num_decoder_layers=2, num_heads=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def latent16_vae(scaling_factor: float, shift_factor: float):
    """A 2-block AutoencoderKL with 16 latent channels (VAE factor 2) and the family's latent
    normalisation (SD3's and FLUX's VAE layout, scaled down)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, act_fn="silu", latent_channels=16,
        norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False).eval()


def save_configs(pipe, path: str) -> str:
    """`pipe` as a pipeline folder without weight files: model_index.json, each model's and the
    scheduler's config, the tokenizers (what tdm.simulate.weightless_loading reads)."""
    pipe.save_config(path)
    for name, component in pipe.components.items():
        folder = os.path.join(path, name)
        if component is None:
            continue
        if hasattr(component, "save_config"):      # diffusers models and schedulers
            component.save_config(folder)
        elif hasattr(component, "config"):         # transformers models
            component.config.save_pretrained(folder)
        else:                                      # tokenizers
            component.save_pretrained(folder)
    return path
