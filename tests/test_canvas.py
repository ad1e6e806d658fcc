"""Canvas samplers: partitions, equivalence with the patch sampler, determinism, cost counts."""
import math
import threading

import numpy as np

import pytest
import torch

from histosynth.sampling.canvas import (
    CanvasDenoiser,
    FixedTiles,
    MultiDiffusion,
    OFFSET_STEPS,
    RandomOffsetGrid,
    X0Space,
    canvas_noise,
    cell_lowpass,
    chunk_assignment,
    cost_per_pass,
    cut_lines,
    line_weights,
    offset_steps,
)
from histosynth.sampling.spill import Spill, SpilledCanvas, in_memory
from histosynth.conditions.base import mirror
from histosynth.errors import HistosynthError
from histosynth.models.denoiser import make_sampling_scheduler, make_train_scheduler
from histosynth.sampling.patch import run_scheduler, sample_patch, scheduler_step, slabs

torch.set_num_threads(1)


class TinyConvDenoiser(torch.nn.Module):
    """A deterministic stand-in for a UNet: convolution with a mask channel and a timestep-dependent scale."""

    def __init__(self, channels=4, mask_channels=0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(channels + mask_channels, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        self.mask_channels = mask_channels

    def forward(self, x, t, conditions):
        if self.mask_channels:
            x = torch.cat([x, conditions["mask"]], dim=1)
        return self.conv(x) * (1 + t.float() / 1000)


def scheduler(name="dpm++"):
    return make_sampling_scheduler(name, make_train_scheduler().config)


def run_canvas(layout, shape, seed=0, batch=4, steps=4, name="dpm++", denoiser=None, conditions=None):
    denoiser = denoiser or TinyConvDenoiser()
    canvas = CanvasDenoiser(denoiser, layout, shape, conditions, micro_batch=batch)
    sched = scheduler(name)
    sched.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    noise = canvas_noise(layout, 4, shape, generator)
    out = run_scheduler(canvas, noise, sched, generator=generator)
    return out[:, :, :shape[0], :shape[1]], canvas


@pytest.mark.parametrize("name", ["dpm++sde", "dpm++", "ddim", "ddpm", "euler"])
def test_one_patch_canvas_reproduces_patch_sampler_bit_for_bit(name):
    denoiser = TinyConvDenoiser()
    reference = sample_patch(denoiser, scheduler(name), (1, 4, 8, 8), steps=5, seed=3)
    for layout in (RandomOffsetGrid(8, seed=5), FixedTiles(8), MultiDiffusion(8, 4)):
        canvas, _ = run_canvas(layout, (8, 8), seed=3, steps=5, name=name, denoiser=denoiser)
        assert torch.equal(canvas, reference), layout.name


@pytest.mark.parametrize("shape,patch", [((8, 8), 4), ((10, 7), 4), ((4, 12), 4), ((5, 5), 3), ((3, 9), 4)])
def test_random_grid_partitions_every_pixel_exactly_once(shape, patch):
    layout = RandomOffsetGrid(patch, seed=1)
    working = layout.working_shape(*shape)
    for step in range(6):
        cover = torch.zeros(working, dtype=torch.int64)
        for y, x in layout.windows(step, working, shape):
            rows = (y + torch.arange(patch)) % working[0]
            cols = (x + torch.arange(patch)) % working[1]
            cover[rows[:, None], cols[None, :]] += 1
        assert torch.equal(cover, torch.ones_like(cover))


def test_working_canvas_sides_hand_checked():
    assert RandomOffsetGrid(4).working_shape(4, 4) == (4, 4)          # one patch: no margin
    assert RandomOffsetGrid(4).working_shape(8, 4) == (12, 4)         # 8+3=11 -> 12
    assert RandomOffsetGrid(4).working_shape(9, 13) == (12, 16)       # 12 -> 12, 16 -> 16
    assert FixedTiles(4).working_shape(9, 8) == (12, 8)
    assert MultiDiffusion(4, 2).working_shape(9, 4) == (10, 4)


def test_offsets_move_between_steps_and_stay_zero_without_margin():
    layout = RandomOffsetGrid(8, seed=0)
    offsets = {layout.offset(i, (24, 24), (16, 16)) for i in range(20)}
    assert len(offsets) > 10
    assert all(0 <= oy < 8 and 0 <= ox < 8 for oy, ox in offsets)
    assert {layout.offset(i, (8, 24), (8, 16))[0] for i in range(20)} == {0}


class _Recording:
    """Keeps every batch the wrapped denoiser returns, in call order (one call per micro-batch)."""

    def __init__(self, denoiser):
        self.denoiser, self.outputs = denoiser, []

    def __call__(self, x, t, conditions):
        out = self.denoiser(x, t, conditions)
        self.outputs.append(out.clone())
        return out


@pytest.mark.parametrize("world,batch", [(2, 3), (3, 5)])
def test_same_result_however_patches_are_split_across_processes(world, batch):
    """Fake ranks run concurrently in threads, as torchrun's processes would, each through ``run_scheduler`` with its
    own canvas, scheduler and generator; ``gather`` is an all-gather over a barrier. Each rank must evaluate exactly
    its ``chunk_assignment`` share, so a wrong share puts wrong or duplicated chunks into the merged canvas."""
    shape, layout, steps = (12, 12), RandomOffsetGrid(4, seed=2), 4
    reference = _Recording(TinyConvDenoiser())
    single, _ = run_canvas(layout, shape, batch=batch, steps=steps, name="dpm++sde", denoiser=reference)
    n_chunks = len(reference.outputs) // steps  # the world=1 canvas evaluates every chunk once per step, in order
    assert n_chunks * steps == len(reference.outputs) and n_chunks >= world

    barrier = threading.Barrier(world, timeout=60)  # a rank that fails breaks the barrier instead of hanging the rest
    posted, received = {}, {r: [] for r in range(world)}

    def make_gather(rank):
        calls = [0]

        def gather(local, n):
            key = calls[0]
            calls[0] += 1
            posted[key, rank] = local
            barrier.wait()
            every = torch.cat([posted[key, r] for r in range(world)])  # rank order = chunk order (contiguous shares)
            received[rank].append((local, n))
            barrier.wait()  # nobody posts the next step's share before every rank has read this one
            return every

        return gather

    denoisers = [_Recording(TinyConvDenoiser()) for _ in range(world)]
    results, errors = [None] * world, []

    def rank_main(rank):
        try:
            canvas = CanvasDenoiser(denoisers[rank], layout, shape, micro_batch=batch, rank=rank, world=world,
                                    gather=make_gather(rank))
            sched = scheduler("dpm++sde")
            sched.set_timesteps(steps)
            generator = torch.Generator().manual_seed(0)  # every rank draws the same noise, as in generate_slide
            noise = canvas_noise(layout, 4, shape, generator)
            results[rank] = run_scheduler(canvas, noise, sched, generator=generator)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]

    shares = [chunk_assignment(n_chunks, r, world) for r in range(world)]
    for rank, share in enumerate(shares):
        assert [n for _, n in received[rank]] == [n_chunks] * steps
        assert all(local.shape[0] == len(share) for local, _ in received[rank])
        # Each rank ran only its own chunks, and they are the very outputs the single process computed for them.
        assert len(denoisers[rank].outputs) == len(share) * steps
        for step in range(steps):
            mine = denoisers[rank].outputs[step * len(share):(step + 1) * len(share)]
            expected = reference.outputs[step * n_chunks:(step + 1) * n_chunks]
            for got, index in zip(mine, share):
                assert torch.equal(got, expected[index]), (rank, step, index)
    # The shares are different data: gathering one rank's share world times could not rebuild the canvas.
    firsts = [received[r][0][0] for r in range(world)]
    assert all(not torch.equal(firsts[0][:1], other[:1]) for other in firsts[1:])
    for rank in range(world):
        assert torch.equal(results[rank][:, :, :shape[0], :shape[1]], single), rank


def test_micro_batch_sizes_agree_to_1e5():
    shape, layout = (20, 20), RandomOffsetGrid(4, seed=4)
    a, _ = run_canvas(layout, shape, batch=1)
    b, _ = run_canvas(layout, shape, batch=7)
    assert torch.allclose(a, b, atol=1e-5)
    c, _ = run_canvas(layout, shape, batch=7)
    assert torch.equal(b, c)


def test_evaluation_count_equals_working_area_over_output_area_times_steps_and_passes():
    class TwoPass(TinyConvDenoiser):
        passes = 2

    for shape, patch in [((16, 16), 4), ((12, 20), 4), ((8, 8), 8)]:
        layout = RandomOffsetGrid(patch)
        _, canvas = run_canvas(layout, shape, steps=3, denoiser=TwoPass())
        working = layout.working_shape(*shape)
        expected = working[0] * working[1] / patch ** 2 * 3 * 2
        assert canvas.stats.unet_evals == expected
        assert cost_per_pass(layout, shape) == pytest.approx(working[0] * working[1] / (shape[0] * shape[1]))


def test_cost_per_pass_at_16_patches_is_at_most_113():
    assert cost_per_pass(RandomOffsetGrid(32), (512, 512)) <= 1.13
    assert cost_per_pass(FixedTiles(32), (512, 512)) == 1.0
    assert cost_per_pass(MultiDiffusion(32, 16), (512, 512)) == pytest.approx(31 * 31 * 32 * 32 / (512 * 512))  # ≈ 3.75, → 4 as canvases grow


def test_spatial_conditions_are_reflect_padded_and_cropped():
    assert mirror(torch.arange(7), 3).tolist() == [0, 1, 2, 2, 1, 0, 0]
    mask = torch.zeros(1, 2, 8, 8)
    mask[:, 0, :, :4] = 1
    mask[:, 1, :, 4:] = 1
    _, canvas = run_canvas(RandomOffsetGrid(4), (8, 8), denoiser=TinyConvDenoiser(mask_channels=2),
                           conditions={"mask": mask})
    assert canvas.working_shape == (12, 12)
    inside, margin = canvas._crop_conditions([(4, 0), (8, 0)], "cpu")["mask"]  # (K, 4, 4) each
    assert inside.dtype == torch.float32
    assert torch.equal(inside, mask[0, :, 4:8, :4])
    assert torch.equal(margin, mask[0, :, [7, 6, 5, 4], :4])  # mirrored, never null
    # A condition that float16 holds exactly is stored compactly; one it would round stays float32.
    assert canvas.conditions["mask"].value.dtype == torch.float16
    fine = torch.full((1, 2, 8, 8), 1 / 3)
    _, exact = run_canvas(RandomOffsetGrid(4), (8, 8), denoiser=TinyConvDenoiser(mask_channels=2),
                          conditions={"mask": fine})
    assert exact.conditions["mask"].value.dtype == torch.float32
    assert torch.equal(exact._crop_conditions([(0, 0)], "cpu")["mask"][0], fine[0, :, :4, :4])


def test_blended_steps_evaluate_a_half_shifted_second_grid_with_tent_weights():
    layout = RandomOffsetGrid(4, seed=0, blend_from=2)
    working = layout.working_shape(8, 8)
    assert len(layout.windows(1, working, (8, 8))) == 9 and len(layout.windows(2, working, (8, 8))) == 18
    (ay, ax), (by, bx) = layout.windows(2, working, (8, 8))[0], layout.windows(2, working, (8, 8))[9]
    assert (by - ay, bx - ax) == (2, 2)
    assert layout.windows(2, (4, 4), (4, 4)) == [(0, 0)]  # one patch: nothing to blend
    # A constant denoiser output stays exactly that constant through the weighted merge.
    constant = lambda x, t, c: torch.full_like(x, 0.25)  # noqa: E731
    canvas = CanvasDenoiser(constant, layout, (8, 8), micro_batch=4)
    canvas.begin_step(3, torch.tensor(10))
    assert torch.allclose(canvas(torch.zeros(1, 4, *working), torch.tensor(10)), torch.full((1, 4, *working), 0.25))
    assert canvas.stats.unet_evals == 18


def test_with_context_the_patches_denoise_as_one_periodic_convolution_of_the_canvas():
    """A 3×3 convolution reaches one pixel past a patch: with that much context, denoising patch by patch equals
    the convolution over the whole (periodic) working canvas, so the cut lines leave nothing; without, they do."""
    denoiser, t = TinyConvDenoiser(), torch.tensor(500)
    latents = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    periodic = torch.nn.functional.pad(latents, (1, 1, 1, 1), mode="circular")
    whole = torch.nn.functional.conv2d(periodic, denoiser.conv.weight, denoiser.conv.bias) * 1.5
    for context, seamless in ((1, True), (2, True), (0, False)):
        canvas = CanvasDenoiser(denoiser, RandomOffsetGrid(4, seed=2), (8, 8), micro_batch=3, context=context)
        canvas.begin_step(3, t)
        with torch.no_grad():
            out = canvas(latents, t)
        assert out.shape == whole.shape
        assert torch.allclose(out, whole, atol=1e-6) == seamless, context
        assert canvas.stats.unet_evals == 9  # context widens each evaluation; it adds none
    with pytest.raises(HistosynthError, match="context must be at least 0 latent px, got -1"):
        CanvasDenoiser(denoiser, RandomOffsetGrid(4), (8, 8), context=-1)


def test_early_steps_take_their_own_context_and_later_steps_the_context():
    windows = []

    def recording(x, t, conditions):
        windows.append(x.shape[-1])
        return x

    canvas = CanvasDenoiser(recording, RandomOffsetGrid(4, seed=1), (8, 8), micro_batch=9, context=1,
                            early_context=3, early_steps=2)
    latents = torch.zeros(1, 4, 12, 12)
    for step in range(4):
        canvas.begin_step(step, torch.tensor(10))
        assert canvas(latents, torch.tensor(10)).shape == latents.shape
    assert windows == [4 + 2 * 3, 4 + 2 * 3, 4 + 2 * 1, 4 + 2 * 1]  # one micro-batch of nine patches a step
    assert [canvas.context_at(step) for step in range(4)] == [3, 3, 1, 1]
    assert CanvasDenoiser(recording, RandomOffsetGrid(4), (8, 8), context=2, early_steps=5).context_at(0) == 2
    with pytest.raises(HistosynthError, match="early context must be at least 0 latent px, got -2"):
        CanvasDenoiser(recording, RandomOffsetGrid(4), (8, 8), early_context=-2)
    with pytest.raises(HistosynthError, match="early steps must be at least 0, got -1"):
        CanvasDenoiser(recording, RandomOffsetGrid(4), (8, 8), early_steps=-1)


def test_context_widens_spatial_conditions_but_not_vectors():
    mask = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    style = torch.ones(1, 3)
    canvas = CanvasDenoiser(TinyConvDenoiser(), RandomOffsetGrid(4), (8, 8), {"mask": mask, "style": style},
                            context=2)
    cropped = canvas._crop_conditions([(4, 0)], "cpu", context=2)
    rows, cols = mirror(torch.arange(2, 10), 8), mirror(torch.arange(-2, 6) % 12, 8)
    assert torch.equal(cropped["mask"][0], mask[0][:, rows[:, None], cols[None, :]])  # (K, P + 4, P + 4)
    assert cols.tolist() == [5, 4, 0, 1, 2, 3, 4, 5]  # the working canvas wraps: its columns 10, 11 lie in the margin
    assert torch.equal(cropped["style"], style)  # one vector per patch, whatever the context


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_x0_space_recovers_the_clean_latent_and_round_trips(prediction):
    space = X0Space.of(scheduler())
    t = torch.tensor(601)
    a, s = math.sqrt(space.alphas_cumprod[601]), math.sqrt(1 - space.alphas_cumprod[601])
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 6, 6, generator=g), torch.randn(1, 4, 6, 6, generator=g)
    x = a * x0 + s * eps
    output = eps if prediction == "epsilon" else a * eps - s * x0
    space.prediction_type = prediction
    assert torch.allclose(space.to_x0(output, x, t), x0, atol=1e-5)
    assert torch.allclose(space.from_x0(x0, x, t), output, atol=1e-5)


