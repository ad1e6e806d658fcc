"""Downstream segmentation benchmark: does adding synthetic image/mask pairs help a segmentation network?

The same segmentation-models-pytorch U-Net, with the same training budget (steps × batch size), is trained on
  (a) ``real``: n real labelled training patches,
  (b) ``real+synthetic``: the same n real patches plus every synthetic pair (sampled uniformly from the union),
  (c) ``synthetic``: synthetic pairs only,
and scored by Dice and IoU per class on the real ``test`` split, pixels pooled over the split, as mean ± std over
seeds and per source slide (design.md §7). Class 0 is "unknown": it is never a training target, never predicted
and never scored.

Encoders start from random weights (offline); ImageNet weights only when asked (``encoder_weights="imagenet"``,
which downloads them through segmentation-models-pytorch).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError
from histosynth.eval.downstream import class_table, image_tensor, mean_std, train_on_views
from histosynth.eval.features import open_images, read_dataset

# Named U-Net sizes (one registry, chosen by a string): encoders are smp / timm names.
SEGMENTER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"encoder_name": "tu-mobilenetv3_small_050", "encoder_depth": 5, "decoder_channels": (32, 16, 16, 8, 8)},
    "small": {"encoder_name": "resnet18", "encoder_depth": 4, "decoder_channels": (64, 32, 16, 8)},
    "base": {"encoder_name": "resnet34", "encoder_depth": 5, "decoder_channels": (256, 128, 64, 32, 16)},
}
ARMS = ("real", "real+synthetic", "synthetic")


@dataclass
class LabelledSet:
    """Image/mask pairs of one dataset split: images (N, H, W, 3) uint8, masks (N, H, W) uint8 class ids."""

    images: np.ndarray
    masks: np.ndarray
    sources: list[str]
    label: str

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Sequence[int]) -> LabelledSet:
        index = np.asarray(index, dtype=np.int64)
        return LabelledSet(self.images[index], self.masks[index], [self.sources[i] for i in index], self.label)


@dataclass
class TrainConfig:
    """Training budget and network of the benchmark; identical for every arm."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    size: str = "small"  # key of SEGMENTER_SIZES
    encoder_weights: str | None = None  # "imagenet" only when asked: it downloads
    crop: int | None = None  # training crop side; default: the smallest patch side, floored to the U-Net stride
    device: str = "cpu"


def load_labelled(dataset: str | os.PathLike, split: str | None, num_classes: int | None = None) -> LabelledSet:
    """Every patch of ``split`` that has a mask with at least one labelled pixel; masks checked against the classes."""
    meta, patches = read_dataset(dataset, split)
    where = f"{dataset} (split {split!r})" if split is not None else str(dataset)
    if not any(p.mask is not None for p in patches):
        raise HistosynthError(f"{where}: no labelled patches (patches with a mask)")
    if num_classes is None:
        num_classes = max(class_table(meta), default=0) + 1
    image_set = open_images(dataset, split=split)  # refuses mixed sizes and unreadable files
    keep_images, keep_masks, sources = [], [], []
    for index in range(len(image_set)):
        mask_path = image_set.masks[index]
        if mask_path is None:
            continue
        mask = image_set.mask(index)
        if mask.ndim != 2:
            raise HistosynthError(f"{mask_path}: a mask must be one channel of class ids, got shape {mask.shape}")
        image = image_set[index]
        if mask.shape != image.shape[:2]:
            raise HistosynthError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image is"
                                  f" {image.shape[1]}x{image.shape[0]} px")
        if mask.max() >= num_classes:
            raise HistosynthError(f"{mask_path}: class id {int(mask.max())} is not in the dataset's classes"
                                  f" (ids 1..{num_classes - 1})")
        if not mask.any():
            continue  # all "unknown": nothing to learn or score
        keep_images.append(image)
        keep_masks.append(mask)
        sources.append(image_set.sources[index] if image_set.sources else "")
    if not keep_images:
        raise HistosynthError(f"{where}: no patch has a labelled pixel (all masks are 0 = unknown)")
    return LabelledSet(np.stack(keep_images), np.stack(keep_masks), sources, where)  # (N, H, W, 3), (N, H, W)


def build_segmenter(num_classes: int, size: str = "small", encoder_weights: str | None = None):
    """A segmentation-models-pytorch U-Net of a named size with ``num_classes`` output channels (class 0 included)."""
    import segmentation_models_pytorch as smp

    if size not in SEGMENTER_SIZES:
        raise HistosynthError(f"unknown segmenter size {size!r}; known: {', '.join(SEGMENTER_SIZES)}")
    return smp.Unet(encoder_weights=encoder_weights, in_channels=3, classes=num_classes, **SEGMENTER_SIZES[size])


def stride(size: str) -> int:
    """The U-Net's total downsampling: input sides must be multiples of it."""
    return 2 ** SEGMENTER_SIZES[size]["encoder_depth"]


