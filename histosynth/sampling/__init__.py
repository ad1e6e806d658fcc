"""Samplers: functions of a denoiser, a latent and a diffusers scheduler; they import no model code."""
