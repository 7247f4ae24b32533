"""The cheaper iteration computes the same thing: shared-base LoRA, lazy rollout, shared step draw."""
import torch

from tdm.method import TDM, TDMConfig, TrainingRNG
from tdm.networks import build_networks, lora_networks
from tdm.trajectory import StepGrid

PROMPTS = ["a red cat on a mat", "a blue boat at sea", "a green tree", "a yellow bird"]


def perturb(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def make_lora(backbone):
    nets = lora_networks(backbone, torch.float32, "cpu", rank=4, alpha=4.0, gradient_checkpointing=False)
    perturb(nets.student_params, 0)
    perturb(nets.fake_score_params, 1)
    return nets


def test_shared_base_roles_match_separate_networks(backbone):
    nets = make_lora(backbone)
    plain = backbone.denoiser(backbone.load_denoiser())
    assert len(nets.modules()) == 1
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([300, 700])
    cond = backbone.encode_prompts(PROMPTS[:2])
    teacher_x0 = nets.teacher(x, t, cond)[0]
    torch.testing.assert_close(teacher_x0, plain(x, t, cond)[0])        # adapters off = teacher
    student_x0, fake_x0 = nets.student(x, t, cond)[0], nets.fake_score(x, t, cond)[0]
    assert (student_x0 - teacher_x0).abs().max() > 1e-4
    assert (fake_x0 - student_x0).abs().max() > 1e-4
    torch.testing.assert_close(nets.teacher(x, t, cond)[0], teacher_x0)  # switching is stateless


def test_each_update_trains_only_its_adapter(backbone):
    nets = make_lora(backbone)
    cond = backbone.encode_prompts(PROMPTS[:2])
    tdm = TDM(backbone.path, StepGrid.uniform(4, 900), TDMConfig(cfg=4.5))
    iteration = tdm.start(nets.student_eval, cond, backbone.encode_prompts([""]), (4, 16, 16), "cpu")
    tdm.fake_score_loss(iteration, nets.fake_score).backward()
    assert all(p.grad is None for p in nets.student_params)
    assert sum(p.grad.abs().sum() for p in nets.fake_score_params) > 0
    for p in nets.fake_score_params:
        p.grad = None
    # the teacher and fake-score calls after the student's forward must not cut its gradient
    tdm.student_loss(iteration, nets.student, nets.teacher, nets.fake_score_eval).backward()
    assert all(p.grad is None for p in nets.fake_score_params)
    assert sum(p.grad.abs().sum() for p in nets.student_params if p.grad is not None) > 0


def losses(backbone, nets, config, seed=0):
    cond = backbone.encode_prompts(PROMPTS)
    tdm = TDM(backbone.path, StepGrid.uniform(4, 900), config, TrainingRNG("cpu", seed))
    iteration = tdm.start(nets.student_eval, cond, backbone.encode_prompts([""]), (4, 16, 16), "cpu")
    fake_score = tdm.fake_score_loss(iteration, nets.fake_score)
    student = tdm.student_loss(iteration, nets.student, nets.teacher, nets.fake_score_eval)
    return fake_score.item(), student.item(), iteration


def test_lazy_rollout_gives_the_same_losses(backbone):
    nets = make_lora(backbone)
    for seed in range(3):
        lazy = losses(backbone, nets, TDMConfig(cfg=4.5, full_rollout=False), seed)
        full = losses(backbone, nets, TDMConfig(cfg=4.5, full_rollout=True), seed)
        torch.testing.assert_close(lazy[0], full[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lazy[1], full[1], rtol=1e-5, atol=1e-6)
        iteration = lazy[2]
        depth = torch.maximum(5 - iteration.fake_score_draw.k, 4 - iteration.student_draw.k)
        for b in range(4):   # untouched rows really were skipped (zeros past each depth)
            assert torch.count_nonzero(iteration.trajectory.x0[: 4 - depth[b], b]) == 0
        assert torch.count_nonzero(full[2].trajectory.x0) == full[2].trajectory.x0.numel()


def test_shared_step_draw_reuses_k(backbone):
    tdm = TDM(backbone.path, StepGrid.uniform(4, 900), TDMConfig(share_step_draw=True),
              TrainingRNG("cpu", 0))
    fake_score_draw, student_draw = tdm.draw(4, 64, "cpu")
    assert torch.equal(fake_score_draw.k, student_draw.k)
    assert not torch.equal(fake_score_draw.t, student_draw.t)


def test_recompute_runs_under_the_role_of_its_forward(backbone):
    """The student update's order: student forward, teacher and fake-score calls, backward.
    With checkpointing, every block recomputed in backward runs as the student, with the very
    weights of the student's forward (its adapter merged into the base), and outside calls no
    role is set; the teacher computes with the base alone."""
    from tdm.roles import role_scope
    from tdm.step_condition import STUDENT, TEACHER

    nets = lora_networks(backbone, torch.float32, "cpu", rank=4, alpha=4.0, gradient_checkpointing=True)
    perturb(nets.student_params, 0)
    perturb(nets.fake_score_params, 1)
    base, scope = nets.student.module, role_scope(nets.student.module)
    seen = []
    block = base.transformer_blocks[0]
    block.register_forward_pre_hook(lambda m, a: seen.append(
        (torch.is_grad_enabled(), scope.current.role, scope.current.weights)))
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([300, 700])
    cond = backbone.encode_prompts(PROMPTS[:2])
    x0, _ = nets.student(x, t, cond)
    (_, _, forward_weights), = seen
    assert scope.current is None
    to_q = block.attn1.to_q
    merged = forward_weights[scope.layers.index(to_q)]
    A, B = to_q.lora_A[STUDENT].weight, to_q.lora_B[STUDENT].weight
    torch.testing.assert_close(merged, to_q.base_layer.weight + to_q.scaling[STUDENT] * B @ A)
    with torch.no_grad():
        nets.teacher(x, t, cond)
        nets.fake_score(x, t, cond)
    seen.clear()
    x0.square().mean().backward()
    assert len(seen) == 1 and seen[0][:2] == (True, STUDENT)   # one recompute, as the student,
    assert seen[0][2] is forward_weights                       # with its forward's weights
    assert scope.current is None
    assert all(p.grad is None for p in nets.fake_score_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.student_params)
    seen.clear()
    nets.teacher(x, t, cond)
    assert seen[0][1:] == (TEACHER, None)   # teacher: the base's own weights


def test_cast_copies_are_autocasts_own(backbone):
    """Full mode under bf16 autocast: each call casts the trainable Linear/Conv weights together
    (tdm.call_weights.WorkingCopies) instead of autocast casting each at each use; the forward and
    every gradient are bitwise what autocast alone computes."""
    from tdm.roles import role_scope
    from test_roles import CPU

    nets = build_networks(backbone, "full", torch.bfloat16, CPU(), gradient_checkpointing=True)
    scope = role_scope(nets.student.module)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([300, 700])
    cond = backbone.encode_prompts(PROMPTS[:2])

    def call():
        for p in nets.student_params:
            p.grad = None
        with torch.autocast("cpu", torch.bfloat16):
            x0, _ = nets.student(x, t, cond)
        x0.square().mean().backward()
        return x0.detach(), [p.grad.clone() for p in nets.student_params]

    copies = scope.weights
    with torch.autocast("cpu", torch.bfloat16):   # the copies exist only under autocast
        assert all(w.dtype == torch.bfloat16 for w, _ in copies.for_call(None, ()))
    assert copies.for_call(None, ()) is None
    x0, grads = call()
    scope.weights = None   # autocast casts each weight itself
    x0_autocast, grads_autocast = call()
    torch.testing.assert_close(x0, x0_autocast, rtol=0, atol=0)
    for g, want in zip(grads, grads_autocast):
        torch.testing.assert_close(g, want, rtol=0, atol=0)


def test_lean_attention_computes_the_stock_processor(backbone):
    """tdm.attention.LeanAttnProcessor gives the stock AttnProcessor2_0's values, with the
    padding mask of PixArt's cross-attention, in fp32 and under bf16 autocast."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from tdm.attention import LeanAttnProcessor, lean_attention

    stock = backbone.load_denoiser().requires_grad_(False)
    lean = backbone.load_denoiser().requires_grad_(False)
    assert lean_attention(lean) == 2 * len(lean.transformer_blocks)
    assert all(type(m.processor) is AttnProcessor2_0 for m in stock.modules() if hasattr(m, "processor"))
    assert all(type(m.processor) is LeanAttnProcessor for m in lean.modules() if hasattr(m, "processor"))
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([300, 700])
    cond = backbone.encode_prompts(PROMPTS[:2])
    assert not cond["encoder_attention_mask"].all()   # padding: the mask matters
    for autocast in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            want, got = (backbone.model_output(net, x, t, cond) for net in (stock, lean))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_joint_call_is_each_role_on_its_rows(backbone):
    """One forward of the teacher's CFG rows and the fake score's rows on the shared base
    (tdm.networks.joint_call) gives each role's own call, with a step condition on one block."""
    from tdm.networks import joint_call
    from tdm.step_condition import STEP_INDEX

    nets = lora_networks(backbone, torch.float64, "cpu", rank=4, alpha=8.0, gradient_checkpointing=False,
                         step_tables={"fake_score": {STEP_INDEX: 5}})
    nets.student_module.double()
    perturb(nets.student_params, 0)
    perturb(nets.fake_score_params, 1)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    t = torch.tensor([300, 700])
    cond = {k: v.double() if v.is_floating_point() else v for k, v in backbone.encode_prompts(PROMPTS[:2]).items()}
    uncond = {k: v.double() if v.is_floating_point() else v for k, v in backbone.encode_prompts(["", ""]).items()}
    fake_cond = {**cond, STEP_INDEX: torch.tensor([1, 3])}
    calls = [(nets.teacher, cond), (nets.teacher, uncond), (nets.fake_score, fake_cond)]
    with torch.no_grad():
        joint = joint_call(calls, x, t)
        separate = [denoiser(x, t, c) for denoiser, c in calls]
        other_k = nets.fake_score(x, t, {**cond, STEP_INDEX: torch.tensor([2, 2])})[0]
    assert (separate[2][0] - other_k).abs().max() > 1e-6   # the step condition matters
    for (x0, eps), (want_x0, want_eps) in zip(joint, separate):
        torch.testing.assert_close(x0, want_x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eps, want_eps, rtol=1e-12, atol=1e-12)
