"""What recognition with a trained diffusion model needs (the diffusion classifier, diffusion
features): images as the model's clean inputs x0, and x0 noised to a time on its own path, for
DDPM-trained models (x_t = sqrt(a) x0 + sqrt(1 - a) eps) and flows (x_t = (1 - t) x0 + t eps)
alike."""

from __future__ import annotations

from typing import Any

from difforge.platform.errors import DifforgeError


def clean_inputs(images: list[bytes], info: dict[str, Any], vae, device, what: str):
    """Encoded images as the model's x0 (float32): pixels in [-1, 1], or through the model's
    VAE (the latent mean, scaled) for a latent model; a clear error when their shape is not the
    model's."""
    import numpy as np
    import torch

    from difforge.platform.imaging import to_array

    shape = tuple(info["sample_shape"])
    channels = vae.config.in_channels if vae is not None else shape[0]
    arr = np.stack([to_array(b, "L" if channels == 1 else "RGB") for b in images])
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    x = torch.from_numpy(arr).float().div(127.5).sub(1.0).to(device)
    if vae is not None:
        with torch.no_grad():
            x = vae.encode(x.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    if tuple(x.shape[1:]) != shape:
        raise DifforgeError(f"{what}: the images give samples of shape {list(x.shape[1:])}; the "
                            f"model takes {list(shape)} (prepare them as its training data "
                            "was, e.g. image.resize)")  # fmt: skip
    return x.float()


class Path:
    """A model's noising path: `at(x0, eps, t)` gives (x_t, the network's time input, and the
    target its output is compared with once read as `read`)."""

    def __init__(self, info: dict[str, Any], config: dict[str, Any], device):
        self.flow = info.get("objective") == "flow_matching"
        self.prediction = info.get("prediction_type", "epsilon")
        self.T = int(config.get("num_train_timesteps", 1000))
        self.device = device
        if not self.flow:
            import diffusers

            self.alphas = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.to(device)

    def at(self, x0, eps, t: float):
        """x0 noised to time t in [0, 1] (a fraction of the path): (x_t, network time, target)."""
        import torch

        from difforge.diffusion.schedules import alpha_sigma

        n = len(x0)
        if self.flow:
            return x0 + t * (eps - x0), torch.full((n,), t * self.T, device=self.device), eps - x0
        tt = torch.full((n,), min(self.T - 1, round(t * self.T)), device=self.device)
        a, s = alpha_sigma(self.alphas, tt)
        return a * x0 + s * eps, tt, eps

    def read(self, out, xt, t_net):
        """The network's output as the quantity `at`'s target is: the noise estimate for DDPM
        models (v read through it), the velocity for flows."""
        if self.flow:
            return out
        from difforge.diffusion.schedules import alpha_sigma, x0_eps

        a, s = alpha_sigma(self.alphas, t_net)
        return x0_eps(out, xt, a, s, self.prediction, False)[1]
