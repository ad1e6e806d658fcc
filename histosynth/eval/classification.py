"""Downstream classification benchmark: do variations or synthetic patches help a patch classifier?

The same timm classifier, with the same training budget (steps × batch size, learning rate, augmentation), is
trained on
  (a) ``real``: n real labelled training patches,
  (b) ``real+synthetic``: the same n patches plus the extra images — with ``variations``, only the variations of
      those n patches (Graikos et al. 2024 augment each real image with its own variations); with ``synthetic``,
      every synthetic patch,
  (c) ``synthetic``: the extra images only,
and scored by balanced accuracy and macro-F1 on the real ``test`` split (and on an external labelled folder when
given), as mean ± std over seeds and per source slide.

Targets (what a patch's label is):
  ``source``         the slide the patch was cut from (scanner/lab/organ recognition),
  ``dominant-class`` the most frequent labelled class of its mask (class 0, unknown, does not count),
  ``slide-label``    the ``label`` field of its slide in dataset.json's ``sources``.
A ``labels.csv`` (columns ``image,label``, image paths relative to the folder) overrides these for any folder, and
is how a plain folder of images (an external test set, hand-made synthetic patches) is labelled. Variations written
by ``histosynth vary`` into sub-folders (one per reference patch, each with its ``variations.json``) inherit the
label of the real patch they vary.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.data.labels import read_json
from histosynth.errors import HistosynthError
from histosynth.eval.downstream import class_table, image_tensor, mean_std, train_on_views
from histosynth.eval.features import ImageSet, is_dataset, open_images, read_dataset
from histosynth.io.tables import read_csv_rows

TARGETS = ("source", "dominant-class", "slide-label")
ARMS = ("real", "real+synthetic", "synthetic")
LABELS_CSV = "labels.csv"


@dataclass
class ClassifierConfig:
    """Network and training budget; one instance is used for every arm, and each arm records it."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    backbone: str = "resnet18"  # any timm model name; no pretrained weights unless asked
    pretrained: bool = False
    crop: int | None = None  # training crop side (random crops); default: the whole patch
    device: str = "cpu"


@dataclass
class LabelledImages:
    """Images (N, H, W, 3) uint8 with a label each, their source slide, and the file each came from or varies."""

    images: np.ndarray
    labels: list[str]
    sources: list[str]
    origins: list[str]  # file name of the image itself (real) or of the real patch it is a variation of
    where: str

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Sequence[int]) -> LabelledImages:
        index = np.asarray(index, dtype=np.int64)
        pick = lambda values: [values[i] for i in index]  # noqa: E731
        return LabelledImages(self.images[index], pick(self.labels), pick(self.sources), pick(self.origins),
                              self.where)


# ------------------------------------------------------------------------------------------------------ labels
def read_labels_csv(path: Path) -> dict[str, str]:
    """{image path relative to the CSV's folder: label} from a CSV with ``image`` and ``label`` columns."""
    rows = read_csv_rows(path, {"image", "label"}, "image,label")
    labels = {}
    for number, row in enumerate(rows, start=2):
        if not row["image"] or not row["label"]:
            raise HistosynthError(f"{path}: line {number} has an empty image or label")
        labels[row["image"]] = row["label"]
    return labels


def _stack(image_set: ImageSet) -> np.ndarray:
    return np.stack([image_set[i] for i in range(len(image_set))])  # (N, H, W, 3)


def _folder_with_csv(folder: Path, csv_path: Path) -> LabelledImages:
    labels = read_labels_csv(csv_path)
    paths = [folder / name for name in labels]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise HistosynthError(f"{csv_path}: names {missing[0].name}, which is not a file in {folder}")
    image_set = ImageSet(paths, str(folder))
    names = [p.name for p in paths]
    return LabelledImages(_stack(image_set), list(labels.values()), [folder.name] * len(paths), names, str(folder))


def _dominant_class(mask: np.ndarray, names: dict[int, str]) -> str | None:
    counts = np.bincount(mask.ravel(), minlength=max(names, default=0) + 1)
    counts[0] = 0
    if counts.sum() == 0:
        return None
    winner = int(counts.argmax())
    if winner not in names:
        raise HistosynthError(f"class id {winner} in a mask is not in dataset.json's classes")
    return names[winner]