def test_line_weights_hand_checked():
    weights = line_weights((8, 4), (1, None), patch=4, band=1)
    assert weights.shape == (1, 1, 8, 4)
    assert weights[0, 0, :, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]  # lines between rows 0|1 and 4|5
    assert torch.equal(weights[0, 0, :, 0:1].expand(8, 4), weights[0, 0])  # no lines along x
    assert line_weights((8, 8), (0, 0), 8, 2)[0, 0, 3, :].tolist() == [0, 0.5, 1, 1, 1, 1, 0.5, 0]


def test_healed_steps_cut_more_than_a_quarter_patch_from_the_previous_step():
    working, output = (48, 48), (40, 40)
    starts = set()
    for seed in range(20):
        layout = RandomOffsetGrid(8, seed=seed, heal_from=3)
        offsets = [layout.offset(i, working, output) for i in range(6)]
        for before, after in zip(offsets[2:], offsets[3:]):  # steps 3, 4, 5 heal
            shift = ((after[0] - before[0]) % 8, (after[1] - before[1]) % 8)
            assert all(3 <= v <= 5 for v in shift), (seed, offsets)  # circular distance ≥ P/4 + 1 = 3 on both axes
        assert offsets[:3] == [RandomOffsetGrid(8, seed=seed).offset(i, working, output) for i in range(3)]
        starts.add(offsets[0])
    assert len(starts) >= 10  # the sequence starts somewhere new with each seed: not one fixed grid


