"""The draws of docs/method.md §3 follow the distribution it states, and the importance weight of
§4 has the mean its closed form gives.

Each case makes 10⁵ draws (tdm.trajectory.sample_draw, TDM.draw) with a fixed seed and tests
them against the exact law, written here from §3 on this file's own grid (τ_k = ⌊kT/K⌋ − 1, or an
explicit list; τ_0 = −1):

    k ~ U{1..K};  t_g = τ_k;  t_e = τ_{k−1} + 1, or with randmid t_e ~ U[τ_{k−1} + 1, t_g − 20);
    t ~ U[max(20, t_e), t_g − 10) (separate) or U[max(20, t_e), T − 10) (mode 2);

a uniform draw on an empty range returns its lower end. Deterministic parts are checked exactly;
k by Pearson's χ²; t_e given k and t given (k, t_e) by Kolmogorov–Smirnov on the randomised
probability integral transform u = (x − low + V)/(high − low), V ~ U[0, 1), which is exactly
U(0, 1) when x is uniform on the integers of [low, high). A case passes when every p-value of it
exceeds 1e-3 divided by their number (Bonferroni: significance 1e-3 per case); the seed is fixed,
so the verdict is deterministic. 10⁵ draws take milliseconds.
"""
import math

import numpy as np
import pytest
import torch

from tdm.losses import importance_weight
from tdm.method import TDM, TDMConfig, TrainingRNG
from tdm.path import GaussianPath
from tdm.trajectory import StepGrid, diffuse, sample_draw

DRAWS = 100_000
SIGNIFICANCE = 1e-3
# name: (K, T, explicit grid or None); K = 50 on T = 900 makes the randmid and separate ranges empty
GRIDS = {"K4_T900": (4, 900, None), "K1_T900": (1, 900, None), "K2_T1000": (2, 1000, None),
         "explicit_999_856_665_399": (4, 1000, [999, 856, 665, 399]), "K50_T900": (50, 900, None)}
MODES = {"mode2": (False, False), "separate": (True, False), "mode2_randmid": (False, True),
         "separate_randmid": (True, True)}


