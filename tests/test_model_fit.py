"""Model-fit checks: sizes a model cannot take are refused before training, in one line naming
the value, the limit and the fix (Backbone.check_fit), for every family; the tests' own sizes
pass. The table is the README's ("Sizes checked against the model")."""
import os
import subprocess
import sys

import pytest

from conftest import FAMILIES, ROOT
from harness import train_args


ROWS = {   # name -> (family, flags, what the one line says)
    "LoRA rank wider than a target layer": ("pixart", ["--lora_rank", "4096"], "--lora_rank 4096 exceeds"),
    "text longer than the tokenizer takes": ("pixart", ["--max_sequence_length", "100000"],
                                             "--max_sequence_length 100000: the text encoder's tokenizer"),
    "text length on a CLIP-only family": ("sd15", ["--max_sequence_length", "100"], "does not apply to sd15"),
    "more patches than the position table": ("sd3", ["--resolution", "4096"], "pos_embed_max_size"),
    "text length ≠ the joint position table": ("cogvideox", ["--max_sequence_length", "200"],
                                               "holds exactly 226 text tokens"),
    "frames not 4k + 1": ("cogvideox", ["--num_frames", "8"], "frames must be 4k + 1; use 5 or 9"),
    "resolution not a multiple of VAE × patch": ("sd3", ["--resolution", "30"], "must be a multiple of"),
    "resolution against FLUX's 2×2 packing": ("flux", ["--resolution", "30"], "2×2 packing"),
    "text longer than FLUX's T5 takes": ("flux", ["--max_sequence_length", "600"], "--max_sequence_length 600"),
    "video frames not 4k + 1 (Wan)": ("wan", ["--num_frames", "8"], "--num_frames 8 must be 4k + 1"),
    "text beyond Wan's UMT5 capacity": ("wan", ["--max_sequence_length", "600"], "Wan's text capacity"),
}


def backbone_for(folder, args):
    from tdm.backbones import load_backbone

    return load_backbone(folder, args.backbone, args.revision, args.variant, args.backbone_options,
                         args.resolution)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tests_own_sizes_fit(tiny_models, tmp_path, family):
    args = train_args(tiny_models(family), str(tmp_path), ["--train_mode", "lora"], family)
    backbone_for(tiny_models(family), args).check_fit(args)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_a_size_the_model_cannot_take_is_refused(tiny_models, tmp_path, row):
    family, flags, message = ROWS[row]
    args = train_args(tiny_models(family), str(tmp_path), flags, family)
    with pytest.raises(ValueError) as error:
        backbone_for(tiny_models(family), args).check_fit(args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_shipped_config_on_a_smaller_model_exits_2_before_any_work(tmp_path):
    """configs/cogvideox_2b.yaml (226 text tokens) on a CogVideoX built for 16: one line, exit 2,
    nothing written (it used to fail deep inside the patch embedding)."""
    from tdm.tiny.cogvideox import build_tiny_cogvideox

    model = build_tiny_cogvideox(str(tmp_path / "small-cogvideox"), text_tokens=16)
    out = tmp_path / "out"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\\na dog\\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_tdm.py"), "--config",
                           os.path.join(ROOT, "configs", "cogvideox_2b.yaml"),
                           "--pretrained_model_name_or_path", model,
                           "--prompts", str(prompts), "--output_dir", str(out), "--train_batch_size", "1",
                           "--backbone_options", "{}", "--resolution", "32"],   # the size: too slow on a CPU
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: --max_sequence_length 226: this CogVideoX's positional table "
                               "holds exactly 16") and not out.exists()


@pytest.mark.parametrize("flags", [(True, None), (None, 2.0)], ids=["guidance_embedding", "student_guidance"])
def test_guidance_flags_are_refused_without_a_guidance_input(tiny_models, flags):
    """docs/method.md §5.1: only guidance-distilled models (FLUX.1-dev) take them."""
    from tdm.backbones import load_backbone

    backbone = load_backbone(tiny_models("pixart"))
    assert backbone.set_guidance(None, None) is False
    with pytest.raises(ValueError, match="need a guidance-distilled model"):
        backbone.set_guidance(*flags)