def load_dataset_labelled(data: str | os.PathLike, split: str | None, target: str) -> LabelledImages:
    """Patches of a dataset split (every patch when ``split`` is None) with their ``target`` labels; patches
    without a label (no mask, an all-unknown mask, a slide without a label) are left out."""
    if target not in TARGETS:
        raise HistosynthError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
    root = Path(data)
    where = f"{root} (split {split!r})" if split is not None else str(root)
    meta, patches = read_dataset(root, split)
    image_set = open_images(root, split=split)  # in read_dataset's order
    if (root / LABELS_CSV).exists():
        by_file = read_labels_csv(root / LABELS_CSV)
        labels = [by_file.get(str(p.image.relative_to(root))) for p in patches]
    elif target == "source":
        if meta.get("synthetic"):
            raise HistosynthError(f"{root}: synthetic patches have no source slide; give a {LABELS_CSV} or "
                                  "another --target")
        labels = [p.source for p in patches]
    elif target == "slide-label":
        by_source = {str(s["id"]): s.get("label") for s in meta["sources"]}
        chosen = [e for e in meta["patches"] if split is None or e.get("split") == split]  # read_dataset's order
        labels = [by_source.get(str(e["source"])) for e in chosen]
        if not any(labels):
            raise HistosynthError(f"{root}: no slide has a 'label' in dataset.json's sources (needed by "
                                  f"--target slide-label); add them or give a {LABELS_CSV}")
    else:
        names = class_table(meta)
        labels = [None if image_set.masks[i] is None else _dominant_class(image_set.mask(i), names)
                  for i in range(len(image_set))]
    keep = [i for i, label in enumerate(labels) if label]
    if not keep:
        raise HistosynthError(f"{where}: no patch has a {target} label")
    images = np.stack([image_set[i] for i in keep])  # (N, H, W, 3)
    return LabelledImages(images, [labels[i] for i in keep], [patches[i].source for i in keep],
                          [patches[i].image.name for i in keep], where)


def load_variations(folder: str | os.PathLike, real: LabelledImages) -> LabelledImages:
    """Variations of real patches: ``histosynth vary`` output folders (one per reference) under ``folder``, each
    labelled like the real patch it varies; or a folder with a labels.csv."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HistosynthError(f"{folder}: not a folder")
    if (folder / LABELS_CSV).exists():
        return _folder_with_csv(folder, folder / LABELS_CSV)
    records = sorted(folder.glob("*/variations.json")) + sorted(folder.glob("variations.json"))
    if not records:
        raise HistosynthError(f"{folder}: no variations.json (from `histosynth vary`) and no {LABELS_CSV}")
    by_name = {name: (label, source) for name, label, source in zip(real.origins, real.labels, real.sources)}
    paths, labels, sources, origins = [], [], [], []
    for record_path in records:
        record = read_json(record_path)
        reference = Path(record["reference"]).name
        if reference not in by_name:
            raise HistosynthError(f"{record_path}: varies {reference}, which is not a labelled patch of the real "
                                  "training split")
        label, source = by_name[reference]
        for name in record["files"]:
            paths.append(record_path.parent / name)
            labels.append(label)
            sources.append(source)
            origins.append(reference)
    image_set = ImageSet(paths, str(folder))
    return LabelledImages(_stack(image_set), labels, sources, origins, str(folder))


def load_labelled_images(path: str | os.PathLike, target: str, split: str | None = None) -> LabelledImages:
    """A dataset folder (labels from ``target`` or its labels.csv) or a plain folder with a labels.csv."""
    path = Path(path)
    if is_dataset(path):
        return load_dataset_labelled(path, split, target)
    if not path.is_dir():
        raise HistosynthError(f"{path}: not a folder")
    if not (path / LABELS_CSV).exists():
        raise HistosynthError(f"{path}: no {LABELS_CSV} (columns image,label) to label its images")
    return _folder_with_csv(path, path / LABELS_CSV)


def check_known(extra: LabelledImages, classes: list[str]) -> None:
    unknown = sorted(set(extra.labels) - set(classes))
    if unknown:
        raise HistosynthError(f"{extra.where}: labels {', '.join(unknown)} are not among the real training "
                              f"labels ({', '.join(classes)})")


# ------------------------------------------------------------------------------------------------ classifier
def build_classifier(backbone: str, num_classes: int, pretrained: bool = False):
    """A timm classifier; pretrained weights only when asked (they download)."""
    import timm

    try:
        return timm.create_model(backbone, pretrained=pretrained, num_classes=num_classes)
    except RuntimeError as error:  # timm's "Unknown model" error
        raise HistosynthError(f"classifier backbone {backbone!r}: {error}") from None


def train_classifier(pools: Sequence[LabelledImages], classes: list[str], config: ClassifierConfig, seed: int = 0,
                     log: Callable[[str], None] | None = None):
    """Train for ``config.steps`` steps on batches drawn uniformly from the union of ``pools``; every sample is a
    random crop (when ``config.crop``) with a random flip and 90° rotation. Returns the network in eval mode."""
    import torch
    import torch.nn.functional as F

    pools = [p for p in pools if len(p)]
    if not pools:
        raise HistosynthError("classification training: no labelled images")
    side = min(min(p.images.shape[1:3]) for p in pools)
    crop = min(config.crop or side, side)
    index_of = {name: i for i, name in enumerate(classes)}

    def loss(net, images, targets: list[int]):
        logits = net(images)  # (B, K)
        return F.cross_entropy(logits, torch.tensor(targets, device=config.device))

    return train_on_views(pools, crop, lambda: build_classifier(config.backbone, len(classes), config.pretrained),
                          config, seed, lambda pool, item, view: index_of[pool.labels[item]], loss, log)


def predict(net, images: np.ndarray, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Class indices (N,) for (N, H, W, 3) uint8 images."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(net(image_tensor(images[start:start + batch_size], device)).argmax(1).cpu().numpy())
    return np.concatenate(out)


def classification_scores(truth: Sequence[int], prediction: Sequence[int], num_classes: int) -> dict[str, float]:
    """Balanced accuracy (mean recall over the classes present in ``truth``) and macro-F1 over those classes."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    present = sorted(set(int(t) for t in truth))
    return {"balanced_accuracy": float(balanced_accuracy_score(truth, prediction)),
            "macro_f1": float(f1_score(truth, prediction, labels=present, average="macro", zero_division=0)),
            "n": len(truth)}


