"""The denoiser: a diffusers UNet plus the two ways conditions enter it (design.md §3), its diffusion loss,
and the schedulers it samples with.

A *denoiser* in histosynth is any callable ``(latents (B, C, h, w), timestep, conditions: dict) -> model output``;
samplers see nothing else.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (
    ConfigMixin,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ModelMixin,
    UNet2DModel,
)
from diffusers.configuration_utils import register_to_config

from histosynth.checks import one_of
from histosynth.errors import HistosynthError
from histosynth.models.presets import preset

NUM_TRAIN_TIMESTEPS = 1000


def build_unet(preset_name: str, in_channels: int, out_channels: int, sample_size: int, kind: str = "unet",
               global_conditioning: bool = False) -> UNet2DModel:
    """A diffusers ``UNet2DModel`` of a named size; with ``global_conditioning`` it adds a vector of the
    time-embedding width to the time embedding (``class_embed_type="identity"``)."""
    extra = {"class_embed_type": "identity"} if global_conditioning else {}
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                       **preset(kind, preset_name), **extra)


def time_embedding_width(unet: UNet2DModel) -> int:
    return unet.config.block_out_channels[0] * 4


class GlobalProjection(ModelMixin, ConfigMixin):
    """Projects each global condition (style vector, SSL embedding, class/text embedding) to the UNet's
    time-embedding width and sums them; a zero input vector is that condition's null."""

    @register_to_config
    def __init__(self, inputs: dict[str, int], width: int):
        super().__init__()
        self.layers = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width))
            for name, dim in sorted(inputs.items())
        })

    def forward(self, conditions: dict, batch: int, device, dtype) -> torch.Tensor:
        total = torch.zeros(batch, self.config.width, device=device, dtype=dtype)
        for name, layer in self.layers.items():
            vector = conditions.get(name)
            if vector is None:
                vector = torch.zeros(batch, self.config.inputs[name], device=device, dtype=dtype)
            total = total + layer(vector.to(dtype))
        return total  # (B, width)


class ConditionedDenoiser(nn.Module):
    """UNet whose input is the noisy latents concatenated with the spatial mask condition (all classes at once),
    with global conditions projected and added to the time embedding (design.md §3)."""

    def __init__(self, unet: UNet2DModel, latent_channels: int, num_classes: int,
                 projection: GlobalProjection | None = None):
        super().__init__()
        if unet.config.in_channels != latent_channels + num_classes:
            raise ValueError(
                f"UNet takes {unet.config.in_channels} channels, expected {latent_channels} latent + {num_classes} mask"
            )
        if (projection is not None) != (unet.config.class_embed_type == "identity"):
            raise ValueError("a global projection needs a UNet built with global_conditioning=True, and vice versa")
        self.unet = unet
        self.latent_channels = latent_channels
        self.num_classes = num_classes
        self.projection = projection

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, conditions: dict) -> torch.Tensor:
        inputs = latents
        if self.num_classes:
            mask = conditions.get("mask")
            if mask is None:
                mask = latents.new_zeros(latents.shape[0], self.num_classes, *latents.shape[2:])
            inputs = torch.cat([latents, mask.to(latents.dtype)], dim=1)  # (B, C + K, h, w)
        if timestep.ndim == 0:
            timestep = timestep.expand(latents.shape[0])
        class_labels = None
        if self.projection is not None:
            class_labels = self.projection(conditions, latents.shape[0], latents.device, latents.dtype)
        return self.unet(inputs, timestep, class_labels=class_labels).sample  # (B, C, h, w)


PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AutocastDenoiser(nn.Module):
    """A denoiser evaluated under ``torch.autocast`` at a lower precision, its output returned as float32.

    Autocast runs convolutions and matrix products in ``dtype`` and keeps normalisation and softmax in float32;
    everything around the call — guidance, the solver, the canvas, the heal — stays float32, so only the UNet's
    arithmetic is approximate (benchmarks/denoise_profile.py: 1.76x per evaluation on a CPU with AVX-512 BF16;
    channels-last weights add nothing on top, so the weights are left as they are)."""

    def __init__(self, denoiser: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.denoiser = denoiser
        self.dtype = dtype

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, conditions: dict) -> torch.Tensor:
        with torch.autocast(latents.device.type, dtype=self.dtype):
            return self.denoiser(latents, timestep, conditions).float()


