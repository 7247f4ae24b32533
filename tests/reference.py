"""The TDM iteration transcribed from docs/method.md in plain torch, to prove the training code
against. Every formula is written here a second time, in float64, without importing tdm/: the
Gaussian path read from the teacher's scheduler (§1), the conversion of each family's raw output
to (x̂0, ε̂) (§1), the step grid and the rollout (§2), the ODE move, forward transition and mixed
noise (§3), the importance weight, min-SNR and the fake-score loss (§4), classifier-free guidance
in x0 or a guidance-embedded teacher, the normaliser and the student losses (§5, §5.1), the step
embedding (§6). A backbone adapter is used for three things only: loading the teacher network
(`load_denoiser`), its raw forward as the stock pipeline calls it (`network_output`: input
packing, time input, position ids), and, by the caller, encoding prompts (conditions are inputs).

The iteration's random values are inputs too: the initial noise z, K, both draws (k, t_g, t_e, t)
and both diffusion noises n, as the training code drew them (tests/harness.py records them);
the draws are checked against this file's own grid and ranges (§3), their distribution is
tests/test_draws.py's.

The structure is the plainest there is: one ordinary module per role (teacher φ, student θ,
fake score ψ), LoRA injected with peft directly, the step embedding added by its own hook, no
activation checkpointing, every sample rolled out through all K steps, the two CFG branches as
two teacher calls, no text-embedding cache, no shared base and no adapter switching.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

# -- §1 the Gaussian path, from the teacher's scheduler ----------------------------------------
TOY = "toy2d"   # a model folder without model_index.json: the toy's teacher (scheduler/, denoiser/)
# where each family's timestep embedding ([B, dim]) is computed: the step embedding is added there
TIME_EMBEDDING = {"PixArtAlphaPipeline": "adaln_single.emb", "PixArtSigmaPipeline": "adaln_single.emb",
                  "StableDiffusionPipeline": "time_embedding",
                  "StableDiffusionXLPipeline": "time_embedding", "CogVideoXPipeline": "time_embedding",
                  "StableDiffusion3Pipeline": "time_text_embed", "FluxPipeline": "time_text_embed",
                  "SanaPipeline": "time_embed.emb", "WanPipeline": "condition_embedder.time_embedder",
                  TOY: "time_embedding"}


def pipeline_class(folder: str) -> str:
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        return TOY
    with open(index) as f:
        return json.load(f)["_class_name"]


@dataclass
class Path:
    """α_t, σ_t (float64, one entry per integer time) and what the network predicts."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    prediction: str     # epsilon | v_prediction | flow

    def at(self, t: torch.Tensor, ndim: int):
        """(α_t, σ_t) per sample, shaped to broadcast against [B, ...] of `ndim` dimensions."""
        shape = (-1,) + (1,) * (ndim - 1)
        return self.alpha[t.long()].reshape(shape), self.sigma[t.long()].reshape(shape)


def read_path(folder: str, latent_shape) -> Path:
    """§1. DDPM family and CogVideoX: α = √ᾱ, σ = √(1 − ᾱ) with the scheduler's own ᾱ table.
    Rectified flow: σ_t = the scheduler's shifted sigma of timestep t + 1 (its float32 training
    sigmas, read backwards), α = 1 − σ; FLUX's shift depends on the image size (flux_sigmas)."""
    import diffusers

    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    flow = config["_class_name"] == "FlowMatchEulerDiscreteScheduler" or config.get("use_flow_sigmas")
    if not flow:
        scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(folder, subfolder="scheduler")
        alphas_cumprod = scheduler.alphas_cumprod.double()
        return Path(alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt(),
                    config.get("prediction_type", "epsilon"))
    if pipeline_class(folder) == "FluxPipeline":
        sigma = flux_sigmas(config, latent_shape)
    else:   # SD3: its own shift; SANA's DPM-Solver and Wan's UniPC on flow sigmas: flow_shift
        shift = config["flow_shift"] if config.get("use_flow_sigmas") else config.get("shift", 1.0)
        sigma = diffusers.FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config["num_train_timesteps"], shift=shift).sigmas.flip(0)
    sigma = sigma.double()
    return Path(1 - sigma, sigma, "flow")


