"""eval_tdm.py and the model card on tiny real models: CLIP score and FID against independent
computations, the script end to end, its one-line errors, and a card whose snippet runs."""
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import teacher_and_lora_student, tiny_flags
from harness import card_snippet
from scripts.tiny_eval_models import TinyInception, build_tiny_clip

TINY_FID = "scripts.tiny_eval_models:TinyInception"   # --fid_feature_extractor

PROMPTS = ["a red cat sitting on a chair.", "a blue boat at sea", "a cute panda eating bamboo",
           "a white horse standing in a field of flowers"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny real CLIPModel + CLIPProcessor (tokenizer trained locally), saved and reloaded."""
    return build_tiny_clip(str(tmp_path_factory.mktemp("models") / "tiny-clip"))


@pytest.fixture(scope="module")
def lora_export(tiny_pixart, backbone, tmp_path_factory):
    """A train_tdm.py-style LoRA export of a student that differs from the teacher: the LoRA,
    config.yaml and the model card."""
    from tdm.config import parse_args, save_resolved_config
    from tdm.lora import save_lora
    from tdm.model_card import write_model_card

    folder = tmp_path_factory.mktemp("export")
    _, student = teacher_and_lora_student(backbone)
    with torch.no_grad():   # a LoRA strong enough to change the 8-bit image well past rounding
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.mul_(25)
    save_lora(student, str(folder), backbone.lora_prefix)
    args = parse_args(tiny_flags(tiny_pixart, folder, 2))
    save_resolved_config(args, str(folder / "config.yaml"))
    backbone.resolution = args.resolution
    write_model_card(str(folder), backbone, args)
    return folder


def independent_clip_score(path, images, prompts):
    """max(100·cos, 0) from the CLIP towers called directly, with preprocessing by hand (the
    images are already the model's 32 px, so the processor would only rescale and normalise)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path).eval()
    image_processor = CLIPProcessor.from_pretrained(path).image_processor
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    pixels = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32)).permute(2, 0, 1)
                          for i in images]) / 255
    tokens = CLIPProcessor.from_pretrained(path).tokenizer(list(prompts), padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=(pixels - mean) / std).pooler_output)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    cos = torch.nn.functional.cosine_similarity(image.double(), text.double(), dim=-1)
    return (100 * cos).clamp(min=0).numpy(), (100 * cos).numpy()


def closed_form_fid(real_features, fake_features):
    """|μ1 − μ2|² + Tr Σ1 + Tr Σ2 − 2 Tr (Σ1^½ Σ2 Σ1^½)^½, symmetric square roots by eigh."""
    a, b = np.asarray(real_features, np.float64), np.asarray(fake_features, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def features(images):
    from tdm.evaluation import images_to_uint8

    with torch.no_grad():
        return TinyInception()(images_to_uint8(images)).double().numpy()


def random_images(n, size, seed, shift=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, size, size, 3))
    return [Image.fromarray(np.clip(a + shift, 0, 255).astype(np.uint8)) for a in base]


def test_clip_score_is_100_cos_of_the_models_own_embeddings(tiny_clip):
    from tdm.evaluation import clip_scores, load_clip

    images = random_images(6, 32, seed=1)
    prompts = (PROMPTS * 2)[:6]
    model, processor = load_clip(tiny_clip)
    scores = clip_scores(model, processor, images, prompts)
    expected, raw = independent_clip_score(tiny_clip, images, prompts)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():   # text embeddings negated: every cosine changes sign
        model.text_projection.weight.neg_()
    negated = clip_scores(model, processor, images, prompts)
    np.testing.assert_allclose(negated, np.clip(-raw, 0, None), rtol=1e-4, atol=1e-4)
    assert (raw > 0).any() and min(negated) == 0   # max(·, 0) cut a negative cosine


def test_fid_is_zero_against_itself_and_the_closed_form_against_a_shift():
    from tdm.evaluation import fid_compute, fid_metric, fid_update

    images = random_images(24, 16, seed=2)
    shifted = random_images(24, 16, seed=2, shift=40)

    def fid(real, fake):
        metric = fid_metric(TinyInception())
        fid_update(metric, real, real=True)
        fid_update(metric, fake, real=False)
        return fid_compute(metric)

    expected = closed_form_fid(features(images), features(shifted))
    assert expected > 0.05
    assert abs(fid(images, images)) < 1e-4 * expected
    assert fid(images, shifted) == pytest.approx(expected, rel=1e-4)