def train_segmenter(pools: Sequence[LabelledSet], num_classes: int, config: TrainConfig, seed: int = 0,
                    log: Callable[[str], None] | None = None):
    """Train a U-Net for ``config.steps`` steps on batches drawn uniformly from the union of ``pools``.

    Each sample is a random crop with a random flip/90° rotation (histology has no orientation). Cross-entropy
    ignores class 0 (unknown). Returns the network in eval mode.
    """
    import torch
    import torch.nn.functional as F

    pools = [p for p in pools if len(p)]
    if not pools:
        raise HistosynthError("segmentation training: no labelled patches")
    step_px = stride(config.size)
    crop = config.crop or min(min(p.images.shape[1:3]) for p in pools)
    crop -= crop % step_px
    if crop < step_px:
        raise HistosynthError(f"segmentation training: patches must be at least {step_px} px for the"
                              f" {config.size!r} U-Net, got {min(min(p.images.shape[1:3]) for p in pools)} px")

    def loss(net, images, masks: list[np.ndarray]):
        target = torch.from_numpy(np.stack(masks).astype(np.int64)).to(config.device) - 1  # (B, crop, crop); -1 unknown
        logits = net(images)[:, 1:]  # (B, K-1, crop, crop): channel 0 (unknown) is never a target
        return F.cross_entropy(logits, target, ignore_index=-1)

    return train_on_views(pools, crop, lambda: build_segmenter(num_classes, config.size, config.encoder_weights),
                          config, seed, lambda pool, item, view: view(pool.masks[item]), loss, log)