def at_precision(denoiser: nn.Module, precision: str, device: str | torch.device = "cpu") -> nn.Module:
    """``denoiser`` as it is for float32, else wrapped to run under autocast at ``precision``."""
    if one_of("--precision", precision, PRECISIONS) == "float32":
        return denoiser
    if precision == "float16" and torch.device(device).type != "cuda":
        raise HistosynthError("--precision float16 needs a CUDA device; on a CPU use bfloat16")
    return AutocastDenoiser(denoiser, PRECISIONS[precision])


def make_train_scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The forward process every model trains with; sampling schedulers are built from its config.

    ``zero_terminal_snr`` rescales the betas so that the last timestep holds no signal at all, and samplers start
    there (trailing spacing). Without it the last timestep keeps 7 % of the signal and samplers start at 96 % of
    the schedule, so a model learns to read each channel's mean over a patch from its input — for a mask model,
    the class fractions — and at sampling reads them from the starting noise instead (Lin et al. 2024). It needs
    v-prediction: at zero signal the noise alone says nothing about the image."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise HistosynthError(f"prediction type must be 'epsilon' or 'v_prediction', not '{prediction_type}'")
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise HistosynthError("a zero-terminal-SNR schedule needs --prediction-type v_prediction")
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_terminal_snr else {}
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type, clip_sample=False,
                         **extra)


SCHEDULERS = {
    # Stochastic DPM-Solver++ (the default): its fresh noise corrects errors of small, briefly trained models that
    # the deterministic ODE solvers (dpm++, ddim, euler) turn into grainy texture.
    "dpm++sde": DPMSolverMultistepScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
}


def make_sampling_scheduler(name: str, train_config: dict):
    """A diffusers scheduler for sampling, with per-sample clipping/thresholding off (wrong on a canvas, §2)."""
    if name not in SCHEDULERS:
        raise HistosynthError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    # A live scheduler's config lists the values it took by default in ``_use_default_values``, and from_config
    # would give those keys the *sampling* class's defaults (DPM-Solver's timestep spacing, not DDPM's): dropped
    # here, so a scheduler built during training samples at the timesteps of the saved model folder.
    config = {key: value for key, value in dict(train_config).items() if key != "_use_default_values"}
    config.update(clip_sample=False, thresholding=False)
    if name == "dpm++":
        config.update(algorithm_type="dpmsolver++", solver_order=2)
    if name == "dpm++sde":
        config.update(algorithm_type="sde-dpmsolver++", solver_order=2)
    return SCHEDULERS[name].from_config(config)


class DiffusionObjective(nn.Module):
    """ε- or v-prediction MSE of a denoiser on clean inputs; condition dropout trains the null condition.

    ``encoders`` are trainable condition encoders (e.g. the style encoder) run inside the loss, so they train
    jointly with the denoiser: ``batch["raw"][name]`` is encoded to ``conditions[name]`` and multiplied by
    ``batch["keep"][name]`` (0 = dropped: the zero vector is the null condition).
    """

    def __init__(self, denoiser: nn.Module, train_scheduler: DDPMScheduler, encoders: dict[str, nn.Module] | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.train_scheduler = train_scheduler
        self.encoders = nn.ModuleDict(encoders or {})

    def conditions(self, batch: dict) -> dict:
        """The batch's conditions with trainable encoders applied and dropped groups zeroed."""
        conditions = dict(batch.get("conditions", {}))
        for name, raw in batch.get("raw", {}).items():
            vector = self.encoders[name](raw) if name in self.encoders else raw  # (B, D)
            keep = batch["keep"][name].to(vector.dtype)[:, None]  # (B, 1)
            conditions[name] = vector * keep
        return conditions

    def forward(self, batch: dict) -> torch.Tensor:
        """``batch``: ``clean`` (B, C, h, w), ``noise`` like it, ``timesteps`` (B,), ``conditions`` (already nulled),
        optionally ``raw``/``keep`` for global conditions."""
        clean, noise, timesteps = batch["clean"], batch["noise"], batch["timesteps"]
        noisy = self.train_scheduler.add_noise(clean, noise, timesteps)
        prediction = self.denoiser(noisy, timesteps, self.conditions(batch))
        if self.train_scheduler.config.prediction_type == "v_prediction":
            target = self.train_scheduler.get_velocity(clean, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float())
