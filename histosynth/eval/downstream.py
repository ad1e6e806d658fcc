"""What the downstream benchmarks (segmentation, classification) share: image tensors, batches drawn from the
union of several training pools, the seeded training loop, and mean ± std over seeds."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from histosynth.dihedral import dihedral
from histosynth.errors import HistosynthError


def class_table(meta: dict) -> dict[int, str]:
    """{class id: name} from a dataset.json, without the unknown class 0."""
    try:
        return {int(c["id"]): str(c.get("name", c["id"])) for c in meta.get("classes", []) if int(c["id"]) != 0}
    except (KeyError, TypeError, ValueError) as error:
        raise HistosynthError(f"dataset.json: malformed 'classes' ({error})") from None


def image_tensor(images: np.ndarray, device: str):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1], converted on ``device``."""
    from histosynth.pixels import from_uint8  # torch loads only when a benchmark trains

    return from_uint8(images, device)


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
        return dihedral(array[self.y:self.y + self.crop, self.x:self.x + self.crop], self.turns + 4 * self.flip,
                        axes=(0, 1))


def draw_views(shapes: Sequence[tuple[int, int, int]], rng: np.random.Generator, count: int,
               crop: int) -> Iterator[tuple[int, int, View]]:
    """``count`` (pool index, item index, view) drawn uniformly from the union of pools of (N, H, W) images."""
    starts = np.cumsum([0, *(shape[0] for shape in shapes)])  # (P+1,) offsets of each pool in the union
    for flat in rng.integers(0, starts[-1], count):
        pool = int(np.searchsorted(starts, flat, side="right")) - 1
        height, width = shapes[pool][1:3]
        y, x = rng.integers(0, height - crop + 1), rng.integers(0, width - crop + 1)
        yield pool, int(flat - starts[pool]), View(int(y), int(x), crop, int(rng.integers(4)), bool(rng.integers(2)))


class Pool(Protocol):
    """A labelled training set: images (N, H, W, 3) uint8, and whatever target each image has."""

    images: np.ndarray

    def __len__(self) -> int: ...


class Budget(Protocol):
    """The training budget both benchmarks' configs carry (each config has its own network fields)."""

    steps: int
    batch_size: int
    lr: float
    device: str


PoolT = TypeVar("PoolT", bound=Pool)


def train_on_views(pools: Sequence[PoolT], crop: int, build: Callable[[], Any], config: Budget, seed: int,
                   target: Callable[[PoolT, int, View], Any], loss: Callable[[Any, Any, list], Any],
                   log: Callable[[str], None] | None = None):
    """Train ``build()`` for ``config.steps`` AdamW steps on batches drawn uniformly from the union of ``pools``
    (none empty), each sample a random ``crop`` view (draw_views); returns the network in eval mode.

    ``target(pool, item, view)`` is a sample's target (a class index, a mask view); ``loss(net, images, targets)``
    the batch loss from images (B, 3, crop, crop) in [-1, 1] on ``config.device``. The network is built after
    seeding torch so that the seed fixes its initial weights as well as the batches."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build().to(config.device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    net.train()
    for step in range(config.steps):
        images, targets = [], []
        for pool, item, view in draw_views([p.images.shape for p in pools], rng, config.batch_size, crop):
            images.append(view(pools[pool].images[item]))  # (crop, crop, 3)
            targets.append(target(pools[pool], item, view))
        value = loss(net, image_tensor(np.stack(images), config.device), targets)
        optimiser.zero_grad(set_to_none=True)
        value.backward()
        optimiser.step()
        if log is not None and (step + 1) % max(1, config.steps // 5) == 0:
            log(f"step {step + 1}/{config.steps} loss {value.item():.4f}")
    return net.eval()


def mean_std(values: Sequence[float | None]) -> list[float | None]:
    """[mean, std] of the values that are not None; [None, None] when none is."""
    present = [v for v in values if v is not None]
    return [float(np.mean(present)), float(np.std(present))] if present else [None, None]