def test_offsets_of_the_steps_spread_evenly_so_their_traces_cancel():
    """Each step's cut lines leave a trace with the patch's period at that step's offset; the sum of those traces
    at the fundamental is |Σ exp(2πi·offset/P)|. Independent uniform offsets make it about √steps on average (4.0
    for 20 steps); the golden-ratio and √2 sequences keep it near 1 for every seed and every run of steps."""
    patch, working, output = 32, (320, 320), (300, 300)
    for seed in range(10):
        offsets = np.array([RandomOffsetGrid(patch, seed=seed).offset(i, working, output) for i in range(20)])
        for first in (0, 10, 14):  # all steps, the second half, the last six
            phases = np.exp(2j * np.pi * offsets[first:] / patch)  # (steps, 2)
            assert (np.abs(phases.sum(0)) < 1.6).all(), (seed, first, offsets)
    draws = np.random.default_rng(0).integers(0, patch, (1000, 20))
    assert np.abs(np.exp(2j * np.pi * draws / patch).sum(1)).mean() > 3.5  # what independent draws would give


def lattice_and_patch_sums(patch: int, lattice: int, layout_lattice: int, seed: int) -> tuple[float, float]:
    """The largest |Σ exp(2πi·h·offset/P)| over both axes and the runs of steps (all, second half, last six) of 20:
    at the lattice's fundamental (h = P/lattice), and at the patch's harmonics 1 to 4."""
    working, output = (patch * 10, patch * 10), (patch * 10 - 8, patch * 10 - 8)
    layout = RandomOffsetGrid(patch, seed=seed, lattice=layout_lattice)
    offsets = np.array([layout.offset(i, working, output) for i in range(20)])
    def worst(harmonics):
        return max(np.abs(np.exp(2j * np.pi * h * offsets[first:] / patch).sum(0)).max()
                   for h in harmonics for first in (0, 10, 14))
    return worst([patch // lattice]), worst([1, 2, 3, 4])


def test_offsets_spread_modulo_the_unets_lattice_too():
    """A UNet with three stride-2 down-samplings imprints an 8-px grid from each window's corner. With the plain
    golden step a 64-px patch's offsets barely move modulo 8 (8 · 0.618 = 4.944), so those traces add up; the
    lattice-aware steps keep them near 1 at the lattice's fundamental and the patch's first four harmonics."""
    for patch in (32, 64):
        for seed in range(10):
            lattice_sum, patch_sum = lattice_and_patch_sums(patch, 8, 8, seed)
            assert lattice_sum < 1.6 and patch_sum < 1.8, (patch, seed, lattice_sum, patch_sum)
    plain = max(lattice_and_patch_sums(64, 8, 1, seed)[0] for seed in range(10))
    assert plain > 4.0  # the plain steps at the lattice: what an independent draw per step would give (√20 ≈ 4.5)


def test_lattice_steps_are_the_plain_ones_without_a_lattice_inside_the_patch():
    assert offset_steps(32, 1) == OFFSET_STEPS and offset_steps(4, 8) == OFFSET_STEPS and offset_steps(8, 8) == OFFSET_STEPS
    steps = offset_steps(64, 8)
    for step, plain in zip(steps, OFFSET_STEPS):
        assert (step * 8) % 1.0 == pytest.approx(plain)  # the phase within the lattice follows the plain sequence


def test_healed_step_takes_the_previous_x0_near_its_lines():
    layout = RandomOffsetGrid(8, seed=3, heal_from=2)
    working, output = layout.working_shape(16, 16), (16, 16)
    hy, hx = layout.offset(2, working, output)
    assert len(layout.windows(2, working, output)) == len(layout.windows(1, working, output))  # no extra evaluations
    values = {1: 0.1, 2: 0.3}  # the denoiser's x0 ("sample" prediction) at step 1, then at step 2
    step = {}
    canvas = CanvasDenoiser(lambda x, t, c: torch.full_like(x, values[step["i"]]), layout, output, micro_batch=4,
                            x0_space=X0Space(torch.linspace(0.99, 0.01, 1000), "sample"))
    for i in (1, 2):
        step["i"] = i
        canvas.begin_step(i, torch.tensor(500))
        result = canvas(torch.zeros(1, 4, *working), torch.tensor(500))
    assert torch.allclose(result[0, 0, hy, :], torch.full((working[1],), 0.1))  # on a cut line: the previous x0
    assert torch.allclose(result[0, 0, (hy + 4) % working[0], (hx + 4) % working[1]], torch.tensor(0.3))  # centre
    assert canvas.stats.unet_evals == 2 * len(layout.windows(1, working, output))


def circular_blur(values: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """A Gaussian blur of a periodic canvas, rows then columns, by rolling it: the reference for cell_lowpass."""
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1).double() / sigma) ** 2)
    kernel = kernel / kernel.sum()
    blurred = sum(w * torch.roll(values, -k, dims=2) for k, w in zip(range(-radius, radius + 1), kernel))
    return sum(w * torch.roll(blurred, -k, dims=3) for k, w in zip(range(-radius, radius + 1), kernel))