def predict(net, images: np.ndarray, size: str, batch_size: int = 16, device: str = "cpu") -> np.ndarray:
    """Class ids (N, H, W) in 1..K-1 for (N, H, W, 3) uint8 images; sides are reflect-padded to the U-Net stride."""
    import torch
    import torch.nn.functional as F

    step_px = stride(size)
    height, width = images.shape[1:3]
    pad_h, pad_w = -height % step_px, -width % step_px
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = image_tensor(images[start:start + batch_size], device)  # (B, 3, H, W)
            if pad_h or pad_w:
                # reflect needs the pad below the side; tiny images fall back to replicate
                mode = "reflect" if min(height, width) > max(pad_h, pad_w) else "replicate"
                x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
            logits = net(x)[:, 1:, :height, :width]  # (B, K-1, H, W)
            out.append((logits.argmax(1) + 1).cpu().numpy())  # (B, H, W)
    return np.concatenate(out)  # (N, H, W)


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts [target, prediction] over labelled pixels (target 0 = unknown is skipped)."""
    labelled = target > 0
    flat = target[labelled].astype(np.int64) * num_classes + pred[labelled].astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray) -> dict[str, dict[int, float | None]]:
    """Dice 2TP/(2TP+FP+FN) and IoU TP/(TP+FP+FN) per class 1..K-1; None where a class is absent from both."""
    dice, iou = {}, {}
    for c in range(1, len(matrix)):
        tp = matrix[c, c]
        fp = matrix[:, c].sum() - tp
        fn = matrix[c, :].sum() - tp
        denominator = tp + fp + fn
        dice[c] = float(2 * tp / (2 * tp + fp + fn)) if denominator else None
        iou[c] = float(tp / denominator) if denominator else None
    return {"dice": dice, "iou": iou}


def _mean(values: dict[int, float | None]) -> float | None:
    present = [v for v in values.values() if v is not None]
    return float(np.mean(present)) if present else None


def evaluate_segmenter(net, test: LabelledSet, num_classes: int, size: str, device: str = "cpu") -> dict[str, Any]:
    """Dice and IoU per class on ``test`` (pixels pooled), their means over classes, and the same per source slide."""
    pred = predict(net, test.images, size, device=device)  # (N, H, W)
    result = scores(confusion(pred, test.masks, num_classes))
    result.update(mdice=_mean(result["dice"]), miou=_mean(result["iou"]))
    per_source = {}
    for source in sorted(set(test.sources)):
        index = [i for i, s in enumerate(test.sources) if s == source]
        part = scores(confusion(pred[index], test.masks[index], num_classes))
        per_source[source] = {**part, "mdice": _mean(part["dice"]), "miou": _mean(part["iou"]), "n": len(index)}
    result["per_source"] = per_source
    return result


def _summarise(runs: list[dict[str, Any]], classes: dict[int, str]) -> dict[str, Any]:
    """mean ± std over seeds of every per-class and per-source score."""
    summary: dict[str, Any] = {
        metric: {c: mean_std([run[metric][c] for run in runs]) for c in classes} for metric in ("dice", "iou")}
    summary["mdice"] = mean_std([run["mdice"] for run in runs])
    summary["miou"] = mean_std([run["miou"] for run in runs])
    sources = sorted({s for run in runs for s in run["per_source"]})
    summary["per_source"] = {s: {m: mean_std([run["per_source"][s][m] for run in runs if s in run["per_source"]])
                                 for m in ("mdice", "miou")} for s in sources}
    return summary


@dataclass
class BenchmarkResult:
    """Everything the segmentation benchmark measured; ``as_dict`` is what segmentation.json holds."""

    classes: dict[int, str]
    settings: dict[str, Any]
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> {"runs": [...], "summary": {...}}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def generator_labelled(synthetic: str | os.PathLike) -> int | None:
    """How many labelled training patches the image model behind a synthetic dataset learnt from, when its
    ``manifest.json`` names a model folder whose ``histosynth.json`` records it; else None."""
    manifest = Path(synthetic) / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        model = json.loads(manifest.read_text()).get("model")
        config = json.loads((Path(model) / "histosynth.json").read_text()) if model else {}
        value = config.get("data", {}).get("labelled_train")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def segmentation_benchmark(data: str | os.PathLike, synthetic: str | os.PathLike, labelled: int | None = None,
                           seeds: int = 3, config: TrainConfig | None = None, train_split: str = "train",
                           test_split: str = "test", log: Callable[[str], None] | None = None,
                           synthetic_ratio: float | None = None,
                           allow_labelled_mismatch: bool = False) -> BenchmarkResult:
    """Train the same U-Net on real / real+synthetic / synthetic pairs and score each on the real test split.

    ``labelled`` real patches train arms (a) and (b); it must equal the number of labelled patches the generator
    learnt from, when the synthetic set says (otherwise the synthetic pairs carry labels the real arm never had), unless
    ``allow_labelled_mismatch``. ``synthetic_ratio`` r draws round(r·n) synthetic pairs per seed for arms (b) and (c)
    (a fixed real:synthetic ratio); without it every pair is used.
    """
    config = config or TrainConfig()
    if seeds < 1:
        raise HistosynthError(f"--seeds must be at least 1, got {seeds}")
    meta, _ = read_dataset(data)
    synthetic_meta, _ = read_dataset(synthetic)
    classes = class_table(meta)
    if not classes:
        raise HistosynthError(f"{data}: dataset.json lists no classes besides 0 (unknown)")
    synthetic_classes = class_table(synthetic_meta)
    if synthetic_classes and synthetic_classes != classes:
        raise HistosynthError(f"{synthetic}: its classes {synthetic_classes} differ from {data}'s {classes}")
    num_classes = max(classes) + 1
    real_train = load_labelled(data, train_split, num_classes)
    real_test = load_labelled(data, test_split, num_classes)
    fake = load_labelled(synthetic, None, num_classes)
    if labelled is not None and not 1 <= labelled <= len(real_train):
        raise HistosynthError(f"--labelled {labelled}: the {train_split!r} split has {len(real_train)} labelled"
                              f" patches; choose 1..{len(real_train)}")
    n_real = labelled or len(real_train)
    generator_n = generator_labelled(synthetic)
    if generator_n is not None and generator_n != n_real and not allow_labelled_mismatch:
        raise HistosynthError(f"{synthetic}: its generator learnt from {generator_n} labelled training patches, the "
                              f"real arms would train on {n_real}; compare with --labelled {generator_n} (or pass "
                              "--allow-labelled-mismatch and say so)")
    n_synthetic = len(fake)
    if synthetic_ratio is not None:
        n_synthetic = round(synthetic_ratio * n_real)
        if not 1 <= n_synthetic <= len(fake):
            raise HistosynthError(f"--synthetic-ratio {synthetic_ratio}: {n_synthetic} synthetic pairs for {n_real} "
                                  f"real ones, but {synthetic} holds {len(fake)}")
    result = BenchmarkResult(classes=classes, settings={
        **asdict(config), "labelled": n_real, "seeds": seeds, "n_real_train_available": len(real_train),
        "n_synthetic": len(fake), "n_synthetic_used": n_synthetic, "synthetic_ratio": synthetic_ratio,
        "generator_labelled": generator_n, "labelled_mismatch": generator_n is not None and generator_n != n_real,
        "n_real_test": len(real_test), "data": str(data), "synthetic": str(synthetic)})
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in range(seeds):
        # The same real subset for (a) and (b) within a seed, so the arms differ only by the synthetic pairs.
        subset = real_train.subset(np.sort(np.random.default_rng(seed).choice(len(real_train), n_real, replace=False)))
        drawn = fake if n_synthetic == len(fake) else fake.subset(
            np.sort(np.random.default_rng([seed, 1]).choice(len(fake), n_synthetic, replace=False)))
        for arm, pools in (("real", [subset]), ("real+synthetic", [subset, drawn]), ("synthetic", [drawn])):
            if log is not None:
                log(f"{arm}, seed {seed}: training on {sum(len(p) for p in pools)} patches")
            net = train_segmenter(pools, num_classes, config, seed=seed, log=log)
            runs[arm].append({"seed": seed, **evaluate_segmenter(net, real_test, num_classes, config.size,
                                                                 config.device)})
    for arm in ARMS:
        result.arms[arm] = {"runs": runs[arm], "summary": _summarise(runs[arm], classes)}
    return result
