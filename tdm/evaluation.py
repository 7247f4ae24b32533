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
    """A metric that cannot run here: its package or weights are missing or broken (message: why,
    and the fix)."""


def import_optional(module: str, package: str):
    """The module of an optional package, or Unavailable with the real reason: not installed (the
    pip command), or installed but failing at import (the error: a missing dependency, a file its
    release lacks, an API its dependencies no longer have)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise Unavailable(f"{package} is not installed; pip install {package}")
    try:
        return importlib.import_module(module)
    except Exception as error:   # ImportError of a dependency, FileNotFoundError of a data file, …
        raise broken(package, error) from None


def broken(package: str, error: BaseException) -> Unavailable:
    """An installed package that fails at import, named as such."""
    missing = getattr(error, "name", None) if isinstance(error, ModuleNotFoundError) else None
    cause = f"its dependency {missing} is not installed" if missing else "it fails at import"
    return Unavailable(f"{package} is installed but {cause} ({type(error).__name__}: "
                       f"{first_line(error)})")


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
STANDARD_FID = ("InceptionV3 pool3 (2048-d, torch-fidelity's FID weights), images resized to "
                "299×299 by the original FID's bilinear resize (TensorFlow 1.x-compatible)")
FID_IMAGES_PER_FEATURE = 5   # below 5 images per feature dimension FID is biased far upwards


def fid_metric(feature_extractor: Optional[torch.nn.Module] = None, device="cpu"):
    """torchmetrics' FrechetInceptionDistance. Default: the standard FID (STANDARD_FID):
    torch-fidelity's InceptionV3 with the original TensorFlow-compatible resize to 299 px, not
    torchmetrics' default antialiased one (whose own docs say it differs from the original);
    `feature_extractor` is any module mapping uint8 images [N, 3, H, W] to features [N, D]
    in its place."""
    import inspect

    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except Exception as error:
        raise broken("torchmetrics", error) from None
    options = {}
    if feature_extractor is None and "antialias" in inspect.signature(FrechetInceptionDistance).parameters:
        options["antialias"] = False   # older torchmetrics: always the TF-compatible resize
    try:
        metric = FrechetInceptionDistance(feature=feature_extractor if feature_extractor is not None
                                          else 2048, normalize=False, **options)
    except ModuleNotFoundError:   # torch-fidelity: the default InceptionV3
        raise Unavailable("FID's standard InceptionV3 needs torch-fidelity, which is not installed; "
                          "pip install torch-fidelity") from None
    return metric.to(device)


def fid_feature_count(metric) -> int:
    """The dimension of an FID metric's features."""
    return int(metric.real_features_sum.shape[0])


def fid_sample_warning(images: int, features: int) -> Optional[str]:
    """Why an FID of `images` images a side of `features`-d features is not a number to compare
    (None when there are at least FID_IMAGES_PER_FEATURE per dimension, e.g. 10,240 for 2048-d).
    With fewer the covariance estimate is poor (singular below `features` images) and FID is
    biased upwards, the more so the smaller the sample: same-distribution FID 7.7 at 8 images vs
    0.3 at 512 on 64-d features."""
    enough = FID_IMAGES_PER_FEATURE * features
    if images >= enough:
        return None
    return (f"FID from {images} images a side of {features}-d features is biased upwards: "
            f"compare it only with FIDs of as many images, not with published ones; "
            f"{enough:,} or more give a meaningful FID")


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
    import_optional("hpsv2", "hpsv2")
    try:
        from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
        from hpsv2.utils import hps_version_map
    except Exception as error:   # hpsv2 1.2.0: FileNotFoundError (its tokenizer's vocabulary), …
        raise broken("hpsv2", error) from None
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
        tokenizer = get_tokenizer("ViT-H-14")
    except Exception as error:   # no weights offline, a changed package API
        raise Unavailable(f"hpsv2 {version} could not load its model: {type(error).__name__}: "
                          f"{first_line(error)}") from None
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
    reward_package = import_optional("ImageReward", "image-reward")
    try:
        model = reward_package.load(name, device=device)
    except Exception as error:
        raise Unavailable(f"image-reward could not load {name}: {type(error).__name__}: "
                          f"{first_line(error)}") from None

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


def mean_and_error(values: Optional[Sequence[float]]) -> tuple:
    """(mean, standard error of the mean) of per-image scores; None for what cannot be computed."""
    if not values:
        return None, None
    array = np.asarray(values, dtype=np.float64)
    sem = float(array.std(ddof=1) / np.sqrt(len(array))) if len(array) > 1 else None
    return float(array.mean()), sem


def markdown_table(rows: Sequence[dict], fid_reference: str = "teacher") -> str:
    """The metrics as a markdown table, one row per model: a per-image metric as mean ± standard
    error (its `<key>_sem`), a missing metric as "–"."""
    def cell(row, key):
        value = row.get(key)
        if value is None:
            return "–"
        if not isinstance(value, float):
            return str(value)
        sem = row.get(f"{key}_sem")
        return f"{value:.2f}" + (f" ± {sem:.2f}" if sem is not None else "")

    header = [name if key != "fid" else f"FID (vs {fid_reference})" for name, key in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, key) for _, key in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def report_notes(result: dict) -> List[str]:
    """The lines under the table (metrics.md, the screen, the model card): what the ± is, which
    FID, its warning, and every skipped metric with its reason."""
    status = result.get("metrics", {})
    count = result.get("prompts", {}).get("count")
    lines = [f"CLIP, HPSv2, ImageReward: mean ± standard error over the {count} prompts (one "
             f"image each, one seed: {result.get('seed')} + prompt index)."]
    fid = status.get("fid", {})
    if fid.get("status") == "ok":
        lines.append(f"FID features: {fid.get('features')}.")
        if fid.get("warning"):
            lines.append(f"Warning: {fid['warning']}.")
    lines += [f"- {key}: skipped ({value.get('reason')})" for key, value in status.items()
              if value.get("status") != "ok"]
    return lines
