"""A plain TDM iteration, written straight from docs of the method, to prove the training code
against: separate ordinary modules per role (teacher φ, student θ, fake score ψ), no activation
checkpointing, the full rollout of every sample, the two CFG branches as two teacher calls, no
text-embedding cache, no shared base and no adapter switching. Only the formulas (path, interval
draw, diffusion, the two losses) are the library's own, each unit-tested against hand values.

The random stream is replayed exactly as the training code consumes it, per process ("shard"):
initial noise, K (shared), the fake-score draw, the student draw, then the diffusion noise of
each loss; several shards are concatenated into one batch (data parallelism).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from tdm.losses import FakeScoreLoss, StudentLoss, classifier_free_guidance
from tdm.lora import attach_lora
from tdm.step_condition import ATTRIBUTE, NUM_STEPS, STEP_INDEX, StepEmbedding
from tdm.trajectory import StepGrid, diffuse, sample_draw


class PlainDenoiser:
    """One network, one role: (x_t, t, c) -> (x̂0, ε̂); the step embedding, if any, is added by
    a hook registered for the duration of the call."""

    def __init__(self, module, backbone, role: Optional[str] = None):
        self.module, self.backbone, self.role = module, backbone, role
        tables = getattr(module, ATTRIBUTE, None)
        self.steps = tables[role] if tables is not None and role in tables else None

    def __call__(self, x_t, t, cond):
        handle = None
        if self.steps is not None:
            site = self.module.get_submodule(self.backbone.step_embedding_site)
            handle = site.register_forward_hook(
                lambda m, i, out: out + self.steps(cond).to(out.dtype))
        try:
            out = self.backbone.model_output(self.module, x_t, t, cond)
        finally:
            if handle is not None:
                handle.remove()
        return self.backbone.path.x0_eps(out, x_t, t, self.backbone.prediction_type)


def attach_plain_step_embedding(module, backbone, role: str, sizes: Dict[str, int]) -> None:
    if not sizes:
        return
    site = module.get_submodule(backbone.step_embedding_site)
    dim = [m for m in site.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
    module.add_module(ATTRIBUTE, torch.nn.ModuleDict({role: StepEmbedding(dim, sizes)}))


@dataclass
class PlainNetworks:
    teacher: PlainDenoiser
    student: PlainDenoiser
    fake_score: PlainDenoiser
    student_params: Dict[str, torch.nn.Parameter] = field(default_factory=dict)
    fake_score_params: Dict[str, torch.nn.Parameter] = field(default_factory=dict)


def plain_networks(backbone, train_mode: str, weight_dtype, student_state: dict, fake_score_state: dict,
                   step_tables: dict, lora_rank: int = 4, lora_alpha: float = 4.0,
                   float64: bool = False) -> PlainNetworks:
    """Three separate networks: the teacher frozen in `weight_dtype`; student and fake score as
    LoRA-on-their-own-copy (lora) or fp32 copies (full), loaded with the given weights; `float64`:
    every network wholly in float64."""
    from tdm.step_condition import FAKE_SCORE, STUDENT

    cast = (lambda net: net.double()) if float64 else (lambda net: net)  # noqa: E731
    teacher = cast(backbone.load_denoiser(weight_dtype).requires_grad_(False))
    roles = {}
    for role, state in ((STUDENT, student_state), (FAKE_SCORE, fake_score_state)):
        if train_mode == "lora":
            net = backbone.load_denoiser(weight_dtype)
            attach_lora(net, lora_rank, lora_alpha, backbone.lora_target_modules, adapter_name=role)
        else:
            net = backbone.load_denoiser(torch.float32).requires_grad_(True)
        attach_plain_step_embedding(net, backbone, role, step_tables.get(role, {}))
        cast(net)
        missing = [k for k, p in net.named_parameters() if p.requires_grad and k not in state]
        assert not missing, f"no weights given for {missing[:3]}"
        net.load_state_dict({k: v for k, v in state.items() if k in net.state_dict()}, strict=False)
        net.train()
        roles[role] = net
    trainable = lambda net: {k: p for k, p in net.named_parameters() if p.requires_grad}  # noqa: E731
    return PlainNetworks(PlainDenoiser(teacher, backbone), PlainDenoiser(roles[STUDENT], backbone, STUDENT),
                         PlainDenoiser(roles[FAKE_SCORE], backbone, FAKE_SCORE),
                         trainable(roles[STUDENT]), trainable(roles[FAKE_SCORE]))


@dataclass
class Settings:
    cfg: float = 4.5
    separate: bool = True
    randmid: bool = False
    loss: str = "mse"
    snr_gamma: float = 5.0
    importance_weight: bool = True
    share_step_draw: bool = False
    unify_steps: tuple = ()
    fake_step_condition: bool = False
    num_steps: int = 4
    total_steps: int = 900
    guidance_embedding: bool = False   # the teacher is guided through its guidance input (§5.1)


@dataclass
class ShardDraws:
    noise: torch.Tensor
    num_steps: int
    fake_score_draw: object
    student_draw: object
    fake_score_noise: torch.Tensor
    student_noise: torch.Tensor


def draw_shard(settings: Settings, batch: int, latent_shape, seed: int, shared: torch.Generator,
               rng: Optional[torch.Generator] = None) -> ShardDraws:
    """One process's random values of one iteration, in the order training consumes them."""
    g = rng if rng is not None else torch.Generator().manual_seed(seed)
    noise = torch.randn((batch, *latent_shape), generator=g)
    counts = sorted(settings.unify_steps) if settings.unify_steps else [settings.num_steps]
    K = counts[int(torch.randint(len(counts), (1,), generator=shared))] if len(counts) > 1 else counts[0]
    grid = StepGrid.uniform(K, settings.total_steps)
    fake_score_draw = sample_draw(grid, batch, "cpu", settings.separate, settings.randmid, g)
    student_draw = sample_draw(grid, batch, "cpu", settings.separate, settings.randmid, g,
                               k=fake_score_draw.k if settings.share_step_draw else None)
    fake_score_noise = torch.randn(noise.shape, generator=g)
    student_noise = torch.randn(noise.shape, generator=g)
    return ShardDraws(noise, K, fake_score_draw, student_draw, fake_score_noise, student_noise)


