"""Step conditions (docs/method.md §6): the embedding, its effect on every backbone, TDM-unify's draws
and conditions, and a unify student's export → load → sample round trip."""
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, accelerate_launch, loaded_backbone, run_script
from tdm.step_condition import (FAKE_SCORE, NUM_STEPS, STEP_INDEX, STUDENT, StepEmbedding,
                                attach_step_embeddings, set_num_steps, step_tables)


def test_step_embedding_sums_the_rows_of_its_tables():
    emb = StepEmbedding(3, {NUM_STEPS: 5, STEP_INDEX: 5})
    assert all(torch.equal(t.weight, torch.zeros(5, 3)) for t in emb.tables.values())   # zero init
    with torch.no_grad():
        emb.tables[NUM_STEPS].weight.copy_(torch.arange(15.0).reshape(5, 3))
        emb.tables[STEP_INDEX].weight.copy_(100 * torch.arange(15.0).reshape(5, 3))
    out = emb({NUM_STEPS: torch.tensor([1, 4]), STEP_INDEX: torch.tensor([2, 0])})
    # row 1 of the first table [3, 4, 5] + row 2 of the second [600, 700, 800];
    # row 4 [12, 13, 14] + row 0 [0, 100, 200]
    assert torch.equal(out, torch.tensor([[603.0, 704.0, 805.0], [12.0, 113.0, 214.0]]))
    with pytest.raises(KeyError, match="without its condition"):
        emb({NUM_STEPS: torch.tensor([1])})


def test_step_tables_per_role():
    assert step_tables(4, [1, 2, 4], False) == {STUDENT: {NUM_STEPS: 5}, FAKE_SCORE: {NUM_STEPS: 5}}
    assert step_tables(4, [1, 2, 4], True) == {STUDENT: {NUM_STEPS: 5},
                                                FAKE_SCORE: {NUM_STEPS: 5, STEP_INDEX: 5}}
    assert step_tables(4, None, True) == {STUDENT: {}, FAKE_SCORE: {STEP_INDEX: 5}}
    assert step_tables(4, None, False) == {STUDENT: {}, FAKE_SCORE: {}}


# -- every backbone -----------------------------------------------------------------------------
def _family(name, folder):
    """(backbone, latent shape) of a tiny real pipeline of the family."""
    from tdm.tiny import build_tiny_pixart
    from tdm.tiny.cogvideox import build_tiny_cogvideox
    from tdm.tiny.sd import build_tiny_sd15, build_tiny_sdxl
    from tdm.tiny.sd3 import build_tiny_sd3

    if name == "toy2d":
        from tdm.backbones import load_backbone
        from tdm.toy.teacher import ensure_teacher

        options = {"network": {"hidden": 32, "depth": 1, "time_channels": 16},
                   "teacher": {"steps": 5, "batch_size": 64}}
        backbone = load_backbone(ensure_teacher(str(folder), options), "toy2d", options=options)
        backbone.load_text_encoders("cpu", torch.float32)
        return backbone, (2,)
    build = {"pixart": build_tiny_pixart, "sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl,
             "sd3": build_tiny_sd3, "cogvideox": build_tiny_cogvideox}[name]
    backbone = loaded_backbone(build(str(folder)), resolution=32)
    return backbone, backbone.latent_shape(32, 9 if backbone.is_video else None)


@pytest.mark.parametrize("family", ["pixart", "sd15", "sdxl", "sd3", "cogvideox", "toy2d"])
def test_zero_embedding_is_the_unconditioned_model_and_a_trained_one_is_live(family, tmp_path):
    backbone, shape = _family(family, tmp_path / family)
    net = backbone.load_denoiser().eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([899, 449])
    cond = backbone.encode_prompts(["0", "1"] if family == "toy2d" else ["a red car", "a blue bird"])
    with torch.no_grad():
        before = backbone.denoiser(net)(x, t, cond)[0]
        holder = attach_step_embeddings(net, backbone.step_embedding_site, {STUDENT: {NUM_STEPS: 5}})
        student = backbone.denoiser(net, STUDENT)
        with_k = lambda k: student(x, t, {**cond, NUM_STEPS: torch.tensor(k)})[0]  # noqa: E731
        assert torch.equal(with_k([1, 4]), before)        # zero-initialised: exactly the teacher
        torch.nn.init.normal_(holder[STUDENT].tables[NUM_STEPS].weight, std=1.0)   # "trained"
        one, four = with_k([1, 1]), with_k([4, 4])
        assert not torch.allclose(one, four, atol=1e-4) and not torch.allclose(one, before, atol=1e-4)
        assert torch.allclose(with_k([1, 4])[1], four[1], atol=1e-5)   # per-sample condition
        assert torch.equal(backbone.denoiser(net)(x, t, cond)[0], before)   # teacher role: no embedding
        set_num_steps(net, 4)                     # inference: one K for every later call
        assert torch.allclose(backbone.denoiser(net)(x, t, cond)[0], four, atol=1e-5)
        set_num_steps(net, None)                  # and none: the stock network again
        assert torch.equal(backbone.denoiser(net)(x, t, cond)[0], before)


