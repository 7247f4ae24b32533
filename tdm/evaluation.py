"""Automatic image metrics of the paper's evaluation: CLIP score, HPSv2, ImageReward and FID.

Every metric takes PIL images and their prompts in batches, so that eval_tdm.py can stream
thousands of samples without holding them. The models are arguments (hub ids or local folders);
HPSv2, ImageReward and the default FID network come from optional packages, and a metric whose
package or weights are missing raises `Unavailable` with the reason, which the caller reports as
skipped instead of failing the whole evaluation.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .checks import first_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class Unavailable(RuntimeError):
    """A metric that cannot run here: its package or weights are missing (message: the fix)."""


def images_to_uint8(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size → uint8 tensor [N, 3, H, W], the input torchmetrics' FID (and
    torch-fidelity's InceptionV3) expects."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# -- CLIP score ---------------------------------------------------------------------------------
def load_clip(name_or_path: str, device="cpu", dtype=torch.float32):
    """(transformers CLIPModel, CLIPProcessor) from a hub id or a local folder, in eval mode."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    return model, CLIPProcessor.from_pretrained(name_or_path)


@torch.no_grad()
def clip_scores(model, processor, images: Sequence[Image.Image], prompts: Sequence[str]) -> List[float]:
    """CLIP score of each (image, prompt) pair: max(100·cos(E_image, E_text), 0), torchmetrics'
    CLIPScore definition (Hessel et al. 2021 with w = 100), the image and text embeddings being
    CLIPModel's projected features. Prompts longer than the text encoder's window are truncated."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    max_length = model.config.text_config.max_position_embeddings
    inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                       truncation=True, max_length=max_length)
    device, dtype = model.device, model.dtype
    out = model(input_ids=inputs["input_ids"].to(device),
                attention_mask=inputs["attention_mask"].to(device),
                pixel_values=inputs["pixel_values"].to(device, dtype))
    cosine = (out.image_embeds.float() * out.text_embeds.float()).sum(-1)   # both unit-norm
    return (100 * cosine).clamp(min=0).tolist()


# -- FID ----------------------------------------------------------------------------------------
def fid_metric(feature_extractor: Optional[torch.nn.Module] = None, device="cpu"):
    """torchmetrics' FrechetInceptionDistance. Default: the standard 2048-d pool3 features of
    torch-fidelity's FID InceptionV3 (images resized to 299 inside); `feature_extractor` is any
    module mapping uint8 images [N, 3, H, W] to features [N, D] in its place."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as error:
        raise Unavailable(f"FID needs torchmetrics ({error}); pip install torchmetrics") from None
    try:
        metric = FrechetInceptionDistance(feature=feature_extractor if feature_extractor is not None
                                          else 2048, normalize=False)
    except ModuleNotFoundError:   # torch-fidelity: the default InceptionV3
        raise Unavailable("FID's standard InceptionV3 needs torch-fidelity: "
                          "pip install torch-fidelity") from None
    return metric.to(device)


@torch.no_grad()
def fid_update(metric, images: Sequence[Image.Image], real: bool) -> None:
    """Add a batch of images to one side of an FID metric (real: the reference side)."""
    metric.update(images_to_uint8(images).to(metric.device), real=real)


def fid_compute(metric) -> float:
    """FID = |μ_r − μ_f|² + Tr(Σ_r + Σ_f − 2(Σ_r Σ_f)^½) of the features seen on both sides
    (unbiased covariances; needs at least two images a side)."""
    return float(metric.compute())


def reference_batches(folder: str, size: Optional[tuple] = None,
                      batch_size: int = 32) -> Iterator[List[Image.Image]]:
    """The images of a folder (sorted by name) in batches, each centre-cropped to the aspect of
    `size` = (width, height) and resized to it, so that they stack with the generated samples."""
    paths = reference_paths(folder)
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start:start + batch_size]:
            image = Image.open(path).convert("RGB")
            if size is not None and image.size != tuple(size):
                image = center_crop_resize(image, size)
            batch.append(image)
        yield batch