def concat_draws(shards: List[ShardDraws]) -> ShardDraws:
    assert len({s.num_steps for s in shards}) == 1
    cat = lambda name: torch.cat([getattr(s, name) for s in shards])  # noqa: E731
    draw = lambda attr: type(shards[0].fake_score_draw)(  # noqa: E731
        *(torch.cat([getattr(getattr(s, attr), f) for s in shards]) for f in ("k", "t_g", "t_e", "t")),
        num_steps=shards[0].num_steps)
    return ShardDraws(cat("noise"), shards[0].num_steps, draw("fake_score_draw"),
                      draw("student_draw"), cat("fake_score_noise"), cat("student_noise"))


def student_condition(settings, cond, K):
    if not settings.unify_steps:
        return cond
    batch = next(iter(cond.values())).shape[0]
    return {**cond, NUM_STEPS: torch.full((batch,), K, dtype=torch.long)}


def fake_score_condition(settings, cond, K, k):
    cond = student_condition(settings, cond, K)
    return {**cond, STEP_INDEX: k} if settings.fake_step_condition else cond


def full_rollout(student, noise, cond, grid: StepGrid, path):
    """Every sample through all K steps; returns per-step (state, x̂0, ε̂) lists, step k at k-1."""
    states, x0s, epss = [None] * grid.num_steps, [None] * grid.num_steps, [None] * grid.num_steps
    x = noise if noise.dtype == torch.float64 else noise.float()
    with torch.no_grad():
        for k in range(grid.num_steps, 0, -1):
            t = torch.full((x.shape[0],), grid.timesteps[grid.num_steps - k], dtype=torch.long)
            states[k - 1] = x
            x0, eps = student(x, t, cond)
            x0s[k - 1], epss[k - 1] = x0, eps
            if k > 1:
                t_next = torch.full_like(t, grid.timesteps[grid.num_steps - k + 1])
                x = path.ddim_move(x0, eps, t_next)
    return torch.stack(states), torch.stack(x0s), torch.stack(epss)


def pick(stack, k):
    return stack[k - 1, torch.arange(k.shape[0])]


@dataclass
class Record:
    fake_score_loss: float
    student_loss: float
    fake_score_grads: Dict[str, torch.Tensor]
    student_grads: Dict[str, torch.Tensor]
    fake_score_step: Dict[str, torch.Tensor]      # weight change made by the optimiser step
    student_step: Dict[str, torch.Tensor]


