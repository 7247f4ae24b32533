#!/usr/bin/env python
"""Write docs/layout.md from the tree: one line per file, each with its one-line description.

    python scripts/readme_layout.py                          # print the block
    python scripts/readme_layout.py --update docs/layout.md  # replace the part between the markers

Listed: the top-level scripts (*.py) and every file under tdm/, scripts/, configs/, docs/ and
tests/; a subfolder of those is one line. A .py file (or a subfolder's __init__.py) is described by
the first sentence of its module docstring, shortened to its leading clause when long; every other
entry by DESCRIPTIONS below. A file with neither is an error, so a new file cannot be left out
silently (tests/test_config_data.py checks that docs/layout.md holds what this prints).
"""
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ["tdm", "scripts", "configs", "docs", "tests"]
START, END = "<!-- layout:start -->", "<!-- layout:end -->"
MAX_CHARS = 120   # a longer first sentence is cut to its leading clause

# Entries without a Python docstring to read the description from, and overrides of a docstring.
DESCRIPTIONS = {
    "scripts/bench_gpu.sh": "GPU benchmark of PixArt-α 512 (real architecture, random weights): training iteration and sampling speed",
    "scripts/demo.sh": "The default job: install into .venv, TDM on a 2-D Gaussian mixture on CPU (`--ablations`, `--unify`)",
    "scripts/setup_env.sh": "Sourced by demo.sh and test.sh: create .venv, install requirements.lock (exact pins) once and this project editable",
    "scripts/test.sh": "Install into .venv (CPU torch, the lock) and run the test suite (`--fast`: the inner loop)",
    "scripts/lock.sh": "Regenerate requirements.lock: resolve the requirement ranges afresh and freeze every package",
    "scripts/check_latest.sh": "Drift check: the suite on the newest versions the requirement ranges allow, and what moved",
    "configs/accelerate/": "Accelerate launch configs: fsdp.yaml shards full fine-tunes of large backbones",
    "configs/cogvideox_2b.yaml": "CogVideoX-2B text-to-video: the released LoRA's grid 999, 856, 665, 399, 49 frames at 480×720",
    "configs/flux_dev.yaml": "FLUX.1-dev, LoRA student: the guidance embedding takes --cfg 3.5, student guidance 1; settings reasoned from sd3_medium.yaml and the model card",
    "configs/flux_schnell.yaml": "FLUX.1-schnell, LoRA student (experimental: its teacher is already a few-step model; cfg 1)",
    "configs/pixart_sigma_1024.yaml": "PixArt-Σ 1024, full fine-tune: the PixArt-α demo recipe on PixArt-Σ's 300-token, 1024 px model",
    "configs/sana_1024.yaml": "SANA 1600M 1024 px, LoRA student: the flow recipe of sd3_medium.yaml on SANA's scheduler and DC-AE",
    "configs/wan21_t2v_1_3b.yaml": "Wan2.1 T2V 1.3B text-to-video, LoRA student: 81 frames at 480×832, grid 999/749/499/249",
    "configs/pixart_alpha_512.yaml": "PixArt-α 512, the authors' public demo settings",
    "configs/pixart_alpha_512_lora.yaml": "PixArt-α 512 with LoRA student and fake score, learning rates raised for LoRA",
    "configs/pixart_alpha_512_paper.yaml": "PixArt-α 512 as reported in the paper: 500 iterations, batch 32, cfg 3.5",
    "configs/pixart_alpha_512_unify.yaml": "PixArt-α 512, one student for 1, 2 and 4 steps (TDM-unify)",
    "configs/sd15_dreamshaper.yaml": "SD1.5 (Dreamshaper-7) as reported in the paper: 3k iterations, batch 256, cfg 3.5",
    "configs/sd3_medium.yaml": "Stable Diffusion 3 Medium, LoRA student; settings are this repo's choice (the paper gives none)",
    "configs/sdxl.yaml": "SDXL base 1.0 as reported in the paper: batch 64, cfg 8, two stages 512 → 1024 px",
    "configs/toy2d_asym.yaml": "Another toy mixture: 5 modes of unequal weights and widths, placed without symmetry (otherwise configs/toy2d.yaml)",
    "configs/toy2d_grid.yaml": "Another toy mixture: 25 narrow modes on a 5 × 5 grid (otherwise configs/toy2d.yaml)",
    "configs/toy2d.yaml": "The default job: TDM on a 2-D Gaussian mixture (`python scripts/toy_benchmark.py --config configs/toy2d.yaml`)",
    # docstring overrides
    "tests/harness.py": "Runs one iteration through train_tdm's own entry points and through tests/reference.py, and compares them",
    "tdm/metrics.py": "Sample-based distances between distributions (the toy benchmark's sliced Wasserstein distance)",
    "docs/benchmarks.md": "Every measurement: toy SWD and MMD² tables, iteration cost, memory, sampling speed, FSDP, with machine, date and command",
    "docs/families.md": "Per model family: configs, loading the student in diffusers, known limits, what was tested",
    "docs/flags.md": "Every flag of train_tdm.py (generated) and the one-line errors bad input gets",
    "docs/evaluation.md": "Evaluation: eval_tdm.py's metrics, the commands for the paper's Table 1 rows, what is untested",
    "docs/layout.md": "Every file of the repository with its one-line description (generated)",
    "docs/method.md": "The algorithm: notation, grid, rollout, draws, both losses, TDM-unify, defaults; `tdm/` cites its sections",
}
SKIP = {"__init__.py", "__pycache__"}


