"""Training tasks: what each model learns from and how one sample of its batch is drawn.

Each task turns (dataset index, per-sample seed) into a sample; all randomness of a sample — augmentation,
noise, timestep, condition dropout — comes from that seed, which makes batches independent of process count
and of interruptions.
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Protocol

import torch
import torch.nn as nn
from diffusers import AutoencoderKL

from histosynth.conditions.mask import encode_mask, one_hot
from histosynth.data.dataset import LabelmapCrops, PatchDataset
from histosynth.dihedral import dihedral
from histosynth.models.autoencoder import (
    AutoencoderObjective,
    PatchDiscriminator,
    downsampling_factor,
    encode_latents,
)
from histosynth.models.denoiser import NUM_TRAIN_TIMESTEPS, DiffusionObjective


class ConditionSource(Protocol):
    """A global condition drawn per training sample (style set, SSL embedding, class/text embedding).

    ``draw`` returns the raw value for one sample (a vector, or images a trainable encoder of the objective turns
    into a vector); ``collate`` stacks them; each sample's group is dropped with probability ``dropout``.
    """

    name: str
    dropout: float

    def draw(self, index: int, item: dict, k: int, generator: torch.Generator): ...

    def collate(self, values: list) -> torch.Tensor: ...


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


class AutoencoderTask:
    """Random ``crop``-px crops of training patches for the autoencoder's L1 + KL (+ adversarial) objective; with
    ``adversarial_weight`` > 0 a PatchGAN discriminator trains beside it from step ``adversarial_start``."""

    def __init__(self, vae: AutoencoderKL, data: str, crop: int, kl_weight: float = 1e-6,
                 adversarial_weight: float = 0.0, adversarial_start: int = 0):
        discriminator = PatchDiscriminator() if adversarial_weight > 0 else None
        self.module = AutoencoderObjective(vae, kl_weight, discriminator, adversarial_weight, adversarial_start)
        self.dataset = PatchDataset(data, split="train", augment=False)
        self.crop = crop
        self.factor = downsampling_factor(vae)
        self.latent_channels = vae.config.latent_channels

    def dataset_size(self) -> int:
        return len(self.dataset)

    def make_batch(self, indices: list[int], seeds: list[int], device) -> dict:
        images, noises = [], []
        for index, seed in zip(indices, seeds):
            g = _generator(seed)
            image = self.dataset[index]["image"]  # (3, H, W)
            top = int(torch.randint(0, image.shape[1] - self.crop + 1, (1,), generator=g))
            left = int(torch.randint(0, image.shape[2] - self.crop + 1, (1,), generator=g))
            k = int(torch.randint(0, 8, (1,), generator=g))
            images.append(dihedral(image[:, top:top + self.crop, left:left + self.crop], k))
            side = self.crop // self.factor
            noises.append(torch.randn((self.latent_channels, side, side), generator=g))
        return {"image": torch.stack(images).to(device), "latent_noise": torch.stack(noises).to(device)}


class LatentCache:
    """Encoded latents of (patch, dihedral view), least recently used dropped beyond ``max_bytes``.

    Encoding is deterministic (the posterior mean of one image at a time), so the cache changes speed, never
    results. Unbounded, it would hold 8 views of every patch: 68 GB for 260k patches of 32² × 8 float32 latents.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[int, int]) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: tuple[int, int], value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        self._entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()


