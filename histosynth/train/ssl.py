"""Self-supervised training of histosynth's own encoder (SimCLR, Chen et al. 2020) and of the embedding prior over
k×k grids of its embeddings (what ``histosynth train ssl`` and ``histosynth train prior`` call).

SimCLR: two strongly augmented views of each patch (random resized crop, flips/90° rotations, colour jitter,
grey-scale, blur) pass through the encoder and a projection MLP; the NT-Xent loss pulls the two views of a patch
together and pushes the other 2N−2 views of the batch away. The loss is written here from the paper (eq. 1) rather
than taken from a library. Both trainings run on the shared ``Trainer``: every random choice of a sample comes from
its per-sample seed.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from histosynth.conditions.embedding_cache import EmbeddingCache, load_cache, resolve_embeddings
from histosynth.conditions.encoders import ENCODER_COMPONENT, SSLEncoder
from histosynth.conditions.text import (
    DEFAULT_TEXT_ENCODER,
    class_fractions,
    composition_phrase,
    load_text_encoder,
    read_caption_file,
    source_caption,
)
from histosynth.data.dataset import PatchDataset, _read_png, load_dataset_index
from histosynth.dihedral import dihedral
from histosynth.errors import HistosynthError
from histosynth.models.bundle import model_card, save_bundle
from histosynth.models.denoiser import NUM_TRAIN_TIMESTEPS, DiffusionObjective, make_train_scheduler
from histosynth.models.prior import EmbeddingPrior, prior_preset
from histosynth.train.run import _check_out, _data_facts, work_dir_for
from histosynth.train.tasks import trainable_parameters
from histosynth.train.trainer import Callback, TrainConfig, Trainer

SSL_PRESETS: dict[str, dict] = {
    "tiny": dict(arch="cnn", widths=(16, 32, 64)),
    "demo": dict(arch="cnn", widths=(32, 64, 128, 256)),
    "base": dict(arch="timm:resnet18"),
}


def build_ssl_encoder(preset: str, input_size: int) -> SSLEncoder:
    """An untrained encoder of a named size (``tiny``, ``demo``, ``base``) or any timm architecture
    (``timm:NAME``), for images of ``input_size`` px."""
    if preset.startswith("timm:"):
        settings = dict(arch=preset)
    elif preset in SSL_PRESETS:
        settings = dict(SSL_PRESETS[preset])
    else:
        raise HistosynthError(f"unknown preset '{preset}' for the SSL encoder; choose one of "
                              f"{', '.join(SSL_PRESETS)} or timm:NAME")
    return SSLEncoder(input_size=input_size, **settings)


# ================================================================================================ augmentation


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def augment_view(image: torch.Tensor, g: torch.Generator, size: int, strength: float = 1.0) -> torch.Tensor:
    """One strongly augmented view of ``image`` (3, H, W) in [0, 1] -> (3, size, size) in [0, 1] (SimCLR's
    augmentations with a milder hue shift, since stain hue carries meaning)."""
    _, height, width = image.shape
    area = height * width
    for _ in range(10):  # random resized crop: scale [0.3, 1], aspect [3/4, 4/3]
        target = area * _uniform(g, 1 - 0.7 * strength, 1.0)
        ratio = math.exp(_uniform(g, math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            break
    else:
        w, h = width, height
    top = int(torch.randint(0, height - h + 1, (1,), generator=g))
    left = int(torch.randint(0, width - w + 1, (1,), generator=g))
    view = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)  # (3, S, S)
    view = dihedral(view, int(torch.randint(0, 8, (1,), generator=g)))
    if float(torch.rand((), generator=g)) < 0.8:  # colour jitter
        s = strength
        view = TF.adjust_brightness(view, _uniform(g, 1 - 0.4 * s, 1 + 0.4 * s))
        view = TF.adjust_contrast(view, _uniform(g, 1 - 0.4 * s, 1 + 0.4 * s))
        view = TF.adjust_saturation(view, _uniform(g, 1 - 0.4 * s, 1 + 0.4 * s))
        view = TF.adjust_hue(view, _uniform(g, -0.08 * s, 0.08 * s))
    if float(torch.rand((), generator=g)) < 0.2:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if float(torch.rand((), generator=g)) < 0.5:
        sigma = _uniform(g, 0.1, 1.0 + size / 64)
        kernel = 2 * max(1, round(2 * sigma)) + 1
        view = TF.gaussian_blur(view, [kernel, kernel], [sigma, sigma])
    return view.clamp(0, 1)


# ===================================================================================================== SimCLR


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy over the 2N views of N pairs (Chen et al. 2020, eq. 1)."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, P)
    n = z1.shape[0]
    logits = z @ z.T / temperature  # (2N, 2N)
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # the other view
    return F.cross_entropy(logits, targets)


class SimCLRObjective(nn.Module):
    """Encoder + projection MLP; ``forward(batch)`` is the NT-Xent loss of ``batch["views"]`` (2, N, 3, S, S)."""

    def __init__(self, encoder: SSLEncoder, projection_dim: int = 128, temperature: float = 0.2):
        super().__init__()
        self.encoder = encoder
        hidden = max(256, encoder.dim)
        self.projector = nn.Sequential(nn.Linear(encoder.dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, projection_dim))
        self.temperature = temperature

    def forward(self, batch: dict) -> torch.Tensor:
        first, second = batch["views"]
        z = self.projector(self.encoder(torch.cat([first, second])))  # (2N, P)
        return nt_xent(*z.chunk(2), self.temperature)


class SSLTask:
    """Pairs of augmented views of training patches, normalised with the encoder's mean/std."""

    def __init__(self, objective: SimCLRObjective, data: str, size: int, strength: float = 1.0):
        self.module = objective
        self.dataset = PatchDataset(data, split="train", augment=False)
        if len(self.dataset) < 2:
            raise HistosynthError(f"{data}: SimCLR needs at least 2 training patches")
        self.size, self.strength = size, strength
        config = objective.encoder.config
        self.mean = torch.tensor(config.mean)[:, None, None]
        self.std = torch.tensor(config.std)[:, None, None]

    def dataset_size(self) -> int:
        return len(self.dataset)

    def make_batch(self, indices: list[int], seeds: list[int], device) -> dict:
        first, second = [], []
        for index, seed in zip(indices, seeds):
            g = torch.Generator().manual_seed(int(seed))
            image = (self.dataset[index]["image"] + 1) / 2  # (3, H, W) in [0, 1]
            first.append((augment_view(image, g, self.size, self.strength) - self.mean) / self.std)
            second.append((augment_view(image, g, self.size, self.strength) - self.mean) / self.std)
        return {"views": torch.stack([torch.stack(first), torch.stack(second)]).to(device)}  # (2, N, 3, S, S)


