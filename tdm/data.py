"""Prompts: the only data TDM needs (docs/method.md §1: data-free, no images are read)."""
from __future__ import annotations

import os
from typing import List, Optional

from .config import UsageError

CAPTION_COLUMNS = ("prompt", "caption", "text")
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _pick_column(columns: List[str], caption_column: Optional[str], source: str) -> str:
    if caption_column:
        if caption_column not in columns:
            raise UsageError(f"--caption_column {caption_column!r} is not in {source}; "
                             f"its columns are: {', '.join(columns)}")
        return caption_column
    for name in CAPTION_COLUMNS:
        if name in columns:
            return name
    raise UsageError(f"{source} has no prompt column; pass --caption_column, one of: "
                     f"{', '.join(columns)}")


def _load_dataset(source: str):
    import datasets

    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source) and ext in TABLE_FORMATS:
        datasets.disable_progress_bars()   # one local file: a bar would only clutter the log
        try:
            return datasets.load_dataset(TABLE_FORMATS[ext], data_files=source, split="train")
        finally:
            datasets.enable_progress_bars()
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "dataset_info.json")) or \
                os.path.exists(os.path.join(source, "state.json")):
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(source)
        return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(source, split="train")  # a datasets hub id


def load_prompts(source: str, caption_column: Optional[str] = None) -> List[str]:
    """Read prompts from a .txt (one a line), a table file, a dataset folder or a hub id."""
    if os.path.isfile(source) and source.lower().endswith(".txt"):
        prompts = _read_lines(source)
    elif os.path.isfile(source) and os.path.splitext(source)[1].lower() not in TABLE_FORMATS:
        raise UsageError(f"--prompts {source}: unsupported file type; use .txt, "
                         + ", ".join(TABLE_FORMATS) + " or a dataset folder")
    else:
        if not os.path.exists(source) and (source.startswith((".", "/")) or
                                           os.path.splitext(source)[1]):
            raise UsageError(f"--prompts {source}: no such file or folder")
        ds = _load_dataset(source)
        column = _pick_column(list(ds.column_names), caption_column, source)
        prompts = [str(p).strip() for p in ds[column] if p is not None and str(p).strip()]
    if not prompts:
        raise UsageError(f"--prompts {source}: no non-blank prompt found")
    return prompts
