"""Preview images written during training: a few masks of the dataset and the patches the model draws for them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from histosynth.conditions.mask import encode_mask
from histosynth.data.dataset import PatchDataset, load_dataset_index
from histosynth.io.masks import colorize, write_png
from histosynth.models.autoencoder import decode_latents, downsampling_factor, load_autoencoder
from histosynth.models.denoiser import make_sampling_scheduler
from histosynth.pixels import to_uint8
from histosynth.sampling.patch import sample_patch


def image_preview_callback(data: str, work_dir: Path, every: int, autoencoder: str, n: int = 4, steps: int = 15):
    """A trainer callback writing ``work_dir/previews/step-N.png``: masks on top, samples below."""
    index = load_dataset_index(data)
    dataset = PatchDataset(data, split="train", augment=False)
    labelled = [i for i, p in enumerate(p for p in index["patches"] if p["split"] == "train") if p["mask"]][:n]
    vae = load_autoencoder(autoencoder).eval()
    factor = downsampling_factor(vae)
    masks = torch.stack([dataset[i]["mask"] for i in labelled]) if labelled else None

    def callback(step: int, module) -> None:
        if step % every or masks is None:
            return
        denoiser = module.denoiser
        was_training = denoiser.training
        denoiser.eval()
        condition = encode_mask(masks, denoiser.num_classes, factor)
        scheduler = make_sampling_scheduler("dpm++sde", module.train_scheduler.config)
        shape = (len(masks), denoiser.latent_channels, *condition.shape[-2:])
        with torch.no_grad():
            latents = sample_patch(denoiser, scheduler, shape, steps, seed=0, conditions={"mask": condition})
            images = decode_latents(vae, latents)
        denoiser.train(was_training)
        rgb = to_uint8(images)
        top = np.concatenate([colorize(m.numpy().astype(np.uint8), index["classes"]) for m in masks], axis=1)
        write_png(Path(work_dir) / "previews" / f"step-{step:08d}.png", np.concatenate([top, np.concatenate(list(rgb), axis=1)]))

    return callback