def train_ssl(data: str, out: str, preset_name: str = "tiny", image_size: int | None = None,
              temperature: float = 0.2, config: TrainConfig | None = None, resume: bool = False,
              callbacks: list[Callback] = ()) -> Path:
    """Train histosynth's self-supervised encoder with SimCLR on the dataset's training patches and save it as
    an encoder folder (``histosynth.json`` kind ``encoder`` + ``ssl_encoder/``)."""
    out, config = Path(out), config or TrainConfig()
    _check_out(out, resume, {"--data": data})
    index = load_dataset_index(data)
    size = int(image_size or index["patch_size"])
    if temperature <= 0:
        raise HistosynthError(f"temperature must be positive, got {temperature}")
    torch.manual_seed(config.seed)
    encoder = build_ssl_encoder(preset_name, size)
    objective = SimCLRObjective(encoder, temperature=temperature)
    trainer = Trainer(SSLTask(objective, data, size), config, work_dir_for(out), callbacks,
                      identity={"model": "ssl", "preset": preset_name, "image_size": size, "temperature": temperature})
    encoder = trainer.fit(resume=resume).encoder.eval()
    summary = trainer.summary() | {"preset": preset_name, "parameters": trainable_parameters(encoder),
                                   "method": "SimCLR (NT-Xent)", "temperature": temperature}
    settings = {"kind": "encoder", "method": "simclr", "dim": encoder.dim, "input_size": size,
                "mpp": index["mpp"], "patch_size": index["patch_size"], "training": summary,
                "data": _data_facts(data, index)}
    card = model_card("histosynth self-supervised encoder (SimCLR)", settings, summary,
                      notes="Use it with `histosynth embed --encoder THIS_FOLDER`; its embeddings condition "
                            "`histosynth train image --embeddings`.")
    save_bundle(out, settings, {ENCODER_COMPONENT: encoder}, None, card,
                extra_files={"loss.csv": (work_dir_for(out) / "loss.csv").read_text()})
    return out


