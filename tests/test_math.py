"""Each formula of tdm/ against values computed by hand (docs/method.md §1–5)."""
import math

import numpy as np
import pytest
import torch

from tdm.losses import (FakeScoreLoss, StudentLoss, classifier_free_guidance, dmd_normalizer,
                        importance_weight, min_snr_weight)
from tdm.path import GaussianPath
from tdm.trajectory import StepGrid, diffuse, rollout, sample_draw, transition_std

# PixArt's DDPM table, computed independently with numpy: linear betas 1e-4 → 0.02, 1000 steps.
ALPHAS_CUMPROD = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


@pytest.fixture(scope="module")
def path():
    return GaussianPath.from_alphas_cumprod(torch.from_numpy(ALPHAS_CUMPROD))


def test_path_values_and_snr(path):
    t = torch.tensor([0, 500, 999])
    alpha, sigma = path.alpha_sigma(t)
    assert alpha[0].item() == pytest.approx(math.sqrt(1 - 1e-4), rel=1e-6)
    assert sigma[0].item() == pytest.approx(0.01, rel=1e-4)
    assert sigma[2].item() == pytest.approx(math.sqrt(1 - ALPHAS_CUMPROD[999]), rel=1e-6)
    snr = path.snr(t)
    assert snr[1].item() == pytest.approx(ALPHAS_CUMPROD[500] / (1 - ALPHAS_CUMPROD[500]), rel=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_x0_eps_conversions_recover_the_truth(path, prediction_type):
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([10, 400, 990])
    a, s = path.alpha_sigma(t, 4)
    x_t = a * x0 + s * eps
    output = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction_type]
    x0_hat, eps_hat = path.x0_eps(output, x_t, t, prediction_type)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)


def test_flow_conversion_recovers_the_truth():
    """Rectified flow: α = 1 − σ, the network predicts v = ε − x0 (docs/method.md §1, SD3)."""
    sigma = torch.linspace(0.001, 0.999, 1000, dtype=torch.float64)
    flow = GaussianPath(1 - sigma, sigma)
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    t = torch.tensor([10, 900])
    a, s = flow.alpha_sigma(t, 2)
    x0_hat, eps_hat = flow.x0_eps(eps - x0, a * x0 + s * eps, t, "flow")
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)


def test_step_grid():
    assert StepGrid.uniform(4, 900).timesteps == [899, 674, 449, 224]
    assert StepGrid.uniform(4, 1000).timesteps == [999, 749, 499, 249]
    grid = StepGrid([999, 856, 665, 399])
    assert grid.horizon == 1000 and grid.num_steps == 4
    assert grid.tau(torch.tensor([0, 1, 4])).tolist() == [-1, 399, 999]
    with pytest.raises(ValueError):
        StepGrid([10, 20])


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("randmid", [True, False])
@pytest.mark.parametrize("timesteps", [[899, 674, 449, 224], [999, 856, 665, 399], [899, 449]])
def test_intervals_lie_in_their_documented_ranges(separate, randmid, timesteps):
    grid = StepGrid(timesteps)
    taus = [-1] + timesteps[::-1]
    torch.manual_seed(0)
    draw = sample_draw(grid, 20000, "cpu", separate=separate, randmid=randmid)
    assert set(draw.k.tolist()) == set(range(1, grid.num_steps + 1))
    for k in range(1, grid.num_steps + 1):
        sel = draw.k == k
        t_g, t_e, t = draw.t_g[sel], draw.t_e[sel], draw.t[sel]
        assert (t_g == taus[k]).all()
        end = taus[k - 1] + 1                      # τ_{k-1} + 1, 0 for the last step
        if randmid:
            assert (t_e >= end).all() and (t_e < taus[k] - 20).all()
            assert t_e.unique().numel() > 10       # really drawn, not fixed
        else:
            assert (t_e == end).all()
        high = taus[k] - 10 if separate else grid.horizon - 10
        assert (t >= t_e.clamp(min=20)).all() and (t < high).all()
        assert t.min() < t_e.clamp(min=20).min() + 30 and t.max() > high - 30  # spans the range


def test_transition_std_closed_form(path):
    # β² = σ_t² − α_t² σ_e² / α_e² = 1 − ᾱ_t / ᾱ_e for a variance-preserving path.
    t_e, t = torch.tensor([225, 0]), torch.tensor([500, 20])
    beta = transition_std(path, t_e, t)
    expected = [math.sqrt(1 - ALPHAS_CUMPROD[500] / ALPHAS_CUMPROD[225]),
                math.sqrt(1 - ALPHAS_CUMPROD[20] / ALPHAS_CUMPROD[0])]
    assert beta.tolist() == pytest.approx(expected, rel=1e-5)


def test_transition_has_the_stated_mean_and_variance(path):
    torch.manual_seed(0)
    n_draws = 200000
    x0, eps = torch.full((1, 1), 0.7), torch.full((1, 1), -0.3)
    t_e, t = torch.tensor([300]), torch.tensor([600])
    x_t, _ = diffuse(path, x0.expand(n_draws, 1), eps.expand(n_draws, 1), t_e.expand(n_draws),
                     t.expand(n_draws), torch.randn(n_draws, 1))
    a_e, s_e = math.sqrt(ALPHAS_CUMPROD[300]), math.sqrt(1 - ALPHAS_CUMPROD[300])
    a_t = math.sqrt(ALPHAS_CUMPROD[600])
    x_e = a_e * 0.7 + s_e * -0.3
    mean, var = a_t / a_e * x_e, 1 - ALPHAS_CUMPROD[600] / ALPHAS_CUMPROD[300]
    assert x_t.mean().item() == pytest.approx(mean, abs=4 * math.sqrt(var / n_draws))
    assert x_t.var().item() == pytest.approx(var, rel=0.01)