def test_eval_end_to_end(tiny_pixart, lora_export, tiny_clip, tmp_path):
    """Student and teacher sampled, every metric checked against an independent computation on
    the saved samples; optional metrics skipped with their reason; the card gains the metrics."""
    import eval_tdm

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "eval"
    rc = eval_tdm.main(["--weights", str(lora_export), "--prompts_file", str(prompts_file),
                        "--teacher_steps", "2", "--teacher_cfg", "4.5", "--batch_size", "2",
                        "--clip_model", tiny_clip, "--fid_feature_extractor", TINY_FID,
                        "--output_dir", str(out), "--save_images", "--grid_prompts", "3"])
    assert rc == 0
    result = json.loads((out / "metrics.json").read_text())
    student, teacher = result["rows"]
    assert student["steps"] == 4 and teacher["steps"] == 2
    assert result["student"]["timesteps"] == [899, 674, 449, 224]
    samples = {name: [Image.open(out / name / f"{i:05d}.png").convert("RGB") for i in range(4)]
               for name in ("student", "teacher")}
    assert samples["student"][0].size == (32, 32)
    assert np.abs(np.asarray(samples["student"][0], np.int16)
                  - np.asarray(samples["teacher"][0], np.int16)).max() > 0
    for name, row in (("student", student), ("teacher", teacher)):
        expected, _ = independent_clip_score(tiny_clip, samples[name], PROMPTS)
        np.testing.assert_allclose(result["per_image"][name]["clip_score"], expected, rtol=1e-4, atol=1e-4)
        assert row["clip_score"] == pytest.approx(expected.mean(), rel=1e-4, abs=1e-4)
    expected_fid = closed_form_fid(features(samples["teacher"]), features(samples["student"]))
    assert student["fid"] == pytest.approx(expected_fid, rel=1e-3, abs=1e-6)
    assert teacher["fid"] is None and result["fid_reference"] == "teacher"
    for key, package in (("hpsv2", "hpsv2"), ("image_reward", "ImageReward")):
        try:
            __import__(package)
        except ImportError:
            assert result["metrics"][key]["status"] == "skipped"
            assert "pip install" in result["metrics"][key]["reason"]
            assert student[key] is None
    table = (out / "metrics.md").read_text()
    assert "| model | steps | CLIP | HPSv2 | ImageReward | FID (vs teacher) |" in table
    assert "| TDM 4 steps | 4 |" in table and "| teacher 2 steps, cfg 4.5 | 2 |" in table
    grid = np.asarray(Image.open(out / "samples.png").convert("RGB"))
    assert grid.shape[0] == 64 and (grid.shape[1] - 3 * 32) >= 60   # 2 rows × 3 prompts, labels
    np.testing.assert_array_equal(grid[32:, -32:], np.asarray(samples["student"][2]))
    np.testing.assert_array_equal(grid[:32, -32:], np.asarray(samples["teacher"][2]))
    card = (lora_export / "README.md").read_text()
    assert "## Metrics" in card and "| TDM 4 steps | 4 |" in card


