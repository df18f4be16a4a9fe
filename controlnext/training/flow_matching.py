"""SD3's training objective: rectified flow with SD3's timestep densities (Esser et al., 2024, Sec. 3 and 5.1).

x_t = (1 - sigma) x_0 + sigma * eps, and the denoiser predicts the velocity eps - x_0 (noise to data read
backwards). sigma is drawn as diffusers' SD3 training scripts draw it: u from a density (logit-normal,
mode with heavy tails, or uniform; `diffusers.training_utils`), then the scheduler's own shifted sigma at
index u * N, so the schedule's shift applies in training as in sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DENSITIES = ("logit_normal", "mode", "uniform")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class FlowMatching:
    """The timestep density and loss weighting of SD3's recipe (defaults: logit-normal(0, 1), no weighting)."""

    density: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"

    def __post_init__(self):
        if self.density not in DENSITIES:
            raise ValueError(f"unknown timestep density {self.density!r}; use one of {', '.join(DENSITIES)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.weighting!r}; use one of {', '.join(WEIGHTINGS)}")

    def sample(self, scheduler, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (b,), sigmas (b,)) from the scheduler's shifted training schedule."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.density, batch, self.logit_mean, self.logit_std,
                                                  self.mode_scale, generator=generator)  # (b,) in [0, 1]
        n = scheduler.config.num_train_timesteps
        index = (u * n).long().clamp(0, n - 1)
        return scheduler.timesteps[index], scheduler.sigmas[index]

    def loss(self, prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
             sigmas: torch.Tensor) -> torch.Tensor:
        """Weighted mean of || v_theta - (eps - x_0) ||^2 (SD3's Eq. 6 with w_t from `weighting`)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        weights = compute_loss_weighting_for_sd3(self.weighting, sigmas.float())  # (b,)
        error = (prediction.float() - (noise - latents).float()).pow(2).flatten(1).mean(1)  # (b,)
        return (weights * error).mean()


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x_0 + sigma * eps, per sample."""
    sigmas = sigmas.to(latents.device, latents.dtype).view(-1, *([1] * (latents.ndim - 1)))  # (b, 1, 1, 1)
    return (1 - sigmas) * latents + sigmas * noise
