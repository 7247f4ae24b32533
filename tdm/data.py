"""Prompts: the only data TDM needs (docs/method.md §1: data-free, no images are read)."""
from __future__ import annotations

import contextlib
import os
from typing import List, Optional

from .checks import UsageError, first_line, offline_hint

CAPTION_COLUMNS = ("prompt", "caption", "text")
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _read_lines(path: str, flag: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as error:
        raise UsageError(f"{flag} {path}: not UTF-8 text (byte {error.object[error.start]:#04x} at "
                         f"offset {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None


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


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars, and no log lines of datasets' own: a file it cannot read is reported
    once, in our one-line error."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        datasets.enable_progress_bars()


def _load_dataset(source: str):
    with _quiet_datasets() as datasets:
        ext = os.path.splitext(source)[1].lower()
        if os.path.isfile(source) and ext in TABLE_FORMATS:
            return datasets.load_dataset(TABLE_FORMATS[ext], data_files=source, split="train")
        if os.path.isdir(source):
            if os.path.exists(os.path.join(source, "dataset_info.json")) or \
                    os.path.exists(os.path.join(source, "state.json")):
                ds = datasets.load_from_disk(source)
            else:
                ds = datasets.load_dataset(source)
            return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(source, split="train")  # a datasets hub id


def _root_cause(error: BaseException) -> BaseException:
    """datasets wraps the reader's error (ArrowInvalid, UnicodeDecodeError) in its own."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _read_table(source: str, flag: str):
    if os.path.isdir(source) and not os.listdir(source):
        raise UsageError(f"{flag} {source}: empty folder; give a prompt file or a dataset folder")
    try:
        return _load_dataset(source)
    except Exception as error:   # whatever datasets or its readers raise for this source
        cause = _root_cause(error)
        reason = offline_hint(error) or f"cannot read it ({type(cause).__name__}: {first_line(cause)})"
        raise UsageError(f"{flag} {source}: {reason}") from None


def load_prompts(source: str, caption_column: Optional[str] = None, flag: str = "--prompts") -> List[str]:
    """Read prompts from a .txt (one a line), a table file, a dataset folder or a hub id; whatever
    cannot be read (encoding, corrupt file, empty folder, no prompt) is a one-line UsageError."""
    if os.path.isfile(source) and source.lower().endswith(".txt"):
        prompts = _read_lines(source, flag)
    elif os.path.isfile(source) and os.path.splitext(source)[1].lower() not in TABLE_FORMATS:
        raise UsageError(f"{flag} {source}: unsupported file type; use .txt, "
                         + ", ".join(TABLE_FORMATS) + " or a dataset folder")
    else:
        if not os.path.exists(source) and (source.startswith((".", "/")) or
                                           os.path.splitext(source)[1]):
            raise UsageError(f"{flag} {source}: no such file or folder")
        ds = _read_table(source, flag)
        column = _pick_column(list(ds.column_names), caption_column, source)
        prompts = [str(p).strip() for p in ds[column] if p is not None and str(p).strip()]
    if not prompts:
        raise UsageError(f"{flag} {source}: no non-blank prompt found")
    return prompts
