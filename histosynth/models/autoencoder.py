"""The latent autoencoder: a diffusers ``AutoencoderKL`` built from a preset, trained by histosynth, or any
pretrained diffusers VAE loaded by path or hub id. The latent normalisation is measured on the data and stored in the
VAE's own config, never a magic constant: per-channel ``latents_mean`` / ``latents_std`` (diffusers' convention,
z = (raw − mean)·scaling_factor/std) — a small VAE's channels differ several-fold in mean and spread, and one scalar
scale would leave the low-variance channels, which carry colour, buried under the diffusion noise — or, for VAEs
saved with only ``scaling_factor`` / ``shift_factor``, those."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL

from histosynth.errors import HistosynthError
from histosynth.models.presets import preset

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def build_autoencoder(preset_name: str = "tiny", **overrides) -> AutoencoderKL:
    """A fresh ``AutoencoderKL`` whose downsampling factor is 2^(levels-1) (4× for the small presets)."""
    args = preset("autoencoder", preset_name) | overrides
    levels = len(args["block_out_channels"])
    args.setdefault("down_block_types", ("DownEncoderBlock2D",) * levels)
    args.setdefault("up_block_types", ("UpDecoderBlock2D",) * levels)
    return AutoencoderKL(in_channels=3, out_channels=3, **args)


def downsampling_factor(vae: AutoencoderKL) -> int:
    """Image pixels per latent pixel along one side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def refuse_pickles(folder: Path) -> None:
    """Only safetensors are ever loaded: a folder holding pickle-based weights is refused outright."""
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise HistosynthError(f"{path}: pickle-based weights are not loaded; convert them to safetensors")


def load_autoencoder(name_or_path: str, subfolder: str | None = None) -> AutoencoderKL:
    """A diffusers VAE from a local folder or a hub id (e.g. ``stabilityai/sd-vae-ft-mse``), safetensors only."""
    local = Path(name_or_path)
    if local.exists():
        if (local / "autoencoder" / "config.json").exists() and subfolder is None:
            subfolder = "autoencoder"  # a histosynth bundle
        refuse_pickles(local)
        if not (local / (subfolder or "") / "config.json").exists():
            raise HistosynthError(f"{local}: not a diffusers autoencoder folder (no config.json)")
    try:
        return AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HistosynthError(f"{name_or_path}: cannot load autoencoder ({reason})") from error


@torch.no_grad()
def measure_latent_scale(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 16) -> tuple[list, list]:
    """Per-channel mean and std that make the data's latents zero-mean, unit-variance in every channel; stored in
    the VAE config (``latents_mean``, ``latents_std``, ``scaling_factor`` 1)."""
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(batch_size)])  # (N, C, h, w)
    mean = latents.mean((0, 2, 3)).tolist()
    std = latents.std((0, 2, 3)).clamp_min(1e-6).tolist()
    vae.register_to_config(latents_mean=mean, latents_std=std, scaling_factor=1.0, shift_factor=None)
    return mean, std


def latent_scale(vae: AutoencoderKL) -> dict:
    """The normalisation a VAE's config holds, for model cards and bundle configs."""
    config = vae.config
    return {key: getattr(config, key, None) for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")}


def _normalisation(vae: AutoencoderKL, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float, float]:
    """(mean, std, scale) with z = (raw − mean)·scale/std; per channel (1, C, 1, 1) when the config has them."""
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return mean, std, float(config.scaling_factor)
    return float(config.shift_factor or 0.0), 1.0, float(config.scaling_factor)


def encode_latents(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f); the posterior mean unless a generator
    is given."""
    posterior = vae.encode(images).latent_dist
    raw = posterior.sample(generator) if generator is not None else posterior.mean
    mean, std, scale = _normalisation(vae, raw)
    return (raw - mean) * scale / std


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, C, h, w) -> images (B, 3, h·f, w·f) in [-1, 1]."""
    mean, std, scale = _normalisation(vae, latents)
    return vae.decode(latents * std / scale + mean).sample.clamp(-1, 1)


def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] encoded (posterior mean) and decoded, ``batch_size`` at a time: what the
    autoencoder keeps of them, the sharpest any image model decoded by it can be."""
    with torch.no_grad():
        return torch.cat([decode_latents(vae, encode_latents(vae, chunk)) for chunk in images.split(batch_size)])


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017; the discriminator of LDM's autoencoder training): one real/fake logit per
    overlapping ~34 px receptive field. Hand-written (a few conv layers): diffusers ships VAEs but no discriminator,
    and the usual perceptual loss would need downloaded weights. Trained from scratch beside the autoencoder."""

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers):
            stride = 2 if i < layers - 1 else 1
            blocks += [nn.Conv2d(width, width * 2, 4, stride, 1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2)]
            width *= 2
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 1, h, w) logits


class AutoencoderObjective(nn.Module):
    """Training target of the autoencoder (the model owns its loss): L1 reconstruction plus a small KL term, and,
    with a ``discriminator``, a hinge adversarial term from ``adversarial_start`` steps on (LDM's recipe, without
    the perceptual term, whose VGG weights would be a download).

    Both players learn from one backward pass, so the project's single-optimiser trainer runs GAN training as
    simultaneous gradient descent: the discriminator's loss sees detached reconstructions, and the generator's
    adversarial loss sees the discriminator through detached parameters (``torch.func.functional_call``), so each
    term moves only its own player.
    """

    def __init__(self, vae: AutoencoderKL, kl_weight: float = 1e-6, discriminator: nn.Module | None = None,
                 adversarial_weight: float = 0.05, adversarial_start: int = 0):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.discriminator = discriminator
        self.adversarial_weight = adversarial_weight
        self.adversarial_start = adversarial_start
        # Training steps seen, kept in the state dict so that a resumed run switches the adversary on at the same step.
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def forward(self, batch: dict) -> torch.Tensor:
        """``batch["image"]`` (B, 3, H, W) in [-1, 1]; ``batch["latent_noise"]`` (B, C, h, w) draws the posterior sample."""
        images = batch["image"]
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * batch["latent_noise"]  # (B, C, h, w)
        reconstruction = self.vae.decode(latents).sample  # (B, 3, H, W)
        l1 = (reconstruction - images).abs().mean()
        kl = posterior.kl().mean() / math.prod(images.shape[1:])
        loss = l1 + self.kl_weight * kl
        if self.training:
            self.steps_seen += 1
        if self.discriminator is None or int(self.steps_seen) <= self.adversarial_start:
            return loss
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        generator = -torch.func.functional_call(self.discriminator, frozen, (reconstruction,)).mean()
        real = self.discriminator(images)
        fake = self.discriminator(reconstruction.detach())
        critic = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())  # hinge loss
        return loss + self.adversarial_weight * generator + critic


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two image batches in [-1, 1]."""
    mse = float(((a - b) / 2).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