def flux_sigmas(config: dict, latent_shape) -> torch.Tensor:
    """FluxPipeline's shift for the training size: μ linear in the packed image tokens
    (h/2 · w/2 of the latent), the scheduler given the unshifted u = (t + 1)/N and μ."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    total = config["num_train_timesteps"]
    tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"]
                                                           - config["base_image_seq_len"])
    mu = tokens * slope + (config["base_shift"] - slope * config["base_image_seq_len"])
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(sigmas=[(t + 1) / total for t in range(total)], mu=mu)
    return scheduler.sigmas[:total]


def x0_eps(path: Path, raw: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, learned_sigma: bool):
    """§1's table: a raw output → (x̂0, ε̂) in float64. With learned σ the network returns the
    variance channels after the prediction's: they are dropped."""
    if learned_sigma:
        raw = raw[:, : x_t.shape[1]]
    raw, x_t = raw.double(), x_t.double()
    a, s = path.at(t, x_t.ndim)
    if path.prediction == "epsilon":
        return (x_t - s * raw) / a, raw
    if path.prediction == "v_prediction":
        return a * x_t - s * raw, s * x_t + a * raw
    if path.prediction == "flow":   # v = ε − x0
        return x_t - s * raw, x_t + a * raw
    raise ValueError(f"no conversion for {path.prediction!r}")


# -- the three networks --------------------------------------------------------------------
STEP_TABLES = "tdm_step_embedding"   # where the training code keeps the step tables (state keys)
NUM_STEPS, STEP_INDEX = "num_steps", "step_index"   # the tables: of K, of k (§6)


class PlainDenoiser:
    """One network, one role: (x_t, t, c) → (x̂0, ε̂) in float64. Its step tables (§6) are added
    to the timestep embedding by a hook: emb(t) += Σ_name E_name[c_name]."""

    def __init__(self, module, backbone, path: Path, site: str):
        self.module, self.backbone, self.path = module, backbone, path
        config = getattr(module, "config", {})
        self.learned_sigma = (config.get("in_channels") is not None
                              and config.get("out_channels") == 2 * config["in_channels"])
        holder = module._modules.get(STEP_TABLES)
        self.tables = ({name: table.weight for role in holder.values()
                        for name, table in role.tables.items()} if holder is not None else {})
        self.steps = None
        if self.tables:
            module.get_submodule(site).register_forward_hook(self.add_step_embedding)

    def add_step_embedding(self, module, inputs, emb):
        return emb + sum(self.tables[name][self.steps[name]] for name in self.tables).to(emb.dtype)

    def __call__(self, x_t, t, cond: dict, steps: Optional[dict] = None, guidance=None):
        """`steps`: {num_steps: K, step_index: k} per sample, what the tables need; `guidance`:
        the value of a guidance input (FLUX.1-dev), per sample."""
        missing = set(self.tables) - set(steps or {})
        assert not missing, f"a step-conditioned network called without {missing}"
        if guidance is not None:
            cond = {**cond, "guidance": guidance}
        self.steps = steps
        try:
            raw = self.backbone.network_output(self.module, x_t, t, cond)
        finally:
            self.steps = None
        return x0_eps(self.path, raw, x_t, t, self.learned_sigma)


def attach_step_tables(net: torch.nn.Module, role: str, state: dict) -> None:
    """The role's step tables of the training code's state ({STEP_TABLES}.{role}.tables.{name}),
    as trainable parameters under the same names (zero here: the weights are loaded after)."""
    prefix = f"{STEP_TABLES}.{role}.tables."
    shapes = {k[len(prefix):-len(".weight")]: v.shape for k, v in state.items() if k.startswith(prefix)}
    if not shapes:
        return
    holder = torch.nn.Module()
    holder.tables = torch.nn.ModuleDict({name: torch.nn.Embedding(*shape) for name, shape in shapes.items()})
    net.add_module(STEP_TABLES, torch.nn.ModuleDict({role: holder.float()}))


