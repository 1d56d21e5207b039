"""EDM-style diffusion around a network F: preconditioning, training loss, σ schedules, samplers.

Denoiser D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)), Karras et al. 2022.
Training draws σ from the paper's cosine-interpolated schedule and weights the loss with
soft-min-SNR; sampling uses Euler, Heun, DPM-Solver++(2M) or DPM++ 2M SDE on a Karras
schedule, with classifier-free guidance when the model is conditioned.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

SAMPLERS = ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde")


class Denoiser(nn.Module):
    """Wraps the HDiT network with EDM preconditioning; `loss` is the training objective."""

    def __init__(self, inner: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.inner = inner
        self.sigma_data = sigma_data

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in) for each σ."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        c_skip, c_out, c_in = (s[:, None, None, None] for s in self.scalings(sigma))
        out = self.inner(x * c_in, sigma.log() / 4, **cond)
        return c_skip * x + c_out * out.float()

    def loss(
        self, x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, **cond
    ) -> torch.Tensor:
        """Per-sample loss on the network output's target, weighted by soft-min-SNR."""
        c_skip, c_out, c_in = (s[:, None, None, None] for s in self.scalings(sigma))
        noised = x + noise * sigma[:, None, None, None]
        out = self.inner(noised * c_in, sigma.log() / 4, **cond).float()
        target = (x - c_skip * noised) / c_out
        return (out - target).pow(2).flatten(1).mean(1) * soft_min_snr_weight(
            sigma, self.sigma_data
        )


class TrainingLoss(nn.Module):
    """forward = the denoiser's loss, so DDP and torch.compile can wrap the whole training step."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, cond: dict
    ) -> torch.Tensor:
        return self.denoiser.loss(x, noise, sigma, **cond)


def soft_min_snr_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Soft-min-SNR (γ = 1 in σ_data units), expressed for the F-target loss.

    In denoised-image space the weight is 1 / (1/snr + 1) with snr = σ_data²/σ²; the F target
    is the image error over c_out, so its weight is that times c_out²:
    σ²·σ_data² / (σ² + σ_data²)², scaled by 4 so the peak (at σ = σ_data) is 1.
    """
    sd2 = sigma_data**2
    return (sigma**2 * sd2) / (sigma**2 + sd2) ** 2 * 4


def _logsnr_cosine_shifted(t: torch.Tensor, image_d: float, noise_d: float) -> torch.Tensor:
    return -2 * torch.log(torch.tan(math.pi * t / 2)) + 2 * math.log(noise_d / image_d)


def rand_cosine_interpolated(
    n: int,
    image_d: float,
    noise_d_low: float = 32,
    noise_d_high: float | None = None,
    sigma_data: float = 0.5,
    sigma_min: float = 1e-3,
    sigma_max: float = 1e3,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """σ from the cosine log-SNR schedule, its resolution shift interpolated between a
    low-resolution shift (noise_d_low, used at low noise) and a high one (at high noise)."""
    noise_d_high = noise_d_high or image_d
    logsnr_max = 2 * math.log(sigma_data / sigma_min)
    logsnr_min = 2 * math.log(sigma_data / sigma_max)
    t_min = math.atan(math.exp(-0.5 * logsnr_max)) * 2 / math.pi
    t_max = math.atan(math.exp(-0.5 * logsnr_min)) * 2 / math.pi
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    t = t_min + u * (t_max - t_min)
    low = _logsnr_cosine_shifted(t, image_d, noise_d_low)
    high = _logsnr_cosine_shifted(t, image_d, noise_d_high)
    logsnr = torch.lerp(low, high, t).clamp(logsnr_min, logsnr_max)
    return (sigma_data * torch.exp(-logsnr / 2)).float()


def karras_sigmas(
    n: int, sigma_min: float = 1e-2, sigma_max: float = 80.0, rho: float = 7.0, device=None
) -> torch.Tensor:
    """n σ levels from σ_max to σ_min spaced uniformly in σ^(1/ρ), followed by 0."""
    ramp = torch.linspace(0, 1, n, device=device, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def guided(denoiser: Callable, cfg_scale: float, cond: dict, uncond: dict) -> Callable:
    """Classifier-free guidance: D_u + s·(D_c − D_u), both halves in one batch."""

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not uncond:  # unconditional model: nothing to guide
            return denoiser(x, sigma, **cond)
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        d = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both)
        d_cond, d_uncond = d.chunk(2)
        return d_uncond + (d_cond - d_uncond) * cfg_scale

    return fn


@torch.no_grad()
def sample(
    denoise: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: str = "dpmpp_2m",
    generator: torch.Generator | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """Integrate from x (noise already scaled by sigmas[0]) down the schedule."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    ones = x.new_ones(x.shape[0])
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, s * ones)
        if sampler in ("euler", "heun"):
            d = (x - denoised) / s
            x_next = x + d * (s_next - s)
            if sampler == "heun" and s_next > 0:
                d2 = (x_next - denoise(x_next, s_next * ones)) / s_next
                x_next = x + (d + d2) / 2 * (s_next - s)
            x = x_next
        elif s_next == 0:
            x = denoised
        elif sampler == "dpmpp_2m":
            t, t_next = -s.log(), -s_next.log()
            h = t_next - t
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised
            x = (s_next / s) * x - torch.expm1(-h) * d
            h_last = h
        else:  # dpmpp_2m_sde, midpoint form
            t, t_next = -s.log(), -s_next.log()
            h = t_next - t
            eta_h = eta * h
            x = s_next / s * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + noise * s_next * (-2 * eta_h).expm1().neg().sqrt()
            h_last = h
        old_denoised = denoised
    return x