class ImageTask:
    """Latent patches with their masks; unlabelled patches and dropped conditions get the null (all-zero) mask."""

    def __init__(self, objective: DiffusionObjective, vae: AutoencoderKL, data: str, num_classes: int,
                 condition_dropout: float = 0.1, sources: list[ConditionSource] = (),
                 latent_cache_bytes: int = 1 << 30):
        self.module = objective
        self.sources = list(sources)
        self.vae = vae.eval().requires_grad_(False)
        self.dataset = PatchDataset(data, split="train", augment=False)
        self.num_classes = num_classes
        self.factor = downsampling_factor(vae)
        self.condition_dropout = condition_dropout
        self._latents = LatentCache(latent_cache_bytes)  # (index, k) -> latent

    def dataset_size(self) -> int:
        return len(self.dataset)

    @torch.no_grad()
    def _latent(self, index: int, k: int, image: torch.Tensor, device) -> torch.Tensor:
        key = (index, k)
        latent = self._latents.get(key)
        if latent is None:
            self.vae.to(device)
            latent = encode_latents(self.vae, image[None].to(device))[0].cpu()  # (C, h, w)
            self._latents.put(key, latent)
        return latent

    def make_batch(self, indices: list[int], seeds: list[int], device) -> dict:
        latents, masks, keep, noises, timesteps = [], [], [], [], []
        raw = {s.name: [] for s in self.sources}
        kept = {s.name: [] for s in self.sources}
        for index, seed in zip(indices, seeds):
            g = _generator(seed)
            item = self.dataset[index]
            k = int(torch.randint(0, 8, (1,), generator=g))
            for source in self.sources:  # drawn first, from their own stream, so mask-only batches stay unchanged
                sg = _generator(seed ^ zlib.crc32(source.name.encode()))  # str hash() varies per process
                raw[source.name].append(source.draw(index, item, k, sg))
                kept[source.name].append(bool(torch.rand((1,), generator=sg) >= source.dropout))
            latent = self._latent(index, k, dihedral(item["image"], k), device)
            latents.append(latent)
            masks.append(dihedral(item["mask"], k))
            dropped = bool(torch.rand((1,), generator=g) < self.condition_dropout)
            keep.append(bool(item["labelled"]) and not dropped)
            noises.append(torch.randn(latent.shape, generator=g))
            timesteps.append(int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=g)))
        mask = encode_mask(torch.stack(masks), self.num_classes, self.factor)  # (B, K, h, w)
        mask = mask * torch.tensor(keep, dtype=mask.dtype)[:, None, None, None]
        batch = {
            "clean": torch.stack(latents).to(device),
            "noise": torch.stack(noises).to(device),
            "timesteps": torch.tensor(timesteps, device=device),
            "conditions": {"mask": mask.to(device)},
        }
        if self.sources:
            batch["raw"] = {s.name: s.collate(raw[s.name]).to(device) for s in self.sources}
            batch["keep"] = {name: torch.tensor(values, device=device) for name, values in kept.items()}
        return batch


class MaskTask:
    """Large crops of the dataset's low-resolution label maps as K-channel one-hot images in [-1, 1].

    With ``slide_labels`` (one name per source id), each crop also carries its slide's label as a one-hot global
    condition — DiffInfinite's subtype prompt — dropped to the null (zero) vector with probability
    ``label_dropout``, so guidance can steer layouts towards a label and unlabelled sampling still works.
    """

    def __init__(self, objective: DiffusionObjective, data: str, crop: int, num_classes: int, length: int = 100_000,
                 downsample: int = 1, slide_labels: dict[int, str] | None = None, label_dropout: float = 0.1):
        self.module = objective
        self.dataset = LabelmapCrops(data, crop=crop, split="train", length=length, downsample=downsample)
        self.num_classes = num_classes
        self.slide_labels = slide_labels
        self.label_names = sorted(set(slide_labels.values())) if slide_labels else []
        self.label_dropout = label_dropout

    def dataset_size(self) -> int:
        return len(self.dataset)

    def make_batch(self, indices: list[int], seeds: list[int], device) -> dict:
        clean, noises, timesteps, labels = [], [], [], []
        for index, seed in zip(indices, seeds):
            g = _generator(seed)
            item = self.dataset[index]
            mask = dihedral(item["mask"], int(torch.randint(0, 8, (1,), generator=g)))
            encoded = one_hot(mask[None], self.num_classes)[0] * 2 - 1  # (K, h, w)
            clean.append(encoded)
            noises.append(torch.randn(encoded.shape, generator=g))
            timesteps.append(int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=g)))
            if self.slide_labels:
                vector = torch.zeros(len(self.label_names))
                if bool(torch.rand((1,), generator=g) >= self.label_dropout):
                    vector[self.label_names.index(self.slide_labels[item["source"]])] = 1
                labels.append(vector)
        batch = {
            "clean": torch.stack(clean).to(device),
            "noise": torch.stack(noises).to(device),
            "timesteps": torch.tensor(timesteps, device=device),
        }
        if self.slide_labels:
            batch["conditions"] = {"label": torch.stack(labels).to(device)}  # (B, L)
        return batch


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