def attach_lora(net: torch.nn.Module, role: str, state: dict, rank: int, alpha: float) -> None:
    """A peft LoRA adapter named `role` on exactly the layers the state has LoRA weights for."""
    from peft import LoraConfig, inject_adapter_in_model

    marker = f".lora_A.{role}.weight"
    targets = sorted(k[: -len(marker)] for k in state if k.endswith(marker))
    assert targets, f"the state holds no LoRA weights of {role}"
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), net,
                            adapter_name=role)
    for name, param in net.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:
            param.data = param.data.float()   # trainable weights in fp32, as trained


@dataclass
class PlainNetworks:
    teacher: PlainDenoiser
    student: PlainDenoiser
    fake_score: PlainDenoiser
    guidance_input: bool          # the network takes a guidance value (FLUX.1-dev, §5.1)
    student_params: Dict[str, torch.nn.Parameter] = field(default_factory=dict)
    fake_score_params: Dict[str, torch.nn.Parameter] = field(default_factory=dict)


def plain_networks(backbone, folder: str, latent_shape, train_mode: str, weight_dtype,
                   student_state: dict, fake_score_state: dict, lora_rank: int, lora_alpha: float,
                   float64: bool = False) -> PlainNetworks:
    """Three separate networks: the teacher frozen in `weight_dtype`; student and fake score
    as a LoRA on their own copy (lora) or fp32 copies (full), loaded with the given weights
    (step tables included); `float64`: every network wholly in float64."""
    path = read_path(folder, latent_shape)
    site = TIME_EMBEDDING[pipeline_class(folder)]
    cast = (lambda net: net.double()) if float64 else (lambda net: net)  # noqa: E731
    teacher = cast(backbone.load_denoiser(weight_dtype).requires_grad_(False))
    roles = {}
    for role, state in (("student", student_state), ("fake_score", fake_score_state)):
        if train_mode == "lora":
            net = backbone.load_denoiser(weight_dtype)
            attach_lora(net, role, state, lora_rank, lora_alpha)
        else:
            net = backbone.load_denoiser(torch.float32).requires_grad_(True)
        attach_step_tables(net, role, state)
        cast(net)
        missing = [k for k, p in net.named_parameters() if p.requires_grad and k not in state]
        assert not missing, f"no weights given for {missing[:3]}"
        net.load_state_dict({k: v for k, v in state.items() if k in net.state_dict()}, strict=False)
        net.train()
        roles[role] = net
    trainable = lambda net: {k: p for k, p in net.named_parameters() if p.requires_grad}  # noqa: E731
    guidance_input = bool(getattr(teacher, "config", {}).get("guidance_embeds", False))
    return PlainNetworks(PlainDenoiser(teacher, backbone, path, site),
                         PlainDenoiser(roles["student"], backbone, path, site),
                         PlainDenoiser(roles["fake_score"], backbone, path, site), guidance_input,
                         trainable(roles["student"]), trainable(roles["fake_score"]))


# -- settings, from the flags as given ------------------------------------------------------
@dataclass
class Settings:
    cfg: float = 4.5
    separate: bool = False
    randmid: bool = False
    loss: str = "mse"
    snr_gamma: float = 5.0
    importance_weight: bool = True
    share_step_draw: bool = False
    unify_steps: tuple = ()
    fake_step_condition: bool = False
    num_steps: int = 4
    total_steps: int = 900
    timesteps: Optional[tuple] = None       # an explicit grid, first step first
    guidance_embedding: Optional[bool] = None   # None: where the network has a guidance input
    student_guidance: float = 1.0