def boundaries(sentence: str) -> dict:
    """Top-level (outside parentheses and backticks) clause ends of `sentence`: "major" before
    ':', ';' or ' — ', "comma" before ',', and "paren", the start of a parenthesis closing it."""
    found = {"major": [], "comma": [], "paren": []}
    depth, code, opened = 0, False, None
    for i, ch in enumerate(sentence):
        if ch == "`":
            code = not code
        elif code:
            continue
        elif ch in "([":
            if depth == 0:
                opened = i
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth == 0 and i == len(sentence) - 1 and sentence[opened - 1:opened] == " ":
                found["paren"].append(opened - 1)
        elif depth == 0 and (ch in ":;" or sentence.startswith(" — ", i)):
            found["major"].append(i)
        elif depth == 0 and ch == ",":
            found["comma"].append(i)
    return found


def shorten(sentence: str) -> str:
    """`sentence` when it fits MAX_CHARS; else, first that applies: without its closing
    parenthesis, up to its last ':', ';' or ' — ' that fits, up to its first one, up to its
    first ',' if that fits; else whole."""
    if len(sentence) <= MAX_CHARS:
        return sentence
    found = boundaries(sentence)
    if found["paren"] and found["paren"][0] <= MAX_CHARS:
        return sentence[:found["paren"][0]]
    fitting = [i for i in found["major"] if i <= MAX_CHARS]
    if fitting or found["major"]:
        return sentence[:(fitting or found["major"])[-1 if fitting else 0]]
    fitting = [i for i in found["comma"] if i <= MAX_CHARS]
    return sentence[:fitting[0]] if fitting else sentence


def docstring_summary(path: str) -> str:
    """First sentence of the module docstring of `path` ('' without one), cut to its leading clause
    when longer than MAX_CHARS."""
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    match = re.match(r"(.+?)\.(\s+[A-Z`(]|$)", paragraph)
    sentence = match.group(1) if match else paragraph.rstrip(".")
    return shorten(sentence)


def describe(rel: str) -> str:
    path = os.path.join(ROOT, rel)
    text = DESCRIPTIONS.get(rel, "")
    if not text and rel.endswith(".py"):
        text = docstring_summary(path)
    elif not text and rel.endswith("/") and os.path.exists(os.path.join(path, "__init__.py")):
        text = docstring_summary(os.path.join(path, "__init__.py"))
    if not text:
        raise SystemExit(f"error: no description for {rel}: give it a module docstring or add it to "
                         "DESCRIPTIONS in scripts/readme_layout.py")
    return text


def entries() -> list:
    """Repository-relative paths to list: top-level scripts, then each folder's files and subfolders."""
    listed = sorted(n for n in os.listdir(ROOT) if n.endswith(".py") and os.path.isfile(os.path.join(ROOT, n)))
    for folder in FOLDERS:
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name in SKIP or name.startswith(".") or name.endswith(".pyc"):
                continue
            rel = f"{folder}/{name}"
            listed.append(rel + "/" if os.path.isdir(os.path.join(ROOT, rel)) else rel)
    return listed


def layout(link_prefix: str = "../") -> str:
    """The list; links are relative to the file it goes in (docs/: "../")."""
    return "\n".join(f"- [`{rel}`]({link_prefix}{rel}) — {describe(rel)}" for rel in entries())


def update(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"error: {path} has no {START} … {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    prefix = os.path.relpath(ROOT, os.path.dirname(os.path.abspath(path))).replace(os.sep, "/")
    block = layout("" if prefix == "." else prefix + "/")   # before opening: an error keeps the file
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{START}\n{block}\n{END}{tail}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--update":
        update(argv[1])
    elif not argv:
        print(layout())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
