"""Configs of the published models that configs/*.yaml train, without weights, for tdm/plan.py.

One folder per hub id (`<org>/<name>/`) holds the release's model_index.json and each component's
config (architecture fields; class names as this diffusers names them), taken from the model cards'
repositories and diffusers' conversion scripts (scripts/convert_*_to_diffusers.py). Tokenizers
are not stored: `published_folder` writes a pipeline folder with tokenizers built locally
(tdm/tiny: same class and length, so prompts pad to the release's token count) beside the
configs, which loads like the release with tdm.simulate.weightless_loading.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def published_models() -> List[str]:
    """The hub ids whose configs are stored here."""
    found = []
    for org in sorted(os.listdir(HERE)):
        if os.path.isdir(os.path.join(HERE, org)) and not org.startswith("_"):
            found += [f"{org}/{name}" for name in sorted(os.listdir(os.path.join(HERE, org)))
                      if os.path.isfile(os.path.join(HERE, org, name, "model_index.json"))]
    return found


def _files(model: str) -> Dict[str, str]:
    """relative path -> text of every stored file of `model`."""
    root = os.path.join(HERE, model)
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path) as f:
                out[os.path.relpath(path, root)] = f.read()
    return dict(sorted(out.items()))


def _tokenizer(config: dict):
    """A local tokenizer of the class and length `config` names (tokenizer_config.json)."""
    kind, length = config["tokenizer_class"], config["model_max_length"]
    if kind.startswith("T5"):
        from ..tiny.common import build_t5_tokenizer

        return build_t5_tokenizer(model_max_length=length)
    if kind.startswith("CLIP"):
        from ..tiny.clip import build_clip_tokenizer

        return build_clip_tokenizer(model_max_length=length)
    if kind.startswith("Gemma"):
        from ..tiny.sana import build_gemma_tokenizer

        tokenizer = build_gemma_tokenizer()
        tokenizer.model_max_length = length
        return tokenizer
    raise ValueError(f"no local tokenizer for {kind}")


def _write(model: str, files: Dict[str, str], target: str) -> None:
    """The skeleton folder of `model` at `target`, written whole or not at all."""
    scratch = tempfile.mkdtemp(prefix=".tdm-skeleton-", dir=os.path.dirname(target))
    try:
        index = json.loads(files["model_index.json"])
        for relative, text in files.items():
            path = os.path.join(scratch, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if os.path.basename(relative) == "tokenizer_config.json":
                tokenizer = _tokenizer(json.loads(text))
                tokenizer.save_pretrained(os.path.dirname(path))
                index[os.path.dirname(relative)] = ["transformers", type(tokenizer).__name__]
            else:
                with open(path, "w") as f:
                    f.write(text)
        with open(os.path.join(scratch, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)
        try:
            os.replace(scratch, target)
        except OSError:   # another process wrote it first
            if not os.path.isdir(target):
                raise
            shutil.rmtree(scratch, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def published_folder(model: str, revision: Optional[str] = None,
                     root: Optional[str] = None) -> Optional[str]:
    """A pipeline folder without weights for the published `model` (under `root`, default the
    system's temporary folder; written once per version of the stored configs), or None where
    its configs are not stored here or another `revision` than the stored one is asked for."""
    if revision is not None or model not in published_models():
        return None
    files = _files(model)
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:12]
    root = root or os.path.join(tempfile.gettempdir(), "tdm-published")
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, f"{model.replace('/', '--')}-{digest}")
    if not os.path.isdir(target):
        _write(model, files, target)
    return target