def settings_from_flags(flags: dict) -> Settings:
    """The reference's reading of train_tdm.py's flags as given (docs/method.md, docs/flags.md)."""
    loss = flags["loss"] or ("huber" if flags["use_huber"] else "mse")
    embedding = {"auto": None, "on": True, "off": False}[flags["guidance_embedding"]]
    timesteps = tuple(flags["timesteps"]) if flags["timesteps"] else None
    return Settings(cfg=flags["cfg"], separate=flags["use_separate"], randmid=flags["use_randmid"],
                    loss=loss, snr_gamma=flags["snr_gamma"],
                    importance_weight=flags["importance_weight"],
                    share_step_draw=flags["share_step_draw"],
                    unify_steps=tuple(sorted(flags["unify_steps"] or ())),
                    fake_step_condition=flags["fake_step_condition"], num_steps=flags["num_steps"],
                    total_steps=flags["total_steps"], timesteps=timesteps,
                    guidance_embedding=embedding,
                    student_guidance=1.0 if flags["student_guidance"] is None else flags["student_guidance"])


# -- §2 grid and rollout --------------------------------------------------------------------
def step_counts(settings: Settings) -> List[int]:
    """The K an iteration may draw (§6: the unify set; else the explicit grid's length or K)."""
    if settings.unify_steps:
        return list(settings.unify_steps)
    return [len(settings.timesteps)] if settings.timesteps else [settings.num_steps]