@pytest.mark.parametrize("bad", [
    ["--prompts_file", "missing.txt"],
    ["--prompt", "x", "--weights", "no-such-folder"],
    ["--prompt", "x", "--metrics", "clip,aesthetics"],
    ["--prompt", "x", "--reference_dir", "no-such-dir"],
    ["--prompt", "x", "--teacher_steps", "0"],
    ["--prompt", "x", "--fid_feature_extractor", "no_such_module:make"],
    ["--prompt", "x", "--clip_model", "./no-such-clip-folder"],
    ["--prompt", "x", "--clip_model", "EMPTY_FOLDER"],
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(lora_export, tmp_path, capsys, bad):
    import eval_tdm

    out = tmp_path / "eval"
    card = (lora_export / "README.md").read_text()
    (tmp_path / "empty").mkdir()
    bad = [str(tmp_path / "empty") if a == "EMPTY_FOLDER" else a for a in bad]
    rc = eval_tdm.main(["--weights", str(lora_export), "--output_dir", str(out), *bad])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert not out.exists() and (lora_export / "README.md").read_text() == card


def test_model_card_front_matter_and_snippet_reproduce_infer_tdm(lora_export, tmp_path):
    """The card's loading snippet, run as written, samples what infer_tdm.py samples."""
    import eval_tdm
    import infer_tdm
    from tdm.model_card import EXAMPLE_PROMPT

    card = (lora_export / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "diffusers" and front["base_model"]
    assert {"text-to-image", "tdm", "lora", "pixart"} <= set(front["tags"])
    assert "899, 674, 449, 224" in card and "## Training flags" in card
    namespace = {}
    exec(compile(card_snippet(card), "model_card_snippet", "exec"), namespace)
    snippet_image = np.asarray(namespace["image"].convert("RGB"), np.int16)
    png = tmp_path / "infer.png"
    assert infer_tdm.main(["--weights", str(lora_export), "--prompt", EXAMPLE_PROMPT,
                           "--output", str(png), "--seed", "0"]) == 0
    infer_image = np.asarray(Image.open(png).convert("RGB"), np.int16)
    assert snippet_image.shape == infer_image.shape == (32, 32, 3)
    assert np.abs(snippet_image - infer_image).max() <= 1
    snippet = card_snippet(card)   # the same call with the LoRA off: the teacher, another image
    namespace["pipe"].transformer.disable_adapters()
    exec(compile(snippet[snippet.index("image = pipe("):], "call", "exec"), namespace)
    assert np.abs(np.asarray(namespace["image"].convert("RGB"), np.int16) - snippet_image).max() > 8


def test_model_card_of_a_full_student_loads_its_folder(tiny_pixart, backbone, tmp_path):
    """The generic snippet (pipeline_class_names[0], the denoiser class as a component) runs for a
    full export and loads the student's weights, not the teacher's."""
    import eval_tdm
    import infer_tdm
    from tdm.config import parse_args
    from tdm.model_card import EXAMPLE_PROMPT, write_model_card

    full = backbone.load_denoiser()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():   # a student that differs from the teacher
        for p in full.parameters():
            p.add_(0.5 * p.std().nan_to_num() * torch.randn(p.shape, generator=generator))
    full.save_pretrained(str(tmp_path / "transformer"))
    args = parse_args(tiny_flags(tiny_pixart, tmp_path, 2, "--train_mode", "full"))
    backbone.resolution = 32
    write_model_card(str(tmp_path), backbone, args)
    card = (tmp_path / "README.md").read_text()
    assert "transformer = PixArtTransformer2DModel.from_pretrained(" in card and "lora" not in \
        yaml.safe_load(card.split("---\n")[1])["tags"]
    namespace = {}
    exec(compile(card_snippet(card), "model_card_snippet", "exec"), namespace)
    png = tmp_path / "infer.png"
    assert infer_tdm.main(["--weights", str(tmp_path / "transformer"), "--pretrained_model_name_or_path",
                           tiny_pixart, "--prompt", EXAMPLE_PROMPT, "--output", str(png),
                           "--height", "32"]) == 0
    expected = np.asarray(Image.open(png).convert("RGB"), np.int16)
    snippet_image = np.asarray(namespace["image"].convert("RGB"), np.int16)
    assert np.abs(snippet_image - expected).max() <= 1
    assert infer_tdm.main(["--pretrained_model_name_or_path", tiny_pixart, "--prompt", EXAMPLE_PROMPT,
                           "--output", str(png), "--height", "32"]) == 0   # the teacher on the grid
    assert np.abs(np.asarray(Image.open(png).convert("RGB"), np.int16) - snippet_image).max() > 8


def test_reference_images_are_centre_cropped_to_the_samples_and_scored_by_fid(lora_export, tmp_path):
    """--reference_dir: images of another shape are centre-cropped and resized to the samples'
    size; with --teacher_steps 0 the student's FID is against them, by the closed form."""
    import eval_tdm
    from tdm.evaluation import reference_batches

    reference = tmp_path / "reference"
    reference.mkdir()
    wide = random_images(5, 64, seed=4)
    for i, image in enumerate(wide):
        image.crop((0, 8, 64, 56)).save(reference / f"{i}.png")   # 64×48
    batches = list(reference_batches(str(reference), (32, 32), batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1] and batches[0][0].size == (32, 32)
    expected = Image.open(reference / "0.png").crop((8, 0, 56, 48)).resize((32, 32), Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(batches[0][0]), np.asarray(expected))
    out = tmp_path / "eval"
    assert eval_tdm.main(["--weights", str(lora_export), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                          "--prompt", PROMPTS[2], "--teacher_steps", "0", "--metrics", "fid",
                          "--reference_dir", str(reference), "--output_dir", str(out), "--save_images",
                          "--fid_feature_extractor", TINY_FID]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert [row["model"] for row in result["rows"]] == ["TDM 4 steps"]
    student = [Image.open(out / "student" / f"{i:05d}.png").convert("RGB") for i in range(3)]
    references = [image for batch in batches for image in batch]
    assert result["rows"][0]["fid"] == pytest.approx(
        closed_form_fid(features(references), features(student)), rel=1e-3)
    assert result["metrics"]["clip_score"]["status"] == "skipped"


# -- optional metrics: every failure is a one-line skip with the real reason ---------------------
@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """stand_in(package, source): a package of that name on sys.path whose __init__ is `source`
    (an installed package as it fails, or works, here); removed again afterwards."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    made = []

    def make(package, source):
        (site / package).mkdir()
        (site / package / "__init__.py").write_text(source)
        made.append(package)
        importlib.invalidate_caches()

    yield make
    for name in list(sys.modules):
        if name.split(".")[0] in made:
            del sys.modules[name]


HPSV2_1_2_0 = ("raise FileNotFoundError(2, 'No such file or directory', "
               "'/site/hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz')\n")
IMAGE_REWARD_1_5 = ("from transformers.modeling_utils import apply_chunking_to_forward  "
                    "# gone in transformers 5\n")


@pytest.mark.parametrize("package, source, says", [
    ("hpsv2", HPSV2_1_2_0, "hpsv2 is installed but it fails at import (FileNotFoundError: [Errno 2] "
     "No such file or directory: '/site/hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz')"),
    ("ImageReward", IMAGE_REWARD_1_5, "image-reward is installed but it fails at import "
     "(ImportError: cannot import name 'apply_chunking_to_forward' from 'transformers.modeling_utils'"),
    ("hpsv2", "import clint\n", "hpsv2 is installed but its dependency clint is not installed "
     "(ModuleNotFoundError: No module named 'clint')"),
])
def test_an_optional_package_failing_at_import_is_named_broken_not_missing(stand_in, package, source,
                                                                           says):
    from tdm.evaluation import Unavailable, load_hpsv2, load_image_reward

    stand_in(package, source)
    with pytest.raises(Unavailable) as error:
        (load_hpsv2 if package == "hpsv2" else load_image_reward)()
    assert str(error.value).startswith(says)


def test_an_optional_package_not_installed_is_named_so():
    from tdm.evaluation import Unavailable, load_hpsv2, load_image_reward

    for load, module, package in ((load_hpsv2, "hpsv2", "hpsv2"),
                                  (load_image_reward, "ImageReward", "image-reward")):
        if importlib.util.find_spec(module) is not None:
            continue   # installed here: tested above with stand-ins
        with pytest.raises(Unavailable, match=f"^{package} is not installed; pip install {package}$"):
            load()


def test_standard_fid_resizes_as_the_original_not_antialiased(monkeypatch):
    """The default FID network is torchmetrics' InceptionV3 built with antialias=False: the
    original FID's TensorFlow-compatible bilinear resize to 299 px (torchmetrics' default,
    antialiased, differs from it, as its docs say). torch-fidelity and its weights are not
    installed here: the network class records how it is built."""
    import torchmetrics.image.fid as tm_fid

    from tdm.evaluation import fid_metric

    built = {}

    class InceptionAsBuilt(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, antialias=True):
            super().__init__()
            built.update(name=name, features=features_list, antialias=antialias)

    monkeypatch.setattr(tm_fid, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", InceptionAsBuilt)
    fid_metric()
    assert built == {"name": "inception-v3-compat", "features": ["2048"], "antialias": False}


def test_fid_of_too_few_images_is_flagged():
    """Same-distribution FID falls from 7.7 at 8 images to 0.3 at 512 on 64-d features: below
    5 images per feature dimension the number is flagged, at and above it is not."""
    from tdm.evaluation import fid_sample_warning

    rng = np.random.default_rng(0)

    def same_distribution_fid(n):
        return closed_form_fid(rng.standard_normal((n, 64)), rng.standard_normal((n, 64)))

    assert same_distribution_fid(8) > 10 * same_distribution_fid(512)
    assert "FID from 8 images a side of 64-d features is biased upwards" in fid_sample_warning(8, 64)
    assert "320 or more" in fid_sample_warning(319, 64)
    assert fid_sample_warning(320, 64) is None and fid_sample_warning(10_240, 2048) is None
    assert "10,240 or more" in fid_sample_warning(3_200, 2048)


def test_failing_optional_metrics_are_skipped_on_screen_and_the_rest_is_measured(
        lora_export, tiny_clip, stand_in, tmp_path, capsys):
    """hpsv2 raising at import and an ImageReward that loads but fails while scoring: both are
    one line on screen, with the reason, and in metrics.md; CLIP and FID are measured; the table,
    the FID network used and its warning (4 images) are printed."""
    import eval_tdm

    stand_in("hpsv2", HPSV2_1_2_0)
    stand_in("ImageReward", "class Model:\n"
             "    def score(self, prompt, image):\n"
             "        raise RuntimeError('expected all tensors to be on the same device')\n"
             "def load(name, device):\n"
             "    return Model()\n")
    out = tmp_path / "eval"
    rc = eval_tdm.main(["--weights", str(lora_export), *sum((["--prompt", p] for p in PROMPTS), []),
                        "--teacher_steps", "2", "--batch_size", "2", "--clip_model", tiny_clip,
                        "--fid_feature_extractor", TINY_FID, "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads((out / "metrics.json").read_text())
    status = result["metrics"]
    assert status["hpsv2"]["reason"].startswith("hpsv2 is installed but it fails at import "
                                                "(FileNotFoundError")
    assert status["image_reward"] == {"status": "skipped", "reason": "failed while scoring: "
                                      "RuntimeError: expected all tensors to be on the same device"}
    assert status["clip_score"]["status"] == status["fid"]["status"] == "ok"
    assert "FID from 4 images a side of 8-d features is biased upwards" in status["fid"]["warning"]
    student = result["rows"][0]
    assert student["clip_score"] is not None and student["fid"] is not None
    assert student["image_reward"] is None and "image_reward" not in result["per_image"]["student"]
    report = (out / "metrics.md").read_text()
    for line in ("| model | steps | CLIP | HPSv2 | ImageReward | FID (vs teacher) |",
                 f"- hpsv2: skipped ({status['hpsv2']['reason']})",
                 f"- image_reward: skipped ({status['image_reward']['reason']})",
                 f"Warning: {status['fid']['warning']}.",
                 f"FID features: {TINY_FID}: not InceptionV3, not comparable to published FIDs."):
        assert line in report and line in captured.out, line
    assert f"| TDM 4 steps | 4 | {student['clip_score']:.2f} ± {student['clip_score_sem']:.2f} |" in report
    errors = captured.err.replace("\r", "\n").splitlines()
    assert f"hpsv2: skipped ({status['hpsv2']['reason']})" in errors
    assert f"image_reward: skipped ({status['image_reward']['reason']})" in errors
    assert f"warning: {status['fid']['warning']}" in errors


def test_no_requested_metric_can_run_is_one_line_before_any_sampling(lora_export, stand_in, tmp_path,
                                                                     capsys):
    import eval_tdm

    stand_in("hpsv2", HPSV2_1_2_0)
    out = tmp_path / "eval"
    card = (lora_export / "README.md").read_text()
    rc = eval_tdm.main(["--weights", str(lora_export), "--prompt", "a cat", "--metrics", "hpsv2",
                        "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --metrics hpsv2: none can run here (hpsv2: hpsv2 "
                                          "is installed but it fails at import (FileNotFoundError")
    assert not out.exists() and (lora_export / "README.md").read_text() == card


def test_infer_and_eval_read_one_list_of_samplers_and_dtypes():
    """--sampler and --dtype: the choices written once (infer_tdm) and their default by device."""
    import eval_tdm
    import infer_tdm

    for parser in (infer_tdm.build_parser(), eval_tdm.build_parser()):
        actions = {a.dest: a for a in parser._actions}
        assert tuple(actions["sampler"].choices) == ("grid", "upstream")
        assert tuple(actions["dtype"].choices) == ("fp32", "fp16", "bf16")
    assert infer_tdm.inference_dtype(None, torch.device("cpu")) == torch.float32
    assert infer_tdm.inference_dtype(None, torch.device("cuda")) == torch.float16
    assert infer_tdm.inference_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_mean_and_error_by_hand():
    """The ± of per-image metrics: the sample standard deviation (n − 1) over √n."""
    from tdm.evaluation import mean_and_error

    mean, sem = mean_and_error([1.0, 2.0, 3.0, 6.0])   # mean 3, Σ(x − 3)² = 14, s² = 14/3
    assert mean == 3.0 and sem == pytest.approx((14 / 3) ** 0.5 / 2, rel=1e-15)
    assert mean_and_error([5.0]) == (5.0, None) and mean_and_error([]) == (None, None)