def test_mixed_noise_reproduces_x_t_exactly(path):
    torch.manual_seed(0)
    x0, eps, n = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    t_e = torch.tensor([0, 100, 225, 450, 675])
    t = torch.tensor([20, 300, 225, 800, 889])
    x_t, m = diffuse(path, x0, eps, t_e, t, n)
    a_t, s_t = path.alpha_sigma(t, 4)
    torch.testing.assert_close(a_t * x0 + s_t * m, x_t, atol=1e-6, rtol=1e-5)


def test_importance_weight_by_hand():
    m = torch.ones(2, 3)
    n = torch.zeros(2, 3)
    n[1] = 2.0
    # exp(−½·1)/exp(0) and exp(−½·1)/exp(−½·4)
    assert importance_weight(m, n).tolist() == pytest.approx([math.exp(-0.5), math.exp(1.5)])


def test_min_snr_weight_by_hand(path):
    t = torch.tensor([10, 900])
    snr_900 = ALPHAS_CUMPROD[900] / (1 - ALPHAS_CUMPROD[900])
    assert min_snr_weight(path, t).tolist() == pytest.approx([5.0, snr_900], rel=1e-5)


def test_fake_score_loss_by_hand(path):
    x0_fake = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    x0_student = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    t = torch.tensor([10, 900])
    m = torch.ones(2, 2)
    n = torch.zeros(2, 2)
    snr_900 = ALPHAS_CUMPROD[900] / (1 - ALPHAS_CUMPROD[900])
    w_is = math.exp(-0.5)
    expected = (5.0 * w_is * (1 + 4) / 2 + snr_900 * w_is * 4 / 2) / 2
    assert FakeScoreLoss(path)(x0_fake, x0_student, t, m, n).item() == pytest.approx(expected, rel=1e-5)


def test_cfg_and_dmd_normalizer_by_hand():
    c, u = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert classifier_free_guidance(c, u, 4.5).tolist() == [[5.5, -3.5]]
    w = dmd_normalizer(torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 0.0]]))
    assert w.dtype == torch.float64 and w.tolist() == [1.5]


def test_student_losses_by_hand():
    x0 = torch.tensor([[1.0, 2.0]], requires_grad=True)
    real, fake = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    # target = x0 + real − fake = [0, 1]; diff = [1, 1]; w = mean |x0 − real| = 1.5
    mse = StudentLoss("mse")(x0, real, fake)
    assert mse.item() == pytest.approx(1 / 1.5)
    mse.backward()
    assert x0.grad.tolist()[0] == pytest.approx([2 * 1 / 1.5 / 2] * 2)  # d/dx mean(diff²/w)
    c = 1e-3
    huber = StudentLoss("huber")(x0, real, fake)
    assert huber.item() == pytest.approx((math.sqrt(1 + c * c) - c) / 1.5, rel=1e-6)
    c = 0.00054 * math.sqrt(2)
    huber_norm = StudentLoss("huber_norm")(x0, real, fake)
    assert huber_norm.item() == pytest.approx((math.sqrt(2 + c * c) - c) / 1.5, rel=1e-6)


@pytest.mark.parametrize("kind", StudentLoss.kinds)
def test_generator_gradient_vanishes_when_fake_equals_real(kind):
    x0 = torch.randn(3, 4, 2, 2, requires_grad=True)
    real = torch.randn(3, 4, 2, 2)
    StudentLoss(kind)(x0, real, real.clone()).backward()
    assert torch.count_nonzero(x0.grad) == 0


def test_rollout_equals_hand_computation(path):
    """A two-parameter ε-model: ε̂ = a·x + b·t/1000; DDIM by hand on the grid 899, 449."""
    a, b = 0.3, 0.5

    def student(x, t, cond):
        eps = a * x + b * t.float().view(-1, 1) / 1000 + cond["shift"]
        return path.x0_eps(eps, x, t, "epsilon")

    z = torch.tensor([[1.0], [-2.0]])
    cond = {"shift": torch.tensor([[0.0], [0.1]])}
    traj = rollout(student, z, cond, StepGrid([899, 449]), path)
    ab = ALPHAS_CUMPROD
    expected = []
    for x, shift in [(1.0, 0.0), (-2.0, 0.1)]:
        eps = a * x + b * 0.899 + shift
        x0 = (x - math.sqrt(1 - ab[899]) * eps) / math.sqrt(ab[899])
        x = math.sqrt(ab[449]) * x0 + math.sqrt(1 - ab[449]) * eps
        eps = a * x + b * 0.449 + shift
        expected.append((x - math.sqrt(1 - ab[449]) * eps) / math.sqrt(ab[449]))
    assert traj.sample.squeeze(1).tolist() == pytest.approx(expected, rel=1e-5)
    assert traj.states.shape == (2, 2, 1)
    torch.testing.assert_close(traj.states[1], z)   # x^{(K)} is the noise itself
    state, x0, eps = traj.at(torch.tensor([2, 1]))
    torch.testing.assert_close(state[0], z[0])
    torch.testing.assert_close(x0[1], traj.sample[1])


def test_fake_score_loss_without_importance_weight(path):
    x0_fake, x0_student = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    t, m, n = torch.tensor([10]), torch.ones(1, 2), torch.zeros(1, 2)
    loss = FakeScoreLoss(path, use_importance_weight=False)(x0_fake, x0_student, t, m, n)
    assert loss.item() == pytest.approx(5.0 * (1 + 4) / 2)
