"""What the downstream benchmarks (segmentation, classification) share: image tensors, batches drawn from the
union of several training pools, and mean ± std over seeds."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from histosynth.errors import HistosynthError


def class_table(meta: dict) -> dict[int, str]:
    """{class id: name} from a dataset.json, without the unknown class 0."""
    try:
        return {int(c["id"]): str(c.get("name", c["id"])) for c in meta.get("classes", []) if int(c["id"]) != 0}
    except (KeyError, TypeError, ValueError) as error:
        raise HistosynthError(f"dataset.json: malformed 'classes' ({error})") from None


def image_tensor(images: np.ndarray, device: str):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    return x / 127.5 - 1.0


@dataclass(frozen=True)
class View:
    """A random training view of a patch: a crop, then 90° turns and a flip (histology has no orientation)."""

    y: int
    x: int
    crop: int
    turns: int
    flip: bool

    def __call__(self, array: np.ndarray) -> np.ndarray:
        """The view of an (H, W, ...) array: image and mask get the same one."""
        view = np.rot90(array[self.y:self.y + self.crop, self.x:self.x + self.crop], self.turns)
        return view[:, ::-1] if self.flip else view


def draw_views(shapes: Sequence[tuple[int, int, int]], rng: np.random.Generator, count: int,
               crop: int) -> Iterator[tuple[int, int, View]]:
    """``count`` (pool index, item index, view) drawn uniformly from the union of pools of (N, H, W) images."""
    starts = np.cumsum([0, *(shape[0] for shape in shapes)])  # (P+1,) offsets of each pool in the union
    for flat in rng.integers(0, starts[-1], count):
        pool = int(np.searchsorted(starts, flat, side="right")) - 1
        height, width = shapes[pool][1:3]
        y, x = rng.integers(0, height - crop + 1), rng.integers(0, width - crop + 1)
        yield pool, int(flat - starts[pool]), View(int(y), int(x), crop, int(rng.integers(4)), bool(rng.integers(2)))


def mean_std(values: Sequence[float | None]) -> list[float | None]:
    """[mean, std] of the values that are not None; [None, None] when none is."""
    present = [v for v in values if v is not None]
    return [float(np.mean(present)), float(np.std(present))] if present else [None, None]