# ===================================================================================================== prior


def region_grids(data: str | Path, k: int, split: str = "train") -> list[dict]:
    """Every k×k block of truly adjacent patches of one source and split — neighbours exactly one patch apart, so
    the block tiles its region without overlap or gap even when patches were cut at a smaller stride:
    {"images": k×k image paths (row-major), "masks", "source": id, "box": level-0 (x0, y0, x1, y1)}."""
    index = load_dataset_index(data)
    sources = {int(s["id"]): s for s in index["sources"]}
    by_source: dict[int, dict[tuple[int, int], dict]] = {}
    for patch in index["patches"]:
        if patch["split"] == split:
            by_source.setdefault(int(patch["source"]), {})[(int(patch["y"]), int(patch["x"]))] = patch
    grids = []
    for source_id, at in sorted(by_source.items()):
        step = index["patch_size"] * index["mpp"] / sources[source_id]["source_mpp"]  # level-0 px per patch

        def find(y: float, x: float) -> dict | None:
            # Positions are whole level-0 px: a neighbour one patch away sits within a pixel of y + step.
            for dy in (0, -1, 1):
                for dx in (0, -1, 1):
                    found = at.get((round(y) + dy, round(x) + dx))
                    if found is not None:
                        return found
            return None

        for (y0, x0) in sorted(at):
            block = [find(y0 + i * step, x0 + j * step) for i in range(k) for j in range(k)]
            if all(block):
                grids.append({"images": [p["image"] for p in block], "masks": [p["mask"] for p in block],
                              "source": source_id, "box": (x0, y0, x0 + k * step, y0 + k * step)})
    return grids


def grid_caption(data: str | Path, index: dict, grid: dict, captions: dict) -> tuple[str, str]:
    """(text, class) of a grid: its source's description and the weak-label composition of its region."""
    source = next(s for s in index["sources"] if int(s["id"]) == grid["source"])
    described = source_caption(source, captions)
    labels = None
    if source.get("labelmap"):
        scale = source["source_mpp"] / source["labelmap_mpp"]  # labelmap px per level-0 px
        x0, y0, x1, y1 = (int(round(v * scale)) for v in grid["box"])
        labelmap = _read_png(Path(data) / source["labelmap"])
        labels = labelmap[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
    elif any(grid["masks"]):
        labels = np.concatenate([_read_png(Path(data) / m).ravel() for m in grid["masks"] if m])
    composition = composition_phrase(class_fractions(labels, index["classes"])) if labels is not None else ""
    text = f"{described['text']}, {composition}" if composition else described["text"]
    return text, described["class"]


class PriorTask:
    """Standardised k×k embedding grids (with a random dihedral transform) and their text/class conditions."""

    def __init__(self, objective: DiffusionObjective, grids: torch.Tensor, texts: torch.Tensor, classes: torch.Tensor,
                 n_classes: int, null_probability: float = 0.1):
        self.module = objective
        self.grids = grids  # (G, k, k, V, D) raw
        self.texts = texts  # (G, T)
        self.classes = classes  # (G,)
        self.n_classes = n_classes
        self.null_probability = null_probability

    def dataset_size(self) -> int:
        return len(self.grids)

    def make_batch(self, indices: list[int], seeds: list[int], device) -> dict:
        prior: EmbeddingPrior = self.module.denoiser
        clean, noises, timesteps, texts, classes, keep_text, keep_class = [], [], [], [], [], [], []
        views = self.grids.shape[3]
        for index, seed in zip(indices, seeds):
            g = torch.Generator().manual_seed(int(seed))
            k = int(torch.randint(0, 8, (1,), generator=g))
            grid = self.grids[index, :, :, k if views == 8 else 0]  # (k, k, D): each patch seen under transform k
            grid = dihedral(grid.permute(2, 0, 1), k)  # (D, k, k): the region under transform k
            clean.append(grid)
            noises.append(torch.randn(grid.shape, generator=g))
            timesteps.append(int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=g)))
            texts.append(self.texts[index])
            classes.append(F.one_hot(self.classes[index], self.n_classes).float())
            # One condition at a time (text or class), or neither (the null), so each works alone at sampling.
            u = float(torch.rand((), generator=g))
            keep_text.append(self.null_probability <= u < (1 + self.null_probability) / 2)
            keep_class.append(u >= (1 + self.null_probability) / 2)
        with torch.no_grad():
            standardized = prior.standardize(torch.stack(clean).to(device))  # (B, D, k, k)
        return {"clean": standardized, "noise": torch.stack(noises).to(device),
                "timesteps": torch.tensor(timesteps, device=device),
                "raw": {"text": torch.stack(texts).to(device), "class": torch.stack(classes).to(device)},
                "keep": {"text": torch.tensor(keep_text, device=device),
                         "class": torch.tensor(keep_class, device=device)}}


