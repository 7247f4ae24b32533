"""Build a tiny but real PixArt-alpha diffusers pipeline for fast CPU tests.

All components are the real diffusers / transformers classes with very small
configurations; the folder written by :func:`build_tiny_pixart` loads with
``PixArtAlphaPipeline.from_pretrained(path)``. Images are 32x32 pixels; the
latent is 4 x 16 x 16 (VAE scale factor 2).
"""

from __future__ import annotations

import json
import os
import string

import torch

__all__ = ["build_tiny_pixart", "TINY_PROMPTS"]

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

# Real PixArt-alpha (PixArt-XL-2-512x512) scheduler_config.json values.
PIXART_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    solver_order=2,
    prediction_type="epsilon",
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    use_karras_sigmas=False,
    use_lu_lambdas=False,
    lambda_min_clipped=-float("inf"),
    variance_type=None,
    timestep_spacing="linspace",
    steps_offset=0,
)


def _build_tokenizer():
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
        model_max_length=120,
    )
    return tokenizer


def _reinit_zero_weights(module: torch.nn.Module, std: float = 0.02) -> list[str]:
    """Give every all-zero weight (ndim >= 2 or scale/shift tables) small random values."""
    names = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2 and torch.count_nonzero(p) == 0:
                p.normal_(0.0, std)
                names.append(name)
    return names


def build_tiny_pixart(path: str, seed: int = 0) -> str:
    """Build a tiny real ``PixArtAlphaPipeline`` with fixed random weights and save it to ``path``.

    Components: T5 tokenizer (Unigram trained on ``TINY_PROMPTS``), 2-layer ``T5EncoderModel``
    (d_model 32), 2-block ``AutoencoderKL`` (scale factor 2, 4 latent channels), 2-layer
    ``PixArtTransformer2DModel`` (sample_size 16, learned sigma: out_channels 8) and a
    ``DPMSolverMultistepScheduler`` with the PixArt-alpha 512 config. Returns ``path``.
    """
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = _build_tokenizer()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5_config = T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",  # t5-v1_1 style
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            initializer_factor=1.0,
        )
        text_encoder = T5EncoderModel(t5_config).eval()

        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            act_fn="silu",
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=0.18215,
        ).eval()

        torch.manual_seed(seed + 2)
        transformer = PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            dropout=0.0,
            norm_num_groups=32,
            cross_attention_dim=16,
            attention_bias=True,
            sample_size=16,
            patch_size=2,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            upcast_attention=False,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            interpolation_scale=None,
            use_additional_conditions=None,
            caption_channels=t5_config.d_model,
            attention_type="default",
        )
        _reinit_zero_weights(transformer)
        transformer.eval()

    scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG)

    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path)
    return path