# -- TDM-unify draws and conditions ---------------------------------------------------------------
class Recorder:
    """A denoiser function that records the conditions it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_t, t, cond):
        self.calls.append({k: v.clone() for k, v in cond.items() if k in (NUM_STEPS, STEP_INDEX)})
        return torch.zeros_like(x_t), torch.zeros_like(x_t)


def test_unify_draws_one_grid_per_iteration_and_conditions_both_roles():
    from tdm.method import TDM, TDMConfig, TrainingRNG
    from tdm.path import GaussianPath
    from tdm.trajectory import StepGrid

    path = GaussianPath.from_alphas_cumprod(torch.linspace(0.9999, 0.01, 1000))
    tdm = TDM(path, StepGrid.uniform(4, 900),
              TDMConfig(unify_steps=(1, 2, 4), fake_step_condition=True), TrainingRNG("cpu", 0))
    assert {K: g.timesteps for K, g in tdm.grids.items()} == {
        1: [899], 2: [899, 449], 4: [899, 674, 449, 224]}
    seen = set()
    cond = {"encoder_hidden_states": torch.zeros(3, 2, 4)}
    for _ in range(30):
        student, fake = Recorder(), Recorder()
        iteration = tdm.start(student, cond, {"encoder_hidden_states": torch.zeros(1, 2, 4)}, (2,), "cpu")
        K, fake_draw, gen_draw = iteration.num_steps, iteration.fake_score_draw, iteration.student_draw
        seen.add(K)
        assert fake_draw.num_steps == gen_draw.num_steps == K
        assert int(fake_draw.k.max()) <= K and int(gen_draw.k.max()) <= K
        assert iteration.trajectory.states.shape[0] == K
        tdm.fake_score_loss(iteration, fake)
        tdm.student_loss(iteration, student, Recorder(), fake)
        assert all(torch.all(c[NUM_STEPS] == K) and STEP_INDEX not in c for c in student.calls)
        assert [c[STEP_INDEX].tolist() for c in fake.calls] == [fake_draw.k.tolist(), gen_draw.k.tolist()]
        assert all(torch.all(c[NUM_STEPS] == K) for c in fake.calls)
    assert seen == {1, 2, 4}
    # without unify nothing is added, and the draws consume no extra randomness
    plain = TDM(path, StepGrid.uniform(4, 900), TDMConfig(), TrainingRNG("cpu", 0))
    assert plain.student_condition(cond, 4) is cond and plain.step_counts == [4]


def test_shared_draw_state_is_checkpointed():
    from tdm.method import TrainingRNG

    a = TrainingRNG("cpu", 5, shared_seed=0)
    torch.rand(3, generator=a.shared_rng)
    b = TrainingRNG("cpu", 7, shared_seed=1)
    b.load_state_dict(a.state_dict())
    assert torch.equal(torch.rand(4, generator=a.shared_rng), torch.rand(4, generator=b.shared_rng))


# -- export → load → sample ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_unify_student_exports_loads_and_samples(tiny_pixart, backbone, train_mode, tmp_path):
    from infer_tdm import sample_student, student_pipeline
    from tdm.method import TDM, TDMConfig
    from tdm.sampling import resolve_weights
    from tdm.trajectory import StepGrid

    out = tmp_path / "run"
    proc = accelerate_launch([
        "--pretrained_model_name_or_path", tiny_pixart, "--output_dir", str(out), "--resolution", "32",
        "--train_mode", train_mode, "--unify_steps", "1,2,4", "--fake_step_condition",
        "--max_train_steps", "3", "--seed", "0", "--train_batch_size", "2", "--learning_rate", "1e-3",
        "--lora_rank", "4", "--validation_steps", "3", "--checkpointing_steps", "0", "--report_to", "none"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "samples" / "step-000003.png").is_file()       # one row per K
    folder = out if train_mode == "lora" else out / "transformer"
    steps = load_file(str(folder / "step_embedding.safetensors"))
    assert set(steps) == {"num_steps.weight"}                    # the student's table only
    trained_rows = [k for k in range(5) if steps["num_steps.weight"][k].abs().sum() > 0]
    assert trained_rows and set(trained_rows) <= {1, 2, 4}     # the K drawn in 3 iterations
    if train_mode == "full":       # the model file stays stock: no step-embedding keys in it
        keys = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
        assert not any(k.startswith("tdm_step_embedding") for k in keys)

    weights = resolve_weights(str(out))
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    prompts = ["a red car", "a blue bird"]
    K = max(trained_rows)   # (PixArtAlphaPipeline cannot sample 1 step with DPM-Solver: docs/families.md)
    pipe, _ = student_pipeline(tiny_pixart, weights, 1.0, torch.float32, "cpu", num_steps=K)
    grid = StepGrid.uniform(K, 900)
    stock = sample_student(pipe, backbone, prompts, grid.timesteps, latents=noise,
                           output_type="latent").images
    # the training rollout of the same network, conditioned as in training
    cond = backbone.encode_prompts(prompts)
    ours = TDM(backbone.path, grid, TDMConfig(unify_steps=(1, 2, 4))).rollout(
        backbone.denoiser(pipe.transformer, STUDENT), noise, cond, num_steps=K).sample
    assert torch.allclose(stock, ours, atol=1e-4)

    # infer_tdm.py applies it from --num_inference_steps; without the file the student still loads
    png = tmp_path / "k2.png"
    proc = run_script([sys.executable, os.path.join(ROOT, "infer_tdm.py"), "--weights", str(out), "--prompt", "a red car",
                       "--num_inference_steps", "2", "--teacher_steps", "2", "--output", str(png)])
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    os.remove(folder / "step_embedding.safetensors")
    plain, _ = student_pipeline(tiny_pixart, weights, 1.0, torch.float32, "cpu", num_steps=2)
    unconditioned = sample_student(plain, backbone, prompts, grid.timesteps, latents=noise,
                                   output_type="latent").images
    assert not torch.allclose(unconditioned, stock, atol=1e-5)    # the condition is live