def evaluate_classifier(net, test: LabelledImages, classes: list[str], device: str = "cpu") -> dict[str, Any]:
    """Scores on ``test``, and the same per source slide."""
    index_of = {name: i for i, name in enumerate(classes)}
    truth = np.array([index_of[label] for label in test.labels])
    prediction = predict(net, test.images, device=device)
    result = classification_scores(truth, prediction, len(classes))
    result["per_source"] = {}
    for source in sorted(set(test.sources)):
        pick = [i for i, s in enumerate(test.sources) if s == source]
        result["per_source"][source] = classification_scores(truth[pick], prediction[pick], len(classes))
    return result


@dataclass
class ClassificationResult:
    """Everything the classification benchmark measured; ``as_dict`` is what classification.json holds."""

    classes: list[str]
    settings: dict[str, Any]
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> {"config", "runs", "summary"}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _summarise(runs: list[dict[str, Any]], test_sets: list[str]) -> dict[str, Any]:
    summary = {}
    for name in test_sets:
        summary[name] = {m: mean_std([run[name][m] for run in runs]) for m in ("balanced_accuracy", "macro_f1")}
        sources = sorted({s for run in runs for s in run[name]["per_source"]})
        summary[name]["per_source"] = {
            s: mean_std([run[name]["per_source"][s]["balanced_accuracy"] for run in runs]) for s in sources}
    return summary


def classification_benchmark(data: str | os.PathLike, variations: str | os.PathLike | None = None,
                             synthetic: str | os.PathLike | None = None, labelled: int | None = None,
                             seeds: int = 3, target: str = "dominant-class", config: ClassifierConfig | None = None,
                             external: str | os.PathLike | None = None, train_split: str = "train",
                             test_split: str = "test", log: Callable[[str], None] | None = None
                             ) -> ClassificationResult:
    """Train the same classifier on real / real + extra / extra images and score each on real test images."""
    config = config or ClassifierConfig()
    if seeds < 1:
        raise HistosynthError(f"--seeds must be at least 1, got {seeds}")
    if (variations is None) == (synthetic is None):
        raise HistosynthError("give either --variations or --synthetic (the images added to the real ones)")
    real_train = load_dataset_labelled(data, train_split, target)
    real_test = load_dataset_labelled(data, test_split, target)
    classes = sorted(set(real_train.labels))
    if len(classes) < 2:
        raise HistosynthError(f"{real_train.where}: one {target} label only ({classes[0]}); nothing to classify")
    extra = load_variations(variations, real_train) if variations is not None \
        else load_labelled_images(synthetic, target)
    tests = {"real_test": real_test}
    if external is not None:
        tests["external"] = load_labelled_images(external, target)
    for labelled_set in (extra, real_test, *tests.values()):
        check_known(labelled_set, classes)
    if labelled is not None and not 1 <= labelled <= len(real_train):
        raise HistosynthError(f"--labelled {labelled}: the {train_split!r} split has {len(real_train)} labelled "
                              f"patches; choose 1..{len(real_train)}")
    n_real = labelled or len(real_train)
    result = ClassificationResult(classes=classes, settings={
        **asdict(config), "target": target, "labelled": n_real, "seeds": seeds,
        "extra": "variations" if variations is not None else "synthetic", "n_extra": len(extra),
        "n_real_train_available": len(real_train), "n_real_test": len(real_test),
        "n_external": len(tests["external"]) if external is not None else None, "data": str(data),
        "extra_path": str(variations if variations is not None else synthetic),
        "class_counts_real_train": dict(Counter(real_train.labels))})
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in range(seeds):
        # The same real subset for (a) and (b) within a seed, so the arms differ only by the extra images.
        subset = real_train.subset(np.sort(np.random.default_rng(seed).choice(len(real_train), n_real, replace=False)))
        added = extra
        if variations is not None and labelled is not None:
            chosen = set(subset.origins)
            added = extra.subset([i for i, origin in enumerate(extra.origins) if origin in chosen])
        for arm, pools in (("real", [subset]), ("real+synthetic", [subset, added]), ("synthetic", [extra])):
            if log is not None:
                log(f"{arm}, seed {seed}: training on {sum(len(p) for p in pools)} images")
            net = train_classifier(pools, classes, config, seed=seed, log=log)
            runs[arm].append({"seed": seed, "n_train": sum(len(p) for p in pools),
                              **{name: evaluate_classifier(net, test, classes, config.device)
                                 for name, test in tests.items()}})
    for arm in ARMS:
        result.arms[arm] = {"config": asdict(config), "runs": runs[arm], "summary": _summarise(runs[arm], list(tests))}
    return result
