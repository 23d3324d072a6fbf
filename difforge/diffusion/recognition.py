"""What recognition with a trained diffusion model needs (the diffusion classifier, diffusion
features): the model loaded once per actor (`Denoiser`), images as its clean inputs x0, and x0
noised to a time on its own path, for DDPM-trained models (x_t = sqrt(a) x0 + sqrt(1 - a) eps)
and flows (x_t = (1 - t) x0 + t eps) alike."""

from __future__ import annotations

from typing import Any

from difforge.platform.errors import DifforgeError


def clean_inputs(images: list[bytes], info: dict[str, Any], vae, device, what: str):
    """Encoded images as the model's x0 (float32): pixels in [-1, 1], or through the model's
    VAE (the latent mean, scaled) for a latent model; a clear error when their shape is not the
    model's."""
    import torch

    from difforge.platform.imaging import channels_first

    shape = tuple(info["sample_shape"])
    channels = vae.config.in_channels if vae is not None else shape[0]
    arr = channels_first(images, channels)
    x = torch.from_numpy(arr).float().div(127.5).sub(1.0).to(device)
    if vae is not None:
        with torch.no_grad():
            x = vae.encode(x.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    if tuple(x.shape[1:]) != shape:
        raise DifforgeError(
            f"{what}: the images give samples of shape {list(x.shape[1:])}; the "
            f"model takes {list(shape)} (prepare them as its training data "
            "was, e.g. image.resize)"
        )
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


class Denoiser:
    """A model step's diffusion model as recognition uses it, loaded once per actor: the network
    (on the actor's device, in its dtype) and VAE, its description (`info`), its noising `path`."""

    def __init__(self, model_step, weights: str, ctx, what: str):
        from difforge.diffusion.model_folder import load_model
        from difforge.models.resolve import model_of
        from difforge.platform import columns as C

        self.uri = model_of(model_step)[C.MODEL_URI]
        model, info, config, vae = load_model(self.uri, weights)
        if info.get("guidance_embedding"):
            raise DifforgeError(f"{what}: a guided student takes w as an input; use its teacher")
        self.what, self.info, self.kind = what, info, info["backbone"]
        self.device, self.dtype = ctx.torch_device()
        self.model = model.to(self.device, self.dtype).eval()
        self.vae = vae.to(self.device).eval() if vae is not None else None
        self.path = Path(info, config, self.device)

    def clean(self, images: list[bytes]):
        """`clean_inputs` of the images for this model."""
        return clean_inputs(images, self.info, self.vae, self.device, self.what)

    def __call__(self, x, t, labels, cond):
        """One pass of the network (no gradients), its output in float32."""
        import torch

        from difforge.diffusion.backbones import forward

        cond = None if cond is None else cond.to(self.dtype)
        with torch.no_grad():
            return forward(self.model, self.kind, x.to(self.dtype), t, labels, cond).float()