def reference_paths(folder: str) -> List[str]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.lower().endswith(IMAGE_EXTENSIONS))


def center_crop_resize(image: Image.Image, size: tuple) -> Image.Image:
    """Crop the largest centred box of the aspect of `size` = (width, height), resize to it."""
    w, h = image.size
    tw, th = size
    scale = min(w / tw, h / th)
    cw, ch = round(tw * scale), round(th * scale)
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).resize((tw, th), Image.BICUBIC)


# -- HPSv2 and ImageReward (optional packages) --------------------------------------------------
def load_hpsv2(version: str = "v2.1", checkpoint: Optional[str] = None,
               device="cpu") -> Callable[[Sequence[Image.Image], Sequence[str]], List[float]]:
    """A scorer (images, prompts) → HPSv2 scores ×100 (the paper's scale: 0.3321 → 33.21).

    Uses the `hpsv2` package's own model (open_clip ViT-H-14 and the HPS checkpoint of `version`,
    or `checkpoint`), loaded once; its `hpsv2.score` would reload the weights on every call."""
    try:
        import hpsv2  # noqa: F401
        from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
        from hpsv2.utils import hps_version_map
    except ImportError as error:
        raise Unavailable(f"hpsv2 is not installed ({error}); pip install hpsv2") from None
    try:
        model, _, preprocess = create_model_and_transforms(
            "ViT-H-14", "laion2B-s32B-b79K", precision="amp", device=device, jit=False,
            force_quick_gelu=False, force_custom_text=False, force_patch_dropout=False,
            force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
            light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False,
            with_region_predictor=False)
        if checkpoint is None:
            import huggingface_hub

            checkpoint = huggingface_hub.hf_hub_download("xswu/HPSv2", hps_version_map[version])
        state = torch.load(checkpoint, map_location=device)
        model.load_state_dict(state.get("state_dict", state))
    except Exception as error:   # no weights offline, a changed package API
        raise Unavailable(f"hpsv2 {version} could not load its weights: {first_line(error)}") from None
    tokenizer = get_tokenizer("ViT-H-14")
    model = model.to(device).eval()

    @torch.no_grad()
    def score(images, prompts):
        pixels = torch.stack([preprocess(image) for image in images]).to(device)
        text = tokenizer(list(prompts)).to(device)
        kind = torch.device(device).type
        with torch.autocast(device_type=kind, enabled=kind == "cuda"):
            out = model(pixels, text)
        image_features, text_features = out["image_features"], out["text_features"]
        return (100 * (image_features * text_features).sum(-1)).float().tolist()

    return score


def load_image_reward(name: str = "ImageReward-v1.0",
                      device="cpu") -> Callable[[Sequence[Image.Image], Sequence[str]], List[float]]:
    """A scorer (images, prompts) → ImageReward scores, from the `image-reward` package."""
    try:
        import ImageReward as reward_package
    except ImportError as error:
        raise Unavailable(f"ImageReward is not installed ({error}); pip install image-reward") from None
    try:
        model = reward_package.load(name, device=device)
    except Exception as error:
        raise Unavailable(f"ImageReward could not load {name}: {first_line(error)}") from None

    @torch.no_grad()
    def score(images, prompts):
        values = []
        for image, prompt in zip(images, prompts):
            value = model.score(prompt, image)
            values.append(float(value[0] if isinstance(value, (list, tuple)) else value))
        return values

    return score


# -- report -------------------------------------------------------------------------------------
TABLE_COLUMNS = (("model", "model"), ("steps", "steps"), ("CLIP", "clip_score"),
                 ("HPSv2", "hpsv2"), ("ImageReward", "image_reward"), ("FID", "fid"))


def markdown_table(rows: Sequence[dict], fid_reference: str = "teacher") -> str:
    """The metrics as a markdown table, one row per model; a missing metric is "–"."""
    def cell(value):
        if value is None:
            return "–"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    header = [name if key != "fid" else f"FID (vs {fid_reference})" for name, key in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(key)) for _, key in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"
