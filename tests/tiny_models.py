"""Tiny image and mask models with random weights, saved as real model folders (never downloaded)."""
import torch

from histosynth.models.autoencoder import build_autoencoder
from histosynth.models.bundle import image_model_config, save_bundle
from histosynth.models.denoiser import build_unet, make_train_scheduler

CLASSES = [{"id": 0, "name": "unknown", "color": [0, 0, 0]}, {"id": 1, "name": "a", "color": [255, 0, 0]},
           {"id": 2, "name": "b", "color": [0, 0, 255]}]


def tiny_image_model(path, patch=16, classes=CLASSES):
    torch.manual_seed(0)
    vae = build_autoencoder("tiny")
    unet = build_unet("tiny", 4 + max(c["id"] for c in classes), 4, patch // 4)
    config = image_model_config(classes, 0.5, patch, vae, "epsilon", {"steps": 0}, {})
    save_bundle(path, config, {"autoencoder": vae, "unet": unet}, make_train_scheduler(), "# card")
    return path


def tiny_mask_model(path, crop=8, factor=8):
    torch.manual_seed(1)
    unet = build_unet("tiny", 2, 2, crop, kind="mask_unet")
    config = {"kind": "mask", "classes": CLASSES, "num_classes": 2, "mpp": 0.5, "mask_mpp": 0.5 * factor,
              "latent_factor": factor, "latent_patch": crop, "patch_size": crop * factor, "conditioning": {}}
    save_bundle(path, config, {"unet": unet}, make_train_scheduler(), "# card")
    return path