# -- the exact law, from docs/method.md §3 --------------------------------------------------
def own_grid(K: int, T: int, explicit=None) -> list:
    """[τ_0 = −1, τ_1, …, τ_K]."""
    return [-1] + (list(reversed(explicit)) if explicit else [k * T // K - 1 for k in range(1, K + 1)])


def nonempty(low, high):
    """[low, high) of a uniform integer draw; an empty range keeps only its lower end."""
    return low, torch.maximum(high, low + 1)


def end_range(tau, k):
    """t_e's range under randmid: [τ_{k−1} + 1, τ_k − 20)."""
    return nonempty(tau[k - 1] + 1, tau[k] - 20)


def time_range(tau, T, k, t_e, separate):
    """t's range: [max(20, t_e), τ_k − 10) in mode 1, [max(20, t_e), T − 10) in mode 2."""
    high = tau[k] - 10 if separate else torch.full_like(k, T - 10)
    return nonempty(t_e.clamp(min=20), high)


# -- statistics -----------------------------------------------------------------------------
def chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's χ² goodness of fit, df = cells − 1 (every expected count here is ≥ 100)."""
    observed, expected = observed.double().flatten(), expected.double().flatten()
    assert expected.min() >= 5, "too few expected counts for χ²"
    stat = ((observed - expected) ** 2 / expected).sum()
    df = torch.tensor(observed.numel() - 1.0, dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


def kolmogorov_q(lam: float) -> float:
    """P(K > λ) of the Kolmogorov distribution: 2 Σ_j (−1)^{j−1} e^{−2j²λ²}."""
    if lam < 0.2:
        return 1.0
    return min(1.0, 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101)))


def ks_pvalue(u: torch.Tensor) -> float:
    """Kolmogorov–Smirnov of u against U(0, 1), at Stephens' λ = (√n + 0.12 + 0.11/√n)·D."""
    u, n = u.double().sort().values, u.numel()
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(ranks / n - u, u - (ranks - 1) / n).max().item()
    return kolmogorov_q((math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d)


def pit(x, low, high, rng):
    """Randomised probability integral transform of x ~ U{low, …, high − 1}: exactly U(0, 1)."""
    assert ((x >= low) & (x < high)).all(), "a value outside its range"
    return (x - low + torch.rand(x.shape, generator=rng, dtype=torch.float64)) / (high - low)


def assert_all_pass(pvalues: dict) -> None:
    """Every p-value above SIGNIFICANCE / (number of them)."""
    bound = SIGNIFICANCE / len(pvalues)
    failed = {name: p for name, p in pvalues.items() if not p > bound}
    assert not failed, f"p ≤ {bound:.2g}: {failed}"


def check_law(draw, tau, T, separate, randmid, prefix="", rng=None) -> tuple:
    """The deterministic parts of §3 exactly; the p-values of the random ones, per k. Returns
    ({name: p}, the per-sample PIT of t, for tests of independence)."""
    K = len(tau) - 1
    taus = torch.tensor(tau)
    rng = rng or torch.Generator().manual_seed(1)
    k, t_e, t = draw.k.long(), draw.t_e.long(), draw.t.long()
    assert torch.equal(draw.t_g.long(), taus[k]), "t_g is not τ_k"
    pvalues = {}
    if randmid:
        u_e = pit(t_e, *end_range(taus, k), rng)
    else:
        assert torch.equal(t_e, taus[k - 1] + 1), "t_e is not τ_(k−1) + 1"
    u_t = pit(t, *time_range(taus, T, k, t_e, separate), rng)
    for step in range(1, K + 1):
        rows = k == step
        if randmid and (taus[step] - 20 > taus[step - 1] + 1):   # a range of more than one value
            pvalues[f"{prefix}t_e|k={step}"] = ks_pvalue(u_e[rows])
        pvalues[f"{prefix}t|k={step},t_e"] = ks_pvalue(u_t[rows])
    return pvalues, u_t


def step_pvalue(k, K) -> float:
    """χ² of k against U{1..K} (K = 1: k is 1, p = 1)."""
    if K == 1:
        assert (k == 1).all()
        return 1.0
    counts = torch.bincount(k.long() - 1, minlength=K)
    return chi2_pvalue(counts, torch.full((K,), k.numel() / K))


# -- sample_draw ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_sample_draw_follows_the_law_of_section_3(grid_name, mode):
    K, T, explicit = GRIDS[grid_name]
    separate, randmid = MODES[mode]
    tau = own_grid(K, T, explicit)
    grid = StepGrid(explicit) if explicit else StepGrid.uniform(K, T)
    draw = sample_draw(grid, DRAWS, "cpu", separate, randmid, torch.Generator().manual_seed(0))
    pvalues, _ = check_law(draw, tau, T, separate, randmid)
    pvalues["k"] = step_pvalue(draw.k, K)
    assert_all_pass(pvalues)


def test_the_statistics_have_their_textbook_values_and_power():
    """χ² with 2 degrees of freedom has survival e^{−x/2}; the Kolmogorov distribution's 5 % and
    0.1 % points are λ = 1.3581 and 1.9495. A wrong law fails: t drawn from a range 5 short at
    the top (of ~200), k with P(k = 1) = 0.27 instead of 0.25."""
    # counts 100 ± √(50x), 100: Pearson's statistic is x = 2 ln 1000, so p = e^{−x/2} = 1e-3
    x = 2 * math.log(1000.0)
    observed = torch.tensor([100.0 + math.sqrt(50 * x), 100.0 - math.sqrt(50 * x), 100.0], dtype=torch.float64)
    assert chi2_pvalue(observed, torch.full((3,), 100.0)) == pytest.approx(1e-3, rel=1e-9)
    assert kolmogorov_q(1.3581) == pytest.approx(0.05, rel=1e-3)
    assert kolmogorov_q(1.9495) == pytest.approx(0.001, rel=1e-2)
    g = torch.Generator().manual_seed(3)
    tau = torch.tensor(own_grid(4, 900))
    k = torch.randint(1, 5, (DRAWS,), generator=g)
    low, high = time_range(tau, 900, k, tau[k - 1] + 1, True)
    short = low + (torch.rand(DRAWS, generator=g, dtype=torch.float64) * (high - low - 5)).long()
    assert ks_pvalue(pit(short, low, high, g)) < SIGNIFICANCE
    biased = torch.multinomial(torch.tensor([0.27, 0.73 / 3, 0.73 / 3, 0.73 / 3]), DRAWS, True, generator=g) + 1
    assert step_pvalue(biased, 4) < SIGNIFICANCE


# -- TDM.draw: both updates' draws -----------------------------------------------------------
def tdm(K=4, T=900, separate=False, randmid=False, share=False, unify=(), seed=0) -> TDM:
    path = GaussianPath.from_alphas_cumprod(torch.linspace(0.999, 0.001, 1000, dtype=torch.float64))
    config = TDMConfig(use_separate=separate, use_randmid=randmid, share_step_draw=share, unify_steps=unify)
    return TDM(path, StepGrid.uniform(K, T), config, TrainingRNG("cpu", seed))


def independence_pvalue(u, v, bins=10) -> float:
    """χ² of the joint histogram of two U(0, 1) samples against the product of uniforms."""
    cells = (u * bins).long().clamp(max=bins - 1) * bins + (v * bins).long().clamp(max=bins - 1)
    counts = torch.bincount(cells, minlength=bins * bins)
    return chi2_pvalue(counts, torch.full((bins * bins,), u.numel() / bins**2))


@pytest.mark.parametrize("share", [False, True], ids=["independent", "share_step_draw"])
@pytest.mark.parametrize("mode", ["mode2", "separate_randmid"])
def test_tdm_draws_two_updates_with_the_stated_dependence(mode, share):
    """§5: the two draws are independent; with share_step_draw the student's k is the fake
    score's and its t_e, t are fresh (independent given k)."""
    separate, randmid = MODES[mode]
    tau = own_grid(4, 900)
    fake, student = tdm(separate=separate, randmid=randmid, share=share).draw(4, DRAWS, "cpu")
    pvalues, u_fake = check_law(fake, tau, 900, separate, randmid, "fake ")
    student_p, u_student = check_law(student, tau, 900, separate, randmid, "student ")
    pvalues.update(student_p)
    pvalues["k"] = step_pvalue(fake.k, 4)
    if share:
        assert torch.equal(student.k, fake.k)
    else:   # (k_fake, k_student) uniform on {1..4}²: uniform marginals and independent
        pairs = torch.bincount((fake.k - 1) * 4 + student.k - 1, minlength=16)
        pvalues["k pairs"] = chi2_pvalue(pairs, torch.full((16,), DRAWS / 16))
    pvalues["t_fake ⟂ t_student"] = independence_pvalue(u_fake, u_student)
    assert_all_pass(pvalues)


def test_unify_draws_k_on_the_grid_of_each_K_and_K_uniformly():
    """§6: each K of the unify set has its own grid ⌊kT/K⌋ − 1, and the iteration's K is uniform
    on the set (the shared rng: 3·10⁴ iterations)."""
    method = tdm(K=4, T=1000, unify=(1, 2, 4))
    pvalues = {}
    for K in (1, 2, 4):
        fake, student = method.draw(K, DRAWS, "cpu")
        for name, draw in (("fake", fake), ("student", student)):
            p, _ = check_law(draw, own_grid(K, 1000), 1000, False, False, f"K={K} {name} ")
            pvalues.update(p)
            pvalues[f"K={K} {name} k"] = step_pvalue(draw.k, K)
    counts = torch.bincount(torch.tensor([method.draw_num_steps() for _ in range(30_000)]), minlength=5)
    assert counts[[0, 3]].sum() == 0
    pvalues["K"] = chi2_pvalue(counts[[1, 2, 4]], torch.full((3,), 10_000.0))
    assert_all_pass(pvalues)


# -- §4 the importance weight ----------------------------------------------------------------
# PixArt's DDPM table, computed independently with numpy: linear betas 1e-4 → 0.02, 1000 steps.
ALPHAS_CUMPROD = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


def mean_weight(rho: float, s: float, q: float, d: int) -> float:
    """E[w_IS] over the proposal n ~ N(0, I_d) for a fixed ε̂ of mean square q, derived from
    §3.6 and §4: m = ρ·ε̂ + s·n with ρ = α_t σ_{t_e}/(α_{t_e} σ_t), s = β/σ_t, ρ² + s² = 1, so

      ‖m‖² − ‖n‖² = Σ_i ρ² ε̂_i² + 2ρs ε̂_i n_i − ρ² n_i²,   and with E e^{bn + cn²} =
      (1 − 2c)^{−½} e^{b²/(2(1 − 2c))} per element (c = ρ²/2d, b = −ρs ε̂_i/d):

      E[w_IS] = (1 − ρ²/d)^{−d/2} · exp(−ρ² q/2 + ρ² s² q / (2(d − ρ²))),

    which tends to exp(ρ²(1 − q)/2) for large d: 1 when ε̂ has unit mean square."""
    return (1 - rho**2 / d) ** (-d / 2) * math.exp(-rho**2 * q / 2 + rho**2 * s**2 * q / (2 * (d - rho**2)))


def weights(path, eps, t_e, t, rng):
    """w_IS of the training code (tdm.trajectory.diffuse, tdm.losses.importance_weight) for
    DRAWS fresh n at one (t_e, t) and one ε̂."""
    eps = eps.expand(DRAWS, -1)
    n = torch.randn(eps.shape, generator=rng, dtype=torch.float64)
    full = lambda v: torch.full((DRAWS,), v)  # noqa: E731
    _, m = diffuse(path, torch.zeros_like(eps), eps, full(t_e), full(t), n)
    return importance_weight(m, n)


def test_importance_weight_is_one_where_the_mixed_noise_is_the_drawn_noise():
    """β = σ_t (σ_{t_e} = 0: the move lands on a clean sample) makes m = n, so w_IS = 1 (to
    rounding: β = √(σ_t²))."""
    alpha = torch.tensor([1.0, 0.9, 0.6], dtype=torch.float64)
    path = GaussianPath(alpha, (1 - alpha**2).sqrt())
    w = weights(path, torch.randn(1, 8, dtype=torch.float64), 0, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, torch.ones_like(w), rtol=0, atol=1e-15)


@pytest.mark.parametrize("d,t_e,t,scale", [(4, 449, 470, 1.0), (16, 449, 460, 0.8), (64, 450, 700, 1.3),
                                           (64, 0, 30, 0.7)])
def test_importance_weight_mean_matches_its_closed_form(d, t_e, t, scale):
    """Monte Carlo mean of w_IS over 10⁵ fresh n against mean_weight, by a z-test at 1e-3
    (|z| < 3.29; w_IS has finite variance for ρ² < d/2), for ε̂ of mean square q = scale²·(its
    sample's). The cases span ρ = 0.09 … 0.94: the closed form lies 57 to 290 standard errors
    from 1, and at d = 4 about 50 from its large-d limit."""
    path = GaussianPath.from_alphas_cumprod(torch.from_numpy(ALPHAS_CUMPROD))
    g = torch.Generator().manual_seed(0)
    eps = scale * torch.randn(1, d, generator=g, dtype=torch.float64)
    w = weights(path, eps, t_e, t, g)
    (a_e, a_t), (s_e, s_t) = np.sqrt(ALPHAS_CUMPROD[[t_e, t]]), np.sqrt(1 - ALPHAS_CUMPROD[[t_e, t]])
    rho = a_t * s_e / (a_e * s_t)
    expected = mean_weight(rho, math.sqrt(1 - rho**2), eps.pow(2).mean().item(), d)
    z = (w.mean().item() - expected) / (w.std().item() / math.sqrt(DRAWS))
    assert abs(z) < 3.29, f"mean {w.mean().item():.6f}, closed form {expected:.6f}, z = {z:.2f}"


def test_a_fake_score_only_start_rolls_out_as_deep_as_its_draw_and_has_no_student_loss():
    """--fake_score_updates (§4): an extra fake-score update's rollout stops after step k of its
    own draw (K − k + 1 forwards per sample, counted here), draws from the same stream as a full
    start, and its iteration refuses a student loss (its states past that depth were not computed)."""
    calls = []

    def student(x, t, cond):   # counts the rows each forward computes
        calls.append(x.shape[0])
        return 0.5 * x, 0.1 * x

    cond, uncond = {"c": torch.zeros(64, 1)}, {"c": torch.zeros(1, 1)}
    full, extra = tdm(seed=3), tdm(seed=3)
    full.start(student, cond, uncond, (2,), "cpu")
    rows_full, calls[:] = sum(calls), []
    iteration = extra.start(student, cond, uncond, (2,), "cpu", student_update=False)
    k = iteration.fake_score_draw.k
    assert sum(calls) == int((4 - k + 1).sum()) < rows_full
    assert iteration.student_draw is None
    assert torch.equal(extra.rng.rng.get_state(), full.rng.rng.get_state())   # the same draws made
    with pytest.raises(ValueError, match="fake-score update only"):
        extra.student_loss(iteration, student, student, student)
