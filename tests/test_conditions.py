"""The Condition protocol (crop, null) and the one way conditions are built for every command (build_conditions)."""
import numpy as np
import pytest
import torch

from histosynth.conditions.base import Condition, SpatialCondition, VectorCondition, as_condition, mirror
from histosynth.conditions.embedding import EmbeddingGrid
from histosynth.errors import HistosynthError
from histosynth.models.bundle import load_bundle
from histosynth.pipelines.conditions import build_conditions, patch_tensors
from histosynth.pipelines.masks import BandedMask
from tiny_models import tiny_image_model

torch.set_num_threads(1)


def test_mirror_folds_indices_into_the_canvas_at_both_edges():
    assert mirror(torch.arange(-3, 9), 3).tolist() == [2, 1, 0, 0, 1, 2, 2, 1, 0, 0, 1, 2]


def test_spatial_condition_crops_mirrored_and_holds_one_hot_compactly():
    value = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4) / 16  # exact in float16
    condition = SpatialCondition(value)
    assert condition.value.dtype == torch.float16 and condition.canvas == (3, 4)
    crop = condition.crop(torch.tensor([2, 3]), torch.tensor([3, 4, 5]))  # past the bottom and right edges
    assert crop.dtype == torch.float32
    assert torch.equal(crop, value[:, :, [2, 2]][:, :, :, [3, 3, 2]])
    assert torch.equal(condition.null().crop(torch.arange(3), torch.arange(4)), torch.zeros_like(value))
    thirds = SpatialCondition(torch.full((1, 1, 2, 2), 1 / 3))  # float16 would round it: kept in float32
    assert thirds.value.dtype == torch.float32


def test_vector_condition_is_the_same_for_every_patch_and_nulls_to_zeros():
    vector = torch.tensor([[1.0, -2.0, 3.0]])
    condition = VectorCondition(vector)
    assert condition.canvas is None
    assert torch.equal(condition.crop(torch.arange(5), torch.arange(7)), vector)
    assert torch.equal(condition.null().crop(torch.arange(1), torch.arange(1)), torch.zeros(1, 3))


def test_as_condition_reads_plain_tensors_and_refuses_others():
    assert isinstance(as_condition(torch.zeros(1, 2, 4, 4)), SpatialCondition)
    assert isinstance(as_condition(torch.zeros(1, 5)), VectorCondition)
    grid = EmbeddingGrid(torch.ones(2, 2, 3), (8, 8))
    assert as_condition(grid) is grid and isinstance(grid, Condition)
    assert torch.equal(grid.null().crop(torch.arange(8), torch.arange(8)), torch.zeros(1, 3))
    with pytest.raises(TypeError, match="not a condition"):
        as_condition(torch.zeros(3))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_bundle(tiny_image_model(tmp_path_factory.mktemp("conditions") / "model"))


def test_no_mask_gives_the_null_mask_unguided(model):
    conditions, scales = build_conditions(model, (4, 4), guidance=3.0)
    assert list(conditions) == ["mask"] and scales == {}  # ∅ guided against ∅ would only spend a UNet pass
    assert torch.equal(conditions["mask"].crop(torch.arange(4), torch.arange(4)), torch.zeros(1, 2, 4, 4))


def test_a_mask_is_encoded_at_latent_resolution_and_guided(model):
    ids = np.zeros((16, 16), np.uint8)
    ids[:8] = 1
    ids[8:, :2] = 2  # half a latent pixel of class 2 in each of the bottom rows' first latent column
    conditions, scales = build_conditions(model, (4, 4), mask=ids, guidance=3.0)
    assert scales == {"mask": 3.0}
    mask = conditions["mask"].crop(torch.arange(4), torch.arange(4))  # (1, 2, 4, 4): classes a, b
    assert torch.equal(mask[0, 0, :2], torch.ones(2, 4)) and torch.equal(mask[0, 0, 2:], torch.zeros(2, 4))
    assert mask[0, 1, 2:, 0].tolist() == [0.5, 0.5] and float(mask[0, 1].sum()) == 1.0
    batch = torch.from_numpy(np.stack([ids, np.zeros_like(ids)]))  # (2, H, W): one condition per item
    both = patch_tensors(build_conditions(model, (4, 4), mask=batch)[0], 2)["mask"]
    assert torch.equal(both[0], mask[0]) and torch.equal(both[1], torch.zeros(2, 4, 4))


def test_a_banded_mask_is_encoded_band_by_band_never_made_whole(model):
    class Banded(BandedMask):
        def __array__(self, dtype=None, copy=None):
            raise AssertionError("the whole mask was made")

    ids = np.random.default_rng(0).integers(0, 3, (64, 48), dtype=np.uint8)
    banded = Banded((ids[y:y + 16] for y in range(0, 64, 16)), 48)
    from_bands = build_conditions(model, (16, 12), mask=banded)[0]["mask"]
    from_array = build_conditions(model, (16, 12), mask=ids)[0]["mask"]
    rows, cols = torch.arange(16), torch.arange(12)
    assert torch.equal(from_bands.crop(rows, cols), from_array.crop(rows, cols))


def test_patch_tensors_repeat_one_condition_for_every_patch(model):
    conditions, _ = build_conditions(model, (4, 4))
    assert patch_tensors(conditions, 3)["mask"].shape == (3, 2, 4, 4)


def test_a_condition_the_model_does_not_take_is_refused(model):
    with pytest.raises(HistosynthError, match="takes no 'style' condition"):
        build_conditions(model, (4, 4), style=torch.zeros(1, 8))
    with pytest.raises(HistosynthError, match="takes no 'embedding' condition"):
        build_conditions(model, (4, 4), embedding=torch.zeros(1, 8))
