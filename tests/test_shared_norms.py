"""Shared group-norm statistics: a partition of the canvas normalised as the whole canvas is."""
import pytest
import torch

from histosynth.errors import HistosynthError
from histosynth.sampling.canvas import CanvasDenoiser, RandomOffsetGrid
from histosynth.sampling.shared_norms import SharedGroupNorms

torch.set_num_threads(1)


class PointwiseNormNet(torch.nn.Module):
    """1×1 convolutions around a group norm: no spatial reach, so only the norm's statistics couple pixels."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inner = torch.nn.Conv2d(4, 8, 1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.outer = torch.nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x, t, conditions):
        return self.outer(torch.nn.functional.silu(self.norm(self.inner(x))))


def canvas_output(net, latents, shared, micro_batch=3):
    canvas = CanvasDenoiser(net, RandomOffsetGrid(4, seed=1), (8, 8), micro_batch=micro_batch, shared_norms=shared)
    canvas.begin_step(2, torch.tensor(100))
    with torch.no_grad():
        return canvas(latents, torch.tensor(100)), canvas


def test_with_every_window_sampled_a_partition_normalises_as_the_whole_canvas():
    net = PointwiseNormNet()
    latents = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(1)) * 2 + 1
    latents[..., :6, :] += 3  # halves unlike each other: per-window statistics differ
    with torch.no_grad():
        whole = net(latents, None, {})
    shared, canvas = canvas_output(net, latents, SharedGroupNorms(net, windows=9))
    assert torch.allclose(shared, whole, atol=1e-5)
    assert canvas.stats.unet_evals == 9 + 9  # the sample is evaluated once more to measure
    alone, _ = canvas_output(net, latents, None)
    assert not torch.allclose(alone, whole, atol=1e-2)
    assert "forward" not in vars(net.norm)  # the plain group norm is back


def test_applied_statistics_do_not_depend_on_the_micro_batch():
    net = PointwiseNormNet()
    latents = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(2))
    one, _ = canvas_output(net, latents, SharedGroupNorms(net, windows=4), micro_batch=1)
    nine, _ = canvas_output(net, latents, SharedGroupNorms(net, windows=4), micro_batch=9)
    assert torch.allclose(one, nine, atol=1e-6)


def test_each_guidance_pass_pools_its_own_statistics():
    norm = torch.nn.GroupNorm(2, 4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        norm.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    shared = SharedGroupNorms(norm, windows=2)
    x = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    x[2:] = x[2:] * 5 - 2  # the second pass unlike the first
    with shared.measuring(passes=2):
        out = norm(x)
    for half in (slice(0, 2), slice(2, 4)):  # pooling two items = normalising them side by side as one
        side_by_side = torch.nn.functional.group_norm(torch.cat(list(x[half]), dim=-1)[None], 2, norm.weight,
                                                      norm.bias, norm.eps)[0]
        assert torch.allclose(torch.cat(list(out[half]), dim=-1), side_by_side, atol=1e-5)
    with shared.applying():
        again = torch.cat([norm(x[[0, 2]]), norm(x[[1, 3]])])[[0, 2, 1, 3]]  # item by item, passes interleaved
    assert torch.allclose(again, out, atol=1e-5)
    with shared.applying(), pytest.raises(RuntimeError, match="a batch of 3 is not 2 guidance passes"):
        norm(x[:3])


def test_one_window_alone_is_the_plain_group_norm():
    net = PointwiseNormNet()
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    shared = SharedGroupNorms(net, windows=1)
    with torch.no_grad(), shared.measuring():
        pooled = net(x, None, {})
    with torch.no_grad():
        assert torch.allclose(pooled, net(x, None, {}), atol=1e-6)


def test_the_sample_is_fixed_by_the_step_and_spreads_over_the_windows():
    shared = SharedGroupNorms(PointwiseNormNet(), windows=4)
    windows = [(y, x) for y in range(0, 40, 4) for x in range(0, 40, 4)]
    assert shared.sample(windows, 3) == shared.sample(windows, 3)
    assert shared.sample(windows, 3) != shared.sample(windows, 4)
    assert len(set(shared.sample(windows, 3))) == 4
    assert shared.sample(windows[:3], 0) == windows[:3]


def test_misuse_is_refused():
    with pytest.raises(HistosynthError, match="Conv2d has no group norm"):
        SharedGroupNorms(torch.nn.Conv2d(1, 1, 1), windows=4)
    with pytest.raises(HistosynthError, match="at least 1 window, got 0"):
        SharedGroupNorms(PointwiseNormNet(), windows=0)
    net = PointwiseNormNet()
    with pytest.raises(RuntimeError, match="measure a step's statistics before applying"):
        with SharedGroupNorms(net, windows=2).applying():
            pass
