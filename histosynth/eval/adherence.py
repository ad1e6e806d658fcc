"""Mask adherence: do generated images show the tissue classes of the masks they were generated from?

A segmentation network trained on real labelled patches (the downstream benchmark's trainer) segments the
generated images; its mIoU against the conditioning masks is reported beside its mIoU on real test patches,
which bounds what the network can read (design.md §7). A generator that follows its masks scores close to the
real reference.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from histosynth.errors import HistosynthError
from histosynth.eval.downstream import class_table
from histosynth.eval.features import read_dataset
from histosynth.eval.segmentation import (
    LabelledSet,
    TrainConfig,
    evaluate_segmenter,
    load_labelled,
    train_segmenter,
)


def mask_adherence(net, generated: LabelledSet, real_test: LabelledSet, num_classes: int, size: str,
                   device: str = "cpu") -> dict[str, Any]:
    """mIoU of ``net`` on generated images vs their conditioning masks, beside its mIoU on real test patches."""
    on_generated = evaluate_segmenter(net, generated, num_classes, size, device)
    on_real = evaluate_segmenter(net, real_test, num_classes, size, device)
    return {"miou_generated": on_generated["miou"], "miou_real": on_real["miou"],
            "iou_generated": on_generated["iou"], "iou_real": on_real["iou"]}


def adherence_from_datasets(real: str | os.PathLike, generated: str | os.PathLike, config: TrainConfig | None = None,
                            seed: int = 0, train_split: str = "train", test_split: str = "test",
                            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train a U-Net on the real dataset's labelled ``train`` split, then score mask adherence of ``generated``.

    ``generated`` is a dataset folder (design.md §5) whose masks are the masks the images were generated from.
    """
    config = config or TrainConfig()
    meta, _ = read_dataset(real)
    classes = class_table(meta)
    if not classes:
        raise HistosynthError(f"{real}: dataset.json lists no classes besides 0 (unknown)")
    num_classes = max(classes) + 1
    real_train = load_labelled(real, train_split, num_classes)
    real_test = load_labelled(real, test_split, num_classes)
    fake = load_labelled(generated, None, num_classes)
    net = train_segmenter([real_train], num_classes, config, seed=seed, log=log)
    return {**mask_adherence(net, fake, real_test, num_classes, config.size, config.device), "classes": classes}