def step_grid(settings: Settings, K: int) -> List[int]:
    """[τ_0, τ_1, …, τ_K], τ_0 = −1 (indexed by k): τ_k = ⌊k·T/K⌋ − 1, or the explicit grid."""
    if settings.timesteps and not settings.unify_steps:
        return [-1] + list(reversed(settings.timesteps))
    return [-1] + [k * settings.total_steps // K - 1 for k in range(1, K + 1)]


def ddim_move(path: Path, x0, eps, t):
    """α_t·x̂0 + σ_t·ε̂ (§2, §3.4)."""
    a, s = path.at(t, x0.ndim)
    return a * x0 + s * eps


def full_rollout(student: PlainDenoiser, z, cond, steps, tau: List[int], path: Path, guidance):
    """§2: every sample through all K steps from z at τ_K; per step k (at k − 1) the input state
    x^{(k)} and the prediction (x̂0_k, ε̂_k)."""
    K, batch = len(tau) - 1, z.shape[0]
    states, x0s, epss = [None] * K, [None] * K, [None] * K
    x = z.double()
    with torch.no_grad():
        for k in range(K, 0, -1):
            states[k - 1] = x
            x0, eps = student(x, torch.full((batch,), tau[k]), cond, steps, guidance)
            x0s[k - 1], epss[k - 1] = x0, eps
            if k > 1:
                x = ddim_move(path, x0, eps, torch.full((batch,), tau[k - 1]))
    return torch.stack(states), torch.stack(x0s), torch.stack(epss)


def at_step(stack, k):
    """Row b of step k[b] for each sample b."""
    return stack[k - 1, torch.arange(k.shape[0])]


# -- §3 the draws (given) and the point of the trajectory distribution ----------------------
@dataclass
class Draw:
    k: torch.Tensor
    t_g: torch.Tensor
    t_e: torch.Tensor
    t: torch.Tensor


@dataclass
class Draws:
    """One iteration's random values, as the training code drew them."""

    num_steps: int
    noise: torch.Tensor                 # z, pure noise at τ_K
    fake_score_draw: Draw
    student_draw: Optional[Draw]        # None: a fake-score update only (--fake_score_updates)
    fake_score_noise: torch.Tensor      # n of §3.5 for each update
    student_noise: Optional[torch.Tensor]


def concat_draws(shards: List[Draws]) -> Draws:
    """Several processes' draws as one batch (data parallelism); they share K (§6)."""
    assert len({s.num_steps for s in shards}) == 1, "processes drew different K"
    def cat(name):
        parts = [getattr(s, name) for s in shards]
        return None if parts[0] is None else torch.cat(parts)

    def draw(name):   # None: fake-score-only draws have no student draw
        parts = [getattr(s, name) for s in shards]
        return None if parts[0] is None else Draw(*(torch.cat([getattr(d, f) for d in parts])
                                                    for f in ("k", "t_g", "t_e", "t")))

    return Draws(shards[0].num_steps, cat("noise"), draw("fake_score_draw"), draw("student_draw"),
                 cat("fake_score_noise"), cat("student_noise"))


def uniform_range(low, high):
    """[low, high) of a uniform integer draw; an empty range is its lower end (§3)."""
    return low, torch.maximum(high, low + 1)


def assert_within(x, low, high, what: str) -> None:
    assert ((x >= low) & (x < high)).all(), f"{what} {x.tolist()} outside [{low.tolist()}, {high.tolist()})"


def check_draw(settings: Settings, tau: List[int], draw: Draw) -> None:
    """§3.1–3.3 on this file's grid: k in 1..K, t_g = τ_k, t_e = τ_{k−1} + 1 (randmid: in
    [τ_{k−1} + 1, t_g − 20)), t in [max(20, t_e), t_g − 10) (separate) or [.., T − 10)."""
    K, taus = len(tau) - 1, torch.tensor(tau)
    k = draw.k.long()
    assert ((k >= 1) & (k <= K)).all(), f"k outside 1..{K}: {k.tolist()}"
    assert torch.equal(draw.t_g.long(), taus[k]), f"t_g {draw.t_g.tolist()} is not τ_k {taus[k].tolist()}"
    end = taus[k - 1] + 1
    if settings.randmid:
        low, high = uniform_range(end, taus[k] - 20)
        assert_within(draw.t_e, low, high, "t_e")
    else:
        assert torch.equal(draw.t_e.long(), end), f"t_e {draw.t_e.tolist()} is not τ_(k−1) + 1: {end.tolist()}"
    top = taus[k] - 10 if settings.separate else torch.full_like(k, tau[K] + 1 - 10)
    low, high = uniform_range(draw.t_e.long().clamp(min=20), top)
    assert_within(draw.t, low, high, "t")


def check_draws(settings: Settings, draws: Draws) -> List[int]:
    """Both draws of an iteration against this file's grid for its K; returns the grid."""
    assert draws.num_steps in step_counts(settings), f"K = {draws.num_steps} not in {step_counts(settings)}"
    tau = step_grid(settings, draws.num_steps)
    check_draw(settings, tau, draws.fake_score_draw)
    if draws.student_draw is None:   # a fake-score update only
        return tau
    check_draw(settings, tau, draws.student_draw)
    if settings.share_step_draw:
        assert torch.equal(draws.student_draw.k, draws.fake_score_draw.k), "k not shared"
    return tau


def point_of_trajectory(path: Path, x0, eps, t_e, t, n):
    """§3.4–3.6: the ODE move to t_e, the forward transition to t with fresh noise n, and the
    mixed noise m, so that x_t = α_t·x̂0 + σ_t·m. Returns (x_t, m)."""
    nd = x0.ndim
    a_e, s_e = path.at(t_e, nd)
    a_t, s_t = path.at(t, nd)
    n = n.double()
    x_e = a_e * x0 + s_e * eps
    beta = (s_t**2 - (a_t * s_e / a_e) ** 2).clamp(min=0).sqrt()
    x_t = (a_t / a_e) * x_e + beta * n
    m = ((a_t / a_e) * s_e * eps + beta * n) / s_t
    return x_t, m


# -- §4 and §5 the losses -------------------------------------------------------------------
def mean_pix(x):
    return x.flatten(1).mean(1)


def fake_score_loss(path: Path, settings: Settings, x0_fake, x0, t, m, n):
    """§4: mean_b[min(SNR_t, γ)·w_IS·mean_pix(x0_ψ − sg(x̂0))²], w_IS = N(m)/N(n) with
    per-element means, SNR_t = α_t²/σ_t²."""
    a, s = path.at(t, 1)
    weight = torch.minimum(a**2 / s**2, torch.tensor(settings.snr_gamma, dtype=torch.float64))
    if settings.importance_weight:
        weight = weight * torch.exp(-0.5 * mean_pix(m**2) + 0.5 * mean_pix(n.double() ** 2))
    return (weight * mean_pix((x0_fake - x0.detach()) ** 2)).mean()


HUBER_C = 1e-3             # the demo's element-wise pseudo-Huber constant
HUBER_NORM_C = 0.00054     # the paper's: c = 0.00054·√d


def student_loss(settings: Settings, x0, x0_real, x0_fake):
    """§5: target = sg(x̂0 + x0_real − x0_fake), w = sg(mean_pix|x̂0 − x0_real|) in float64."""
    target = (x0 + x0_real - x0_fake).detach()
    w = mean_pix((x0.detach() - x0_real).abs())
    diff = x0 - target
    if settings.loss == "huber_norm":
        c = HUBER_NORM_C * math.sqrt(diff[0].numel())
        return (((diff.flatten(1) ** 2).sum(1) + c**2).sqrt() - c).div(w).mean()
    w = w.reshape((-1,) + (1,) * (x0.ndim - 1))
    if settings.loss == "huber":
        return (((diff**2 + HUBER_C**2).sqrt() - HUBER_C) / w).mean()
    assert settings.loss == "mse", settings.loss
    return (diff**2 / w).mean()


def teacher_x0(nets: PlainNetworks, settings: Settings, x_t, t, cond, uncond):
    """§5 step 3: CFG in x0 of two teacher calls, x0_∅ + cfg·(x0_c − x0_∅) (one call at cfg 1);
    §5.1: a guidance-embedded teacher is called once with its guidance input at cfg."""
    batch = x_t.shape[0]
    embedded = nets.guidance_input if settings.guidance_embedding is None else settings.guidance_embedding
    if embedded:
        return nets.teacher(x_t, t, cond, guidance=torch.full((batch,), settings.cfg))[0]
    guidance = torch.full((batch,), settings.student_guidance) if nets.guidance_input else None
    x0_cond = nets.teacher(x_t, t, cond, guidance=guidance)[0]
    if settings.cfg == 1.0:
        return x0_cond
    x0_uncond = nets.teacher(x_t, t, uncond, guidance=guidance)[0]
    return x0_uncond + settings.cfg * (x0_cond - x0_uncond)


# -- one iteration ------------------------------------------------------------------------
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


def step_conditions(settings: Settings, K: int, k: Optional[torch.Tensor], batch: int) -> dict:
    """§6: K for both roles under TDM-unify; k for the fake score (`k` given) with
    fake_step_condition."""
    steps = {NUM_STEPS: torch.full((batch,), K, dtype=torch.long)} if settings.unify_steps else {}
    if k is not None and settings.fake_step_condition:
        steps[STEP_INDEX] = k.long()
    return steps


def reference_iteration(nets: PlainNetworks, settings: Settings, micro_batches: List[tuple],
                        lr: float, student_lr: float, max_grad_norm: float,
                        autocast_dtype=None) -> Record:
    """One optimiser step of the student over `micro_batches` [(cond, uncond, Draws, extra), ...]
    (`uncond`: the empty prompt's condition, one row): gradient accumulation is the plain mean
    of the micro-batch losses' gradients, the fake score stepping after the last micro-batch's
    fake backward (before its student loss). `extra`: the Draws of the fake score's earlier
    updates of the iteration (--fake_score_updates), each a step of its own on a fresh rollout."""
    path = nets.student.path
    fake_score_opt = adamw(list(nets.fake_score_params.values()), lr)
    student_opt = adamw(list(nets.student_params.values()), student_lr)
    snapshot = lambda ps: {k: p.detach().clone() for k, p in ps.items()}  # noqa: E731
    fake_score_before, student_before = snapshot(nets.fake_score_params), snapshot(nets.student_params)
    n = len(micro_batches)
    losses = []
    autocast = (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype
                else torch.autocast("cpu", enabled=False))
    def fake_score_part(d: Draws, cond: dict, guidance):
        """§2 the full rollout and §4 the fake score ψ's loss on the rollout's own prediction
        at the fake-score draw's k; returns the loss and the rollout."""
        tau = check_draws(settings, d)
        batch, K = d.noise.shape[0], d.num_steps
        student_steps = step_conditions(settings, K, None, batch)
        with autocast:
            states, x0s, epss = full_rollout(nets.student, d.noise, cond, student_steps, tau, path, guidance)
            draw = d.fake_score_draw
            x0, eps = at_step(x0s, draw.k), at_step(epss, draw.k)
            x_t, m = point_of_trajectory(path, x0, eps, draw.t_e, draw.t, d.fake_score_noise)
            fake_steps = step_conditions(settings, K, draw.k, batch)
            x0_fake, _ = nets.fake_score(x_t, draw.t, cond, fake_steps, guidance)
            return fake_score_loss(path, settings, x0_fake, x0, draw.t, m, d.fake_score_noise), states

    assert n == 1 or not any(extra for *_, extra in micro_batches), "extra fake-score updates accumulate"
    for i, (cond, uncond, d, extra) in enumerate(micro_batches):
        batch, K = d.noise.shape[0], d.num_steps
        uncond = {key: v.expand(batch, *v.shape[1:]) for key, v in uncond.items()}
        guidance = torch.full((batch,), settings.student_guidance) if nets.guidance_input else None
        student_steps = step_conditions(settings, K, None, batch)
        for e in extra:   # --fake_score_updates: ψ's earlier updates, each its own optimiser step
            assert e.student_draw is None, "an extra fake-score update with a student draw"
            fake_loss, _ = fake_score_part(e, cond, guidance)
            fake_loss.backward()
            fake_score_opt.step()
            fake_score_opt.zero_grad(set_to_none=True)
        fake_loss, states = fake_score_part(d, cond, guidance)
        (fake_loss / n).backward()
        if i == n - 1:
            fake_score_grads = {k: p.grad.clone() for k, p in nets.fake_score_params.items()
                                if p.grad is not None}
            fake_score_opt.step()
            fake_score_opt.zero_grad(set_to_none=True)
        with autocast:
            # §5 the student θ: its step at the student draw's k, with gradient; the teacher; ψ updated
            draw = d.student_draw
            x0, eps = nets.student(at_step(states, draw.k), draw.t_g, cond, student_steps, guidance)
            with torch.no_grad():
                x_t, _ = point_of_trajectory(path, x0.detach(), eps.detach(), draw.t_e, draw.t,
                                             d.student_noise)
                x0_real = teacher_x0(nets, settings, x_t, draw.t, cond, uncond)
                x0_fake, _ = nets.fake_score(x_t, draw.t, cond, step_conditions(settings, K, draw.k, batch),
                                             guidance)
            loss = student_loss(settings, x0, x0_real, x0_fake)
        (loss / n).backward()
        losses.append((fake_loss.item(), loss.item()))
    params = list(nets.student_params.values())
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    student_grads = {k: p.grad.clone() for k, p in nets.student_params.items() if p.grad is not None}
    student_opt.step()
    change = lambda ps, before: {k: p.detach() - before[k] for k, p in ps.items()}  # noqa: E731
    return Record(losses[-1][0], losses[-1][1], fake_score_grads, student_grads,
                  change(nets.fake_score_params, fake_score_before),
                  change(nets.student_params, student_before))