def adamw(params, lr):
    """train_tdm.py's defaults: β = (0, 0.95), weight decay 1e-2, ε = 1e-8."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.0, 0.95), weight_decay=1e-2, eps=1e-8)


def reference_iteration(nets: PlainNetworks, backbone, settings: Settings,
                        micro_batches: List[tuple], lr: float, student_lr: float,
                        max_grad_norm: float, autocast_dtype=None) -> Record:
    """One optimiser step of each network over `micro_batches` [(cond, uncond, draws), ...]:
    gradient accumulation is the plain mean of the micro-batch losses' gradients, the fake
    score stepping after the last micro-batch's fake backward (before its student loss)."""
    path = backbone.path
    fake_score_objective = FakeScoreLoss(path, settings.snr_gamma, settings.importance_weight)
    student_objective = StudentLoss(settings.loss)
    fake_score_opt = adamw(list(nets.fake_score_params.values()), lr)
    student_opt = adamw(list(nets.student_params.values()), student_lr)
    snapshot = lambda ps: {k: p.detach().clone() for k, p in ps.items()}  # noqa: E731
    fake_score_before, student_before = snapshot(nets.fake_score_params), snapshot(nets.student_params)
    n = len(micro_batches)
    fake_score_losses, student_losses, fake_score_grads, student_grads = [], [], None, None
    autocast = (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype
                else torch.autocast("cpu", enabled=False))
    for i, (cond, uncond, d) in enumerate(micro_batches):
        last = i == n - 1
        grid = StepGrid.uniform(d.num_steps, settings.total_steps)
        with autocast:
            states, x0s, epss = full_rollout(nets.student, d.noise, student_condition(settings, cond, d.num_steps),
                                             grid, path)
            # fake score ψ (§ fake-score loss)
            x0, eps = pick(x0s, d.fake_score_draw.k), pick(epss, d.fake_score_draw.k)
            x_t, m = diffuse(path, x0, eps, d.fake_score_draw.t_e, d.fake_score_draw.t, d.fake_score_noise)
            x0_fake, _ = nets.fake_score(x_t, d.fake_score_draw.t, fake_score_condition(settings, cond, d.num_steps, d.fake_score_draw.k))
            fake_score_loss = fake_score_objective(x0_fake, x0, d.fake_score_draw.t, m, d.fake_score_noise)
        (fake_score_loss / n).backward()
        fake_score_losses.append(fake_score_loss.item())
        if last:
            fake_score_grads = {k: p.grad.clone() for k, p in nets.fake_score_params.items() if p.grad is not None}
            fake_score_opt.step()
            fake_score_opt.zero_grad(set_to_none=True)
        with autocast:
            # student θ (§ generator loss): one student step, teacher with CFG, the updated ψ
            state = pick(states, d.student_draw.k)
            x0, eps = nets.student(state, d.student_draw.t_g, student_condition(settings, cond, d.num_steps))
            with torch.no_grad():
                x_t, _ = diffuse(path, x0.detach(), eps.detach(), d.student_draw.t_e, d.student_draw.t, d.student_noise)
                if settings.guidance_embedding:   # one call, cfg as the guidance input
                    guidance = torch.full((x_t.shape[0],), settings.cfg)
                    x0_real = nets.teacher(x_t, d.student_draw.t, {**cond, "guidance": guidance})[0]
                else:
                    x0_cond = nets.teacher(x_t, d.student_draw.t, cond)[0]
                    x0_real = (x0_cond if settings.cfg == 1.0 else
                               classifier_free_guidance(x0_cond, nets.teacher(x_t, d.student_draw.t, uncond)[0],
                                                        settings.cfg))
                x0_fake, _ = nets.fake_score(x_t, d.student_draw.t, fake_score_condition(settings, cond, d.num_steps, d.student_draw.k))
            student_loss = student_objective(x0, x0_real, x0_fake)
        (student_loss / n).backward()
        student_losses.append(student_loss.item())
    params = list(nets.student_params.values())
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    student_grads = {k: p.grad.clone() for k, p in nets.student_params.items() if p.grad is not None}
    student_opt.step()
    change = lambda ps, before: {k: p.detach() - before[k] for k, p in ps.items()}  # noqa: E731
    return Record(fake_score_losses[-1], student_losses[-1], fake_score_grads, student_grads,
                  change(nets.fake_score_params, fake_score_before), change(nets.student_params, student_before))

