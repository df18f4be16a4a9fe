"""A loss on the decoded image beside the latent objective, for controls whose condition fixes pixels (edges).

The latent objective weighs every latent value alike; an outline that sits one pixel off costs it little,
because one latent cell spans several pixels. At low noise levels the denoiser's one-step estimate of the
clean latents, x_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), is close to the image it will draw, so decoding
it and comparing with the training image (in pixels and in their horizontal and vertical differences, where
edges are) trains the control to put edges on the pixel. The comparison follows the single-step estimate of
consistency-feedback training (ControlNet++, Li et al. 2024), with the training image in place of a
re-extracted condition, so it suits every kind of control. Gradients flow through the frozen VAE decoder.
"""

from __future__ import annotations

import torch

from ..errors import ControlNextError


def clean_latents(scheduler, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor,
                  prediction_type: str) -> torch.Tensor:
    """The denoiser's one-step estimate of x_0 (b, c, h, w) from x_t and its prediction of noise, velocity or x_0."""
    alphas = scheduler.alphas_cumprod.to(noisy.device, torch.float32)[timesteps].view(-1, 1, 1, 1)  # (b, 1, 1, 1)
    noisy, prediction = noisy.float(), prediction.float()
    if prediction_type == "epsilon":
        return (noisy - (1 - alphas).sqrt() * prediction) / alphas.sqrt()
    if prediction_type == "v_prediction":
        return alphas.sqrt() * noisy - (1 - alphas).sqrt() * prediction
    if prediction_type == "sample":
        return prediction
    raise ControlNextError(f"--pixel-loss-weight needs a noise, velocity or sample prediction, "
                           f"not {prediction_type!r}; drop the flag")


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (b, c, h, w) -> images (b, 3, H, W) in about [-1, 1]."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()


def image_distance(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image (b,): mean absolute difference of the pixels plus that of their horizontal and vertical differences."""
    def per_image(difference: torch.Tensor) -> torch.Tensor:
        return difference.abs().flatten(1).mean(1)

    def gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]

    (image_x, image_y), (target_x, target_y) = gradients(image), gradients(target)
    return per_image(image - target) + per_image(image_x - target_x) + per_image(image_y - target_y)


def pixel_loss(vae, scheduler, batch: dict, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor,
               prediction_type: str, max_timestep: int) -> torch.Tensor:
    """The batch mean of `image_distance` between the decoded one-step estimate and the training image, over the
    examples whose timestep is below `max_timestep` (the others count zero). The training image is the batch's
    pixels, or with a latent cache the decoding of its stored latent mean."""
    chosen = (timesteps < max_timestep).nonzero().flatten()  # (n,)
    if chosen.numel() == 0:
        return prediction.sum() * 0.0  # keeps the graph: every process takes part in the backward pass
    estimate = clean_latents(scheduler, noisy[chosen], prediction[chosen], timesteps[chosen], prediction_type)
    image = decode(vae, estimate)  # (n, 3, H, W)
    with torch.no_grad():
        if "pixel_values" in batch:
            target = batch["pixel_values"].to(image.device)[chosen].float()
        else:  # the image as the VAE reproduces it: its stored posterior mean (unscaled latents), decoded
            mean = batch["latent_mean"].to(image.device)[chosen]
            target = vae.decode(mean.to(vae.dtype)).sample.float()
    return image_distance(image, target).sum() / timesteps.shape[0]
