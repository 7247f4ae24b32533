"""The Gaussian path x_t = alpha_t * x0 + sigma_t * eps and the conversions to (x0, eps).

docs/method.md §1: every model output is first converted to (x̂0, ε̂); all TDM maths is written in
those two quantities, so one implementation serves every backbone.
"""
from __future__ import annotations

import torch


def working_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype TDM's maths runs in (docs/method.md §1): float32 whatever the network's precision
    (bf16/fp16 outputs are upcast), float64 where the inputs already are (the equivalence proofs)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class GaussianPath:
    """Discrete noise schedule indexed by integer timesteps 0..N-1 (docs/method.md §1).

    For the DDPM family alpha_t = sqrt(ᾱ_t), sigma_t = sqrt(1 - ᾱ_t) from the teacher
    scheduler's `alphas_cumprod`. Lookups take a tensor of timesteps (one per sample) and
    return values shaped to broadcast against a batch of latents, in float32 (`alpha`, `sigma`)
    or, asked for, float64 (the tables as computed, before rounding).
    """

    def __init__(self, alpha: torch.Tensor, sigma: torch.Tensor):
        alpha64, sigma64 = (torch.as_tensor(v).to(torch.float64) for v in (alpha, sigma))
        self.tables = {torch.float64: (alpha64, sigma64),
                       torch.float32: (alpha64.float(), sigma64.float())}
        self.alpha, self.sigma = self.tables[torch.float32]

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> "GaussianPath":
        alphas_cumprod = torch.as_tensor(alphas_cumprod).to(torch.float64)
        return cls(alphas_cumprod.sqrt(), (1.0 - alphas_cumprod).sqrt())

    @classmethod
    def flow(cls, sigma: torch.Tensor) -> "GaussianPath":
        """Rectified flow: α_t = 1 − σ_t (docs/method.md §1), σ the scheduler's table."""
        sigma = torch.as_tensor(sigma).to(torch.float64)
        return cls(1.0 - sigma, sigma)

    @classmethod
    def from_scheduler(cls, scheduler) -> "GaussianPath":
        return cls.from_alphas_cumprod(scheduler.alphas_cumprod)

    @property
    def num_timesteps(self) -> int:
        return self.alpha.shape[0]

    def to(self, device) -> "GaussianPath":
        alpha, sigma = self.tables[torch.float64]
        return GaussianPath(alpha.to(device), sigma.to(device))

    @staticmethod
    def _lookup(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        values = table.to(t.device)[t.long()]
        return values.reshape(values.shape + (1,) * (ndim - values.ndim))

    def alpha_sigma(self, t: torch.Tensor, ndim: int = 1, dtype: torch.dtype = torch.float32):
        """(alpha_t, sigma_t), each reshaped to `ndim` dimensions for broadcasting."""
        alpha, sigma = self.tables[dtype]
        return self._lookup(alpha, t, ndim), self._lookup(sigma, t, ndim)

    def snr(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """SNR_t = alpha_t² / sigma_t² (docs/method.md §4), one value per timestep."""
        alpha, sigma = self.alpha_sigma(t, dtype=dtype)
        return alpha**2 / sigma**2

    def x0_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
               prediction_type: str):
        """Convert a network output at (x_t, t) to (x̂0, ε̂) (docs/method.md §1).

        epsilon:       ε̂ = out,            x̂0 = (x_t - σ ε̂) / α
        sample:        x̂0 = out,           ε̂ = (x_t - α x̂0) / σ
        v_prediction:  x̂0 = α x_t - σ v,   ε̂ = σ x_t + α v
        flow (rectified flow, α = 1 − σ, velocity v = ε − x0):
                       x̂0 = x_t - σ v,     ε̂ = x_t + α v
        """
        dtype = working_dtype(model_output)
        alpha, sigma = self.alpha_sigma(t, x_t.ndim, dtype)
        out, x_t = model_output.to(dtype), x_t.to(dtype)
        if prediction_type == "epsilon":
            return (x_t - sigma * out) / alpha, out
        if prediction_type == "sample":
            return out, (x_t - alpha * out) / sigma
        if prediction_type == "v_prediction":
            return alpha * x_t - sigma * out, sigma * x_t + alpha * out
        if prediction_type == "flow":
            return x_t - sigma * out, x_t + alpha * out
        raise ValueError(f"unknown prediction_type {prediction_type!r}")

    def ddim_move(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM move to time t with the predicted noise: α_t x̂0 + σ_t ε̂ (§2)."""
        alpha, sigma = self.alpha_sigma(t, x0.ndim, working_dtype(x0))
        return alpha * x0 + sigma * eps