def test_cell_lowpass_without_lines_is_a_circular_gaussian_blur():
    values = torch.randn(1, 2, 16, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # bands of 5 rows: the halo wraps around the canvas and across bands
    assert torch.allclose(cell_lowpass(values, ([], []), 8, 1.2, band_rows=5), circular_blur(values, 1.2, 4))


def test_cell_lowpass_never_averages_across_a_cut_line():
    """A canvas constant in each cell of the grid (jumps at every line) passes unchanged: no jump is smeared."""
    cells = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    values = cells.repeat_interleave(8, 0).repeat_interleave(8, 1)  # 24×32, cells of 8 px cut at 0 mod 8
    values = torch.roll(values, (3, 5), dims=(0, 1))[None, None]  # … now cut at 3 (rows) and 5 (columns)
    assert torch.allclose(cell_lowpass(values, ([3], [5]), 8, 2.0, band_rows=7), values)
    smeared = cell_lowpass(values, ([], []), 8, 2.0)
    assert not torch.allclose(smeared, values)  # without the lines the jumps would be blurred
    # a second grid's lines (the last step's heal) cut the cells further: still nothing crosses any line
    finer = values + ((torch.arange(24)[:, None] - 3) % 8 >= 3).float()[None, None] * 0.5  # jumps before 6 too
    assert torch.allclose(cell_lowpass(finer, ([3, 6], [5]), 8, 2.0), finer)


@pytest.mark.parametrize("band_rows", [2, 5, 16, 40])
def test_cell_lowpass_in_place_equals_the_filtered_copy_bit_for_bit(band_rows):
    """In place, each band still reads its neighbours unfiltered — bands thinner than the halo (2 rows, radius 6)
    and the first rows, which the last band reads after the first band has filtered them, included."""
    values = torch.randn(1, 3, 40, 24, generator=torch.Generator().manual_seed(2))
    lines = ([3, 6], [5])
    expected = cell_lowpass(values, lines, 8, 2.0, band_rows=1000)  # one band, a copy
    canvas = values.clone()
    result = cell_lowpass(canvas, lines, 8, 2.0, band_rows=band_rows, out=canvas)
    assert result is canvas and torch.equal(canvas, expected) and not torch.equal(canvas, values)


def test_cell_lowpass_of_a_canvas_lower_than_its_halo_is_the_circular_blur():
    values = torch.randn(1, 1, 3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(cell_lowpass(values, ([], []), 8, 2.0), circular_blur(values, 2.0, 6))  # radius 6 > 3 rows


def test_heal_with_detail_keeps_the_steps_own_fine_texture_on_its_lines():
    """Taken whole, the previous x0 replaces the step's own texture near its lines; with ``heal_detail`` only its
    coarse part does, so a pattern finer than σ that the step draws (a checkerboard in each patch) survives on the
    lines at the previous step's level."""
    layout = RandomOffsetGrid(8, seed=3, heal_from=2)
    working, output = layout.working_shape(16, 16), (16, 16)
    hy, hx = layout.offset(2, working, output)
    checker = (torch.arange(working[0])[:, None] + torch.arange(working[1])[None, :]) % 2 * 0.2 - 0.1
    values = {1: lambda x: torch.full_like(x, 0.1), 2: lambda x: 0.3 + checker[:x.shape[2], :x.shape[3]]}
    results = {}
    for detail in (0.0, 1.0):
        step = {}
        canvas = CanvasDenoiser(lambda x, t, c: values[step["i"]](x), layout, output, micro_batch=4,
                                x0_space=X0Space(torch.linspace(0.99, 0.01, 1000), "sample"), heal_detail=detail)
        for i in (1, 2):
            step["i"] = i
            canvas.begin_step(i, torch.tensor(500))
            results[detail] = canvas(torch.zeros(1, 4, *working), torch.tensor(500))
    line = results[1.0][0, 0, hy, :]
    assert torch.allclose(results[0.0][0, 0, hy, :], torch.full_like(line, 0.1))  # whole: the previous x0 only
    texture = line - line.mean()
    assert line.mean() == pytest.approx(0.1, abs=0.02)  # the level is the previous step's …
    assert texture.abs().min() > 0.05  # … the checkerboard (±0.1, blurred a little) is the step's own
    within = [c for c in range(working[1] - 1) if (c + 1 - hx) % 8]  # neighbours in one patch (its own pattern)
    assert all(texture[c] * texture[c + 1] < 0 for c in within)
    with pytest.raises(HistosynthError, match="heal detail must be at least 0"):
        CanvasDenoiser(lambda x, t, c: x, layout, output, heal_detail=-1.0)


def test_last_step_heals_the_previous_steps_lines_too():
    """On the previous step's cut lines the last step keeps the previous step's healed x0 (which there is the x0 of
    the step before it); away from both grids it keeps its own."""
    layout = RandomOffsetGrid(8, seed=5, heal_from=1)
    working, output = layout.working_shape(24, 24), (24, 24)
    values = {0: 0.1, 1: 0.3, 2: 0.7}  # the denoiser's x0 ("sample" prediction) at each step
    step = {}
    canvas = CanvasDenoiser(lambda x, t, c: torch.full_like(x, values[step["i"]]), layout, output, micro_batch=4,
                            x0_space=X0Space(torch.linspace(0.99, 0.01, 1000), "sample"), total_steps=3)
    for i in (0, 1, 2):
        step["i"] = i
        canvas.begin_step(i, torch.tensor(500))
        result = canvas(torch.zeros(1, 4, *working), torch.tensor(500))
    (y1, x1), (y2, x2) = layout.offset(1, working, output), layout.offset(2, working, output)
    assert torch.allclose(result[0, 0, y1, :], torch.full((working[1],), 0.1))  # on step 1's lines
    assert torch.allclose(result[0, 0, :, x1], torch.full((working[0],), 0.1))
    before, last = line_weights(working, (y1, x1), 8, 2)[0, 0], line_weights(working, (y2, x2), 8, 2)[0, 0]
    own = (last == 0) & (before == 1)  # on step 2's lines, away from step 1's: step 1's own x0
    far = (last == 1) & (before == 1)
    assert own.any() and torch.allclose(result[0, 0][own], torch.tensor(0.3))
    assert far.any() and torch.allclose(result[0, 0][far], torch.tensor(0.7))
    assert canvas.previous_x0 is None  # nothing is kept after the last step


def test_cut_lines_of_fixed_tiles_are_the_tile_grid():
    layout = FixedTiles(4)
    windows = layout.windows(0, (12, 12), (12, 12))
    assert cut_lines(layout, windows, (12, 12)) == ([4, 8], [4, 8])


def test_chunk_assignment_is_balanced_and_complete():
    for n, world in [(7, 2), (8, 3), (1, 2)]:
        shares = [chunk_assignment(n, r, world) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_large_masks_are_encoded_band_by_band_exactly_as_whole():
    from histosynth.conditions.mask import encode_large_mask, encode_mask

    mask = np.random.default_rng(0).integers(0, 4, size=(40, 24)).astype(np.uint8)
    whole = encode_mask(torch.from_numpy(mask).long()[None], 3, 4)  # (1, 3, 10, 6)
    for band_pixels in (1, 100, 24 * 12, 10**6):  # bands of 4, 4, 12 and all 40 rows
        assert torch.equal(encode_large_mask(mask, 3, 4, band_pixels=band_pixels), whole)
    with pytest.raises(HistosynthError, match="not a multiple of the latent factor 4"):
        encode_large_mask(mask[:38], 3, 4)


# --------------------------------------------------------------------------------------- DiffInfinite's baseline
def _ddim(steps: int):
    from diffusers import DDIMScheduler

    from histosynth.models.denoiser import make_train_scheduler

    scheduler = DDIMScheduler.from_config(make_train_scheduler().config)
    scheduler.set_timesteps(steps)
    return scheduler


def test_diffinfinite_feeds_every_patch_at_one_noise_level():
    """The official scheme: pixels already at step m + 1 enter a patch with their step-m values. With ε = 0 and
    η = 0, DDIM scales a pixel by √(ᾱ_next/ᾱ), so on a canvas of ones every pixel at step m is √(ᾱ_{t_m}/ᾱ_{t_0})
    and a patch fed at one level is constant; mixing levels would mix two values."""
    from histosynth.sampling.diffinfinite import sample_diffinfinite

    scheduler = _ddim(5)
    alphas, timesteps = scheduler.alphas_cumprod.double(), scheduler.timesteps.tolist()
    seen = []

    def zero_epsilon(x, t, conditions):
        seen.append((int(t), x.clone()))
        return torch.zeros_like(x)

    out, stats = sample_diffinfinite(zero_epsilon, torch.ones(1, 1, 20, 20), scheduler, patch=8, steps=5, seed=0,
                                     micro_batch=2, eta=0.0)
    assert len(seen) == stats.rounds and {t for t, _ in seen} == set(timesteps)
    levels = {t: float((alphas[t] / alphas[timesteps[0]]).sqrt()) for t in timesteps}
    for t, patch in seen:
        assert torch.allclose(patch, torch.full_like(patch, levels[t]), rtol=1e-5), t
    # Every step runs, the last to ᾱ = 1: x = x_T / √ᾱ_{t_0} everywhere.
    assert torch.allclose(out, torch.full_like(out, float(1 / alphas[timesteps[0]].sqrt())), rtol=1e-5)


def test_diffinfinite_is_ancestral_by_default_and_seeded():
    from histosynth.sampling.diffinfinite import sample_diffinfinite

    def zero_epsilon(x, t, conditions):
        return torch.zeros_like(x)

    noise = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(0))
    run = lambda seed, **k: sample_diffinfinite(zero_epsilon, noise, _ddim(4), 8, 4, seed, micro_batch=2, **k)[0]
    first, again, other, deterministic = run(1), run(1), run(2), run(1, eta=0.0)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (first - deterministic).abs().max() > 0.1  # η = 1 adds fresh noise at every update


def test_slabs_cover_the_tensor_once_in_memory_order_with_sizes_a_multiple_of_16():
    cut = slabs((1, 2, 10, 12), elements=30, multiple=16)  # 12-px rows: 4 rows make 48 px, the first multiple of 16
    assert [(c, r.start, r.stop) for c, r in cut] == [(0, 0, 4), (0, 4, 8), (0, 8, 10), (1, 0, 4), (1, 4, 8),
                                                      (1, 8, 10)]
    assert [(c, r.start, r.stop) for c, r in slabs((1, 1, 5, 7), elements=14)] == [(0, 0, 2), (0, 2, 4), (0, 4, 5)]


# Channels of 960 px (noise drawn slab by slab) and of 35 px (drawn whole); one slab per channel, or slabs of a few
# rows (2 of 40 px, 2 of 7 px).
@pytest.mark.parametrize("shape, slab", [((1, 4, 24, 40), 2**22), ((1, 4, 24, 40), 80), ((1, 3, 5, 7), 2**22),
                                         ((1, 3, 5, 7), 14)])
@pytest.mark.parametrize("name", ["dpm++sde", "dpm++", "ddim"])
@pytest.mark.parametrize("spilled", [False, True])
def test_the_slab_by_slab_step_equals_the_schedulers_whole_step(name, shape, slab, spilled, tmp_path):
    """Same outputs bit for bit, the same solver history where the next step reads it and the same generator state
    after every step (5 steps: the first-order start, second-order steps and the lower-order final step), on a
    canvas-like latent; the history's oldest entry, which the next step shifts out unread, is let go. Spilled, the
    history waits on disk and comes back the same."""
    whole, banded = scheduler(name), scheduler(name)
    for s in (whole, banded):
        s.set_timesteps(5)
    g_whole, g_banded = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    outputs = torch.Generator().manual_seed(4)
    x_whole = torch.randn(shape, generator=outputs)
    x_banded = x_whole.clone()
    for t in whole.timesteps:
        model_output = torch.randn(x_whole.shape, generator=outputs)
        x_whole = whole.step(model_output, t, x_whole, generator=g_whole).prev_sample
        x_banded = scheduler_step(banded, model_output.clone(), t, x_banded, g_banded, slab_elements=slab,
                                  spill=Spill(tmp_path) if spilled else None)
        assert torch.equal(x_whole, x_banded)
        assert torch.equal(g_whole.get_state(), g_banded.get_state())
        if name != "ddim":
            assert banded.model_outputs[0] is None and len(banded.model_outputs) == len(whole.model_outputs)
            assert isinstance(banded.model_outputs[-1], SpilledCanvas) == spilled
            for a, b in zip(whole.model_outputs[1:], banded.model_outputs[1:]):
                assert (a is None and b is None) or torch.equal(a, in_memory(b))
    if name != "ddim":  # (DDIM keeps no step counter)
        assert banded.step_index == whole.step_index == 5


def test_a_spilled_canvas_reads_back_the_same_bits_by_rows_and_slabs(tmp_path):
    for dtype in (torch.float32, torch.bfloat16):
        values = torch.randn(1, 3, 7, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
        spilled = Spill(tmp_path).keep(values)
        assert isinstance(spilled, SpilledCanvas) and spilled.path.stat().st_size == values.numel() * values.element_size()
        assert torch.equal(spilled.load(), values) and spilled.load().dtype == dtype
        assert torch.equal(spilled.read_rows(2, 6), values[:, :, 2:6])
        assert torch.equal(spilled.read_slab(1, slice(3, 7)), values[:, 1:2, 3:7])
        spilled.write_rows(5, torch.zeros(1, 3, 2, 5, dtype=dtype))
        changed = values.clone()
        changed[:, :, 5:] = 0
        assert torch.equal(spilled.load(), changed)
        path = spilled.path
        del spilled
        assert not path.exists()  # let go, its file goes too
    small = torch.zeros(1, 2, 4, 4)
    assert Spill(tmp_path, min_elements=33).keep(small) is small  # under the threshold it stays in memory
    assert isinstance(Spill(tmp_path, min_elements=32).keep(small), SpilledCanvas)


def _whole_canvas_heal(output, latents, t, previous, space, offsets, lines, detail):
    """The heal written over whole canvases, as a formula: the reference for the banded, spilling heal."""
    x0 = space.to_x0(output, latents, t)
    weight = line_weights(tuple(output.shape[2:]), offsets[0], 8, 2)
    for offset in offsets[1:]:
        weight = torch.minimum(weight, line_weights(tuple(output.shape[2:]), offset, 8, 2))
    correction = x0 - previous
    if detail:
        correction = cell_lowpass(correction, lines, 8, detail)
    healed = x0 - correction * (1 - weight)
    return space.from_x0(healed, latents, t), healed


@pytest.mark.parametrize("prediction, detail", [("epsilon", 1.5), ("v_prediction", 1.5), ("v_prediction", 0.0)])
def test_the_banded_heal_equals_the_whole_canvas_formula_bit_for_bit(prediction, detail, tmp_path):
    """Healed band by band (5 rows, thinner than the low-pass's halo, or all at once), its previous x0 in memory or
    on disk: the model output and the x0 kept for the next step are the formula's, bit for bit, at a healed step
    and at the last step, which heals the previous step's lines too."""
    layout = RandomOffsetGrid(8, seed=3, heal_from=1)
    output = (20, 28)
    working = layout.working_shape(*output)
    space = X0Space(torch.linspace(0.99, 0.01, 1000), prediction)
    denoiser = lambda x, t, c: torch.cos(3 * x) + 0.1 * float(t) / 1000
    t = torch.tensor(400)
    draws = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, 4, *working, generator=draws) for _ in range(3)]
    runs = []
    for band_rows, spill in ((5, None), (5, Spill(tmp_path)), (1000, Spill(tmp_path))):
        canvas = CanvasDenoiser(denoiser, layout, output, micro_batch=3, x0_space=space, total_steps=3,
                                heal_detail=detail, spill=spill)
        canvas.heal_band_rows = band_rows
        plain = CanvasDenoiser(denoiser, layout, output, micro_batch=3)  # no heal: the merged output
        results = []
        for step, latents in enumerate(inputs):
            previous = in_memory(canvas.previous_x0)
            previous = None if previous is None else previous.clone()  # (in memory, the heal writes over it)
            for c in (canvas, plain):
                c.begin_step(step, t)
            merged = plain(latents, t)
            result = canvas(latents, t)
            assert isinstance(canvas.previous_x0, SpilledCanvas) == (spill is not None and step < 2)
            if step == 0:  # the first step only keeps its x0 for the next
                assert torch.equal(result, merged) and torch.equal(in_memory(canvas.previous_x0),
                                                                   space.to_x0(merged, latents, t))
                continue
            offsets = [layout.offset(s, working, output) for s in ((1, 2) if step == 2 else (1,))]
            lines = tuple(sorted({o[axis] for o in offsets}) for axis in (0, 1))
            expected, healed = _whole_canvas_heal(merged, latents, t, previous, space, offsets, lines, detail)
            assert torch.equal(result, expected)
            if step == 1:
                assert torch.equal(in_memory(canvas.previous_x0), healed)
            results.append(result)
        assert canvas.previous_x0 is None  # nothing kept after the last step
        runs.append(results)
    assert not torch.equal(runs[0][0], inputs[1])  # (the heal did something)


def test_a_canvas_that_cannot_be_written_to_disk_is_one_clear_error(tmp_path, monkeypatch):
    import os

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(HistosynthError, match=f"{tmp_path}: cannot keep a canvas on disk there \\(No space left on "
                                              "device\\)"):
        Spill(tmp_path).keep(torch.zeros(1, 2, 4, 4))