def train_prior(data: str, out: str, embeddings: str, grid: int = 4, text_file: str | None = None,
                text_encoder: str = DEFAULT_TEXT_ENCODER, preset_name: str = "tiny",
                config: TrainConfig | None = None, resume: bool = False, callbacks: list[Callback] = (),
                device: str = "cpu") -> Path:
    """Train the embedding prior on every k×k block of adjacent training patches, conditioned on its caption's
    text embedding or its class (the source's label)."""
    out, config = Path(out), config or TrainConfig()
    _check_out(out, resume, {"--data": data})
    if grid < 1:
        raise HistosynthError(f"--grid must be at least 1, got {grid}")
    index = load_dataset_index(data)
    cache: EmbeddingCache = load_cache(embeddings) if Path(embeddings).is_file() else \
        resolve_embeddings(data, embeddings, device)
    blocks = region_grids(data, grid)
    if not blocks:
        raise HistosynthError(f"{data}: no {grid}×{grid} block of adjacent training patches; use a smaller --grid")
    captions = read_caption_file(text_file) if text_file else {}
    labelled = [grid_caption(data, index, block, captions) for block in blocks]
    texts = [text for text, _ in labelled]
    class_names = sorted({name for _, name in labelled})
    encoder = load_text_encoder(text_encoder)
    unique = sorted(set(texts))
    vectors = encoder(unique)  # (U, T)
    text_table = vectors[[unique.index(t) for t in texts]]  # (G, T)
    class_ids = torch.tensor([class_names.index(name) for _, name in labelled])
    rows = torch.stack([cache.rows(block["images"]) for block in blocks])  # (G, k²)
    grids = cache.embeddings[rows].float().reshape(len(blocks), grid, grid, cache.views, cache.dim)  # (G,k,k,V,D)

    torch.manual_seed(config.seed)
    prior = EmbeddingPrior(cache.dim, grid, conditions={"text": encoder.dim, "class": len(class_names)},
                           **prior_preset(preset_name))
    flat = grids[:, :, :, 0].reshape(-1, cache.dim)  # (G·k², D)
    prior.mean.copy_(flat.mean(0))
    prior.std.copy_(flat.std(0).clamp_min(1e-6) if len(flat) > 1 else torch.ones(cache.dim))
    objective = DiffusionObjective(prior, make_train_scheduler("epsilon"))
    trainer = Trainer(PriorTask(objective, grids, text_table, class_ids, len(class_names)), config,
                      work_dir_for(out), callbacks, identity={"model": "prior", "preset": preset_name, "grid": grid})
    prior = trainer.fit(resume=resume).denoiser.eval()
    summary = trainer.summary() | {"preset": preset_name, "parameters": trainable_parameters(prior),
                                   "grids": len(blocks)}
    examples = sorted(set(texts))[:20]
    settings = {"kind": "prior", "embedding_encoder": cache.encoder, "embedding_weights_hash": cache.weights_hash,
                "embedding_dim": cache.dim, "grid": grid, "mpp": index["mpp"], "patch_size": index["patch_size"],
                "labels": class_names, "text_encoder": encoder.id, "text_dim": encoder.dim,
                "captions": examples, "training": summary, "data": _data_facts(data, index)}
    card = model_card("histosynth embedding prior (text/class -> k×k embedding grid)", settings, summary,
                      notes="Captions seen in training (up to 20):\n\n" + "\n".join(f"- {t}" for t in examples))
    save_bundle(out, settings, {"prior": prior}, objective.train_scheduler, card,
                extra_files={"loss.csv": (work_dir_for(out) / "loss.csv").read_text()})
    return out
