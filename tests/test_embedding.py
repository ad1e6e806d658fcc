"""SSL-embedding conditioning, fast parts: slerp rules (design.md §3), the per-patch grid condition, encoders
(local, hub through a Hugging Face cache built in the test, offline errors), the embeddings cache and its keying."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from histosynth.conditions.embedding import EmbeddingGrid, EmbeddingStandardizer, interpolate_grid, slerp
from histosynth.dihedral import dihedral
from histosynth.conditions.embedding_cache import embed_dataset, load_cache, resolve_embeddings
from histosynth.conditions.encoders import SSLEncoder, load_encoder
from histosynth.train.sources import EmbeddingSource
from histosynth.data.labels import AUTO_CLASSES, auto_label_thresholds, auto_labels, downsample_labels
from histosynth.data.samples import png_path, svs_path
from histosynth.data.slides import open_slide
from histosynth.errors import HistosynthError
from histosynth.sampling.canvas import CanvasDenoiser, MultiDiffusion
from histosynth.train import tasks
from cli_runner import cli  # noqa: F401  (fixture)

torch.set_num_threads(1)

CLASSES = [{"id": 0, "name": "unknown", "color": [0, 0, 0]}] + AUTO_CLASSES


# ------------------------------------------------------------------------------------------------- tiny data
def tiny_dataset(root, side=6, patch=32, test_rows=1, slide="png", mpp=0.5, origin=(0, 0), test_band=None):
    """``side``×``side`` adjacent patches cut at ``mpp`` from a bundled image (``png``: the tumour region, ``svs``:
    the skin slide) from ``origin`` (px at ``mpp``), with weak labels and a label map; the last ``test_rows`` rows
    (or the rows ``test_band`` = (first, stop)) are the test split."""
    first, stop = test_band or (side - test_rows, side)
    path = png_path() if slide == "png" else svs_path()
    opened = open_slide(path, source_mpp=0.25)
    to_level0 = mpp / opened.mpp
    rgb = opened.read_region(round(origin[0] * to_level0), round(origin[1] * to_level0), side * patch, side * patch, mpp)
    labels = auto_labels(rgb, auto_label_thresholds(rgb))
    for folder in ("images", "masks", "labelmaps"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    labelmap = np.zeros(((origin[1] + side * patch) // 8, (origin[0] + side * patch) // 8), np.uint8)
    labelmap[origin[1] // 8:, origin[0] // 8:] = downsample_labels(labels, 8, 3)  # level-0 (0, 0) at its corner
    Image.fromarray(labelmap).save(root / "labelmaps" / "000.png")
    patches = []
    for r in range(side):
        for c in range(side):
            name = f"{r * side + c:06d}.png"
            Image.fromarray(rgb[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]).save(root / "images" / name)
            Image.fromarray(labels[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]).save(root / "masks" / name)
            patches.append({"image": f"images/{name}", "mask": f"masks/{name}", "source": 0,
                            "x": round((origin[0] + c * patch) * to_level0),
                            "y": round((origin[1] + r * patch) * to_level0),
                            "split": "test" if first <= r < stop else "train"})
    width, height = opened.dimensions
    index = {"version": 1, "classes": CLASSES, "mpp": mpp, "patch_size": patch,
             "sources": [{"id": 0, "path": str(path), "case": None, "source_mpp": opened.mpp, "width": width,
                          "height": height, "labelmap": "labelmaps/000.png", "labelmap_mpp": 8 * mpp}],
             "regions": [{"source": 0, "split": "train", "box": [0, 0, width, height]}], "patches": patches}
    (root / "dataset.json").write_text(json.dumps(index))
    return root


def save_encoder(path, widths=(8, 16), size=32, seed=0):
    """A random histosynth encoder folder, as `histosynth train ssl` writes it."""
    from histosynth.models.bundle import save_bundle

    torch.manual_seed(seed)
    encoder = SSLEncoder(widths=widths, input_size=size).eval()
    save_bundle(path, {"kind": "encoder", "dim": encoder.dim, "input_size": size}, {"ssl_encoder": encoder}, None,
                "# encoder")
    return path


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------------- slerp
def test_slerp_reproduces_nodes_and_keeps_unit_norm_between():
    g = torch.Generator().manual_seed(0)
    a, b = unit(torch.randn(6, 16, generator=g)), unit(torch.randn(6, 16, generator=g))
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    for t in (0.1, 0.37, 0.5, 0.9):
        out = slerp(a, b, t)
        assert torch.allclose(out.norm(dim=-1), torch.ones(6), atol=1e-6)
        # On the great circle: the angle to a is t times the whole angle.
        whole = torch.acos((a * b).sum(-1).clamp(-1, 1))
        assert torch.allclose(torch.acos((unit(out) * a).sum(-1).clamp(-1, 1)), t * whole, atol=1e-4)


def test_slerp_interpolates_norm_linearly_and_handles_parallel_opposite_and_zero():
    a = torch.tensor([[3.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0]])
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(), torch.tensor(2.0)) and torch.allclose(unit(mid), unit(torch.tensor([[1.0, 1.0, 0]])))
    # Parallel (angle < 1e-4): linear, no NaN; equal vectors give themselves exactly.
    assert torch.equal(slerp(a, a, 0.3), a)
    near = a + torch.tensor([[0.0, 1e-6, 0.0]])
    assert torch.allclose(slerp(a, near, 0.5), (a + near) / 2)
    # Opposite: a half turn through a perpendicular, unit norm for unit inputs, no NaN.
    u = unit(torch.tensor([[1.0, 2.0, 3.0]]))
    half = slerp(u, -u, 0.5)
    assert torch.isfinite(half).all() and torch.allclose(half.norm(), torch.tensor(1.0))
    assert abs(float((half * u).sum())) < 1e-6
    assert torch.equal(slerp(u, -u, 1.0), -u)
    # Zero vectors: linear interpolation, zeros stay zeros.
    zero = torch.zeros(1, 3)
    assert torch.allclose(slerp(zero, b, 0.25), 0.25 * b)
    assert torch.equal(slerp(zero, zero, 0.5), zero)


def test_grid_nodes_exact_constant_grid_constant_and_rows_first_order():
    g = torch.Generator().manual_seed(1)
    grid = torch.randn(3, 4, 8, generator=g)
    ys, xs = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    assert torch.equal(interpolate_grid(grid, ys.flatten(), xs.flatten()), grid.reshape(-1, 8))
    vector = torch.randn(8, generator=g)
    constant = vector.expand(3, 4, 8).clone()
    values = interpolate_grid(constant, torch.rand(50, generator=g) * 2, torch.rand(50, generator=g) * 3)
    assert torch.equal(values, vector.expand(50, 8))
    # Along the rows first (between columns), then between the two rows: the order §3 fixes.
    y, x = torch.tensor([0.3]), torch.tensor([1.6])
    top = slerp(grid[0, 1], grid[0, 2], 0.6)
    bottom = slerp(grid[1, 1], grid[1, 2], 0.6)
    assert torch.allclose(interpolate_grid(grid, y, x)[0], slerp(top, bottom, 0.3))
    left = slerp(grid[0, 1], grid[1, 1], 0.3)
    right = slerp(grid[0, 2], grid[1, 2], 0.3)
    assert not torch.allclose(interpolate_grid(grid, y, x)[0], slerp(left, right, 0.6), atol=1e-6)


def test_embedding_grid_crop_follows_the_output_rows_a_patch_writes():
    grid = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(2))
    canvas = EmbeddingGrid(grid, (16, 16))  # nodes at the centres of the four 8×8 cells
    assert torch.equal(canvas.crop(torch.arange(0, 8), torch.arange(8, 16))[0], grid[0, 1])
    assert torch.equal(canvas.crop(torch.arange(8, 16), torch.arange(0, 8))[0], grid[1, 0])
    halfway = canvas.crop(torch.arange(4, 12), torch.arange(0, 8))[0]
    assert torch.allclose(halfway, slerp(grid[0, 0], grid[1, 0], 0.5))
    # A periodic working canvas of 24 rows: a patch starting in the margin wraps onto rows 0..3 and writes them,
    # so it takes the embedding of their centre (row 2), not that of the bottom edge beside its start.
    wrapped = torch.arange(20, 28) % 24
    assert torch.allclose(canvas.crop(wrapped, torch.arange(0, 8))[0], canvas.at(2.0, 4.0)[0])
    assert not torch.allclose(canvas.crop(wrapped, torch.arange(0, 8))[0], canvas.at(15.5, 4.0)[0])
    # A patch writing only output rows 14 and 15 (the rest is margin): centred on them.
    assert torch.allclose(canvas.crop(torch.arange(14, 22), torch.arange(0, 8))[0], canvas.at(15.0, 4.0)[0])
    # Wholly in the margin (rows 16..23 mirror onto 15..8): the centre of the mirrored rows, as masks are mirrored.
    assert torch.allclose(canvas.crop(torch.arange(16, 24), torch.arange(0, 8))[0], canvas.at(12.0, 4.0)[0])


def _quarter_turn_slerp(a, b, t):
    """slerp of orthogonal ``a``, ``b`` in closed form, independent of the code's sine-ratio formula: the angle is
    π/2, so the direction is cos(tπ/2)·â + sin(tπ/2)·b̂, and the norm is interpolated linearly (§3)."""
    if t == 0:
        return a
    na, nb = a.norm(), b.norm()
    return ((1 - t) * na + t * nb) * (math.cos(t * math.pi / 2) * a / na + math.sin(t * math.pi / 2) * b / nb)


def _grid_value(grid, gy, gx):
    """Rows first (between columns), then between the rows, as §3 fixes; valid where every slerp it takes is
    between orthogonal vectors (a grid of distinct basis directions)."""
    y0, x0 = int(gy), int(gx)
    y1, x1 = min(y0 + 1, grid.shape[0] - 1), min(x0 + 1, grid.shape[1] - 1)
    top = _quarter_turn_slerp(grid[y0, x0], grid[y0, x1], gx - x0)
    bottom = _quarter_turn_slerp(grid[y1, x0], grid[y1, x1], gx - x0)
    return _quarter_turn_slerp(top, bottom, gy - y0)


def _basis_grid(rows, cols, norms):
    """Node (i, j) is basis vector i·cols + j scaled by its norm: every pair of nodes is orthogonal."""
    return (torch.eye(rows * cols, dtype=torch.float64) * torch.tensor(norms, dtype=torch.float64)[:, None]) \
        .reshape(rows, cols, rows * cols)


def test_slerp_midpoint_of_orthogonal_unit_vectors_is_their_normalised_sum():
    g = torch.Generator().manual_seed(4)
    u = unit(torch.randn(5, 16, generator=g, dtype=torch.float64))
    v = torch.randn(5, 16, generator=g, dtype=torch.float64)
    v = unit(v - (v * u).sum(-1, keepdim=True) * u)  # orthogonal to u, row by row
    torch.testing.assert_close(slerp(u, v, 0.5), unit(u + v), rtol=0, atol=1e-12)
    # A linear midpoint would have norm 1/√2; slerp keeps the unit norm of its ends.
    torch.testing.assert_close(slerp(u, v, 0.5).norm(dim=-1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)
    # Norms 2 and 4 at t = 0.25: norm 2.5, direction a quarter of the right angle from u.
    expected = torch.stack([_quarter_turn_slerp(2 * a, 4 * b, 0.25) for a, b in zip(u, v)])
    torch.testing.assert_close(slerp(2 * u, 4 * v, 0.25), expected, rtol=0, atol=1e-12)


def test_embedding_grid_values_at_nodes_corners_midpoints_and_centre():
    norms = [2.0, 4.0, 1.0, 3.0]
    grid = _basis_grid(2, 2, norms)  # (2, 2, 4): nodes 2·e0, 4·e1 / 1·e2, 3·e3
    canvas = EmbeddingGrid(grid, (16, 16))  # nodes at the centres of the four 8×8 cells: (4, 4), (4, 12), ...
    anchors = grid.float()
    for (y, x), node in {(4, 4): (0, 0), (4, 12): (0, 1), (12, 4): (1, 0), (12, 12): (1, 1)}.items():
        assert torch.equal(canvas.at(y, x)[0], anchors[node]), (y, x)
    # Beyond the outer nodes the border extends outwards: each canvas corner takes its corner anchor exactly.
    for (y, x), node in {(0, 0): (0, 0), (0, 16): (0, 1), (16, 0): (1, 0), (16, 16): (1, 1)}.items():
        assert torch.equal(canvas.at(y, x)[0], anchors[node]), (y, x)
    # Halfway between 2·e0 and 4·e1: the direction is (e0 + e1)/√2 and the norm the mean of 2 and 4.
    half = canvas.at(4, 8)[0]
    torch.testing.assert_close(half, torch.tensor([3 / math.sqrt(2), 3 / math.sqrt(2), 0, 0]), rtol=1e-6, atol=1e-6)
    # A quarter of the way (x = 6 is grid column 0.25): norm 2.5 linearly, direction a quarter of the right angle.
    quarter = canvas.at(4, 6)[0]
    torch.testing.assert_close(quarter.norm(), torch.tensor(2.5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(quarter, 2.5 * torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8), 0, 0]),
                               rtol=1e-6, atol=1e-6)
    # Centre of all four: rows give norms 3 and 2 along (e0+e1)/√2 and (e2+e3)/√2, then 2.5 along their sum.
    centre = canvas.at(8, 8)[0]
    torch.testing.assert_close(centre, torch.full((4,), 1.25), rtol=1e-6, atol=1e-6)
    bilinear = grid.mean((0, 1)).float()  # what plain bilinear interpolation would give: much shorter
    assert centre.norm() - bilinear.norm() > 1.0
    # Anywhere between nodes: the closed form, e.g. grid point (0.25, 0.75).
    torch.testing.assert_close(canvas.at(6, 10)[0], _grid_value(grid, 0.25, 0.75).float(), rtol=1e-6, atol=1e-6)


def test_canvas_denoiser_gives_each_patch_the_slerp_of_the_grid_at_its_centre():
    grid = _basis_grid(2, 3, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # (2, 3, 6) over a 16×24 canvas: 8×8 cells
    seen = []

    def denoiser(x, t, conditions):
        seen.append(conditions["embedding"].clone())
        return torch.zeros_like(x)

    # Windows every 4 px: patch centres on nodes, halfway between two nodes and at the middle of four.
    layout, output = MultiDiffusion(8, 4), (16, 24)
    canvas = CanvasDenoiser(denoiser, layout, output, {"embedding": EmbeddingGrid(grid, output)}, micro_batch=5)
    assert canvas.working_shape == output  # no margin, so every patch writes exactly its own rows and columns
    canvas.begin_step(0, torch.tensor(999))
    canvas(torch.zeros(1, 4, *output), torch.tensor(999), {})
    windows = layout.windows(0, canvas.working_shape, output)
    values = torch.cat(seen)
    assert values.shape == (len(windows), 6) == (15, 6)
    on_node = 0
    for (y, x), value in zip(windows, values):
        gy, gx = (y + 4) * 2 / 16 - 0.5, (x + 4) * 3 / 24 - 0.5  # the patch centre in grid coordinates
        if gy == int(gy) and gx == int(gx):
            assert torch.equal(value, grid[int(gy), int(gx)].float()), (y, x)
            on_node += 1
        torch.testing.assert_close(value, _grid_value(grid, gy, gx).float(), rtol=1e-6, atol=1e-6)
    assert on_node == 6


# -------------------------------------------------------------------------------------------------- encoders
def test_encoder_folder_cache_keying_and_refusal(tmp_path):
    data = tiny_dataset(tmp_path / "ds", side=4)
    a = load_encoder(str(save_encoder(tmp_path / "a", seed=0)))
    b = load_encoder(str(save_encoder(tmp_path / "b", seed=1)))
    assert a.dim == 16 and a.weights_hash != b.weights_hash
    path_a, computed = embed_dataset(data, a, batch_size=5, dihedral_views=True)
    assert computed and load_cache(path_a).embeddings.shape == (16, 8, 16)
    assert embed_dataset(data, a)[1] is False  # up to date: reused
    # Another encoder never reuses the cache: it gets its own file, and A's file refuses it.
    with pytest.raises(HistosynthError, match="no embeddings of encoder"):
        resolve_embeddings(data, str(tmp_path / "b"))
    with pytest.raises(HistosynthError, match="made by encoder"):
        load_cache(path_a).check_encoder(b.id, b.weights_hash)
    # Same folder, other weights: refused by hash.
    shutil.rmtree(tmp_path / "a")
    save_encoder(tmp_path / "a", seed=5)
    with pytest.raises(HistosynthError, match="no embeddings of encoder"):
        resolve_embeddings(data, str(tmp_path / "a"))
    path_b, _ = embed_dataset(data, b)
    assert path_b != path_a
    assert resolve_embeddings(data, str(tmp_path / "b")).encoder == b.id
    # The view of the dihedral transform k is the embedding of the transformed patch.
    image = torch.from_numpy(np.array(Image.open(data / "images" / "000000.png"))).permute(2, 0, 1)[None]
    image = image.float() / 127.5 - 1
    assert torch.allclose(load_cache(path_a).embeddings[0, 5], a(dihedral(image, 5))[0], atol=1e-5)
    x = torch.arange(12.0).reshape(3, 4)
    assert all(torch.equal(dihedral(x, k), tasks.dihedral(x, k)) for k in range(8))


def test_embedding_source_draws_the_view_and_standardises(tmp_path):
    data = tiny_dataset(tmp_path / "ds", side=4)
    encoder = load_encoder(str(save_encoder(tmp_path / "e")))
    cache = load_cache(embed_dataset(data, encoder, dihedral_views=True)[0])
    source = EmbeddingSource(cache, data, dropout=0.2, normalize=True)
    assert source.name == "embedding" and source.dim == 16 and source.dropout == 0.2
    raw = source.draw(2, {}, 3, torch.Generator())
    assert torch.equal(raw, cache.embeddings[2, 3])  # train patch 2 is dataset patch 2 here
    standardized = source.encoder(source.collate([raw, source.draw(0, {}, 0, torch.Generator())]))
    assert standardized.shape == (2, 16)
    all_views = source.encoder(source.table.reshape(-1, 16))
    assert torch.allclose(all_views.mean(0), torch.zeros(16), atol=1e-4)
    assert source.bundle_settings["embedding_encoder"] == encoder.id
    assert source.bundle_settings["embedding_normalize"] is True
    assert isinstance(source.encoder, EmbeddingStandardizer) and not list(source.encoder.parameters())


def _fake_hub_cache(cache, repo, files):
    """The layout huggingface_hub reads offline: refs/main -> snapshots/<revision>/files."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    shutil.copytree(files, root / "snapshots" / revision)


def test_hub_ids_load_from_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    import timm
    from timm.models import save_for_hf
    from transformers import ViTConfig, ViTModel

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **args).eval()
    save_for_hf(vit, str(tmp_path / "timm"), safe_serialization=True, model_args=args)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    hf_vit = ViTModel(config, add_pooling_layer=False).eval()
    hf_vit.save_pretrained(tmp_path / "hf")
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "tiny/vit", tmp_path / "timm")
    _fake_hub_cache(cache, "tiny/phikon", tmp_path / "hf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    encoder = load_encoder("hf-hub:tiny/vit")
    assert encoder.id == "hf-hub:tiny/vit" and encoder.dim == 32 and len(encoder.weights_hash) == 64
    with torch.no_grad():
        assert torch.allclose(encoder(x), vit(encoder.preprocess(x)), atol=1e-6)
    phikon_like = load_encoder("tiny/phikon")
    assert phikon_like.dim == 32 and phikon_like.input_size == 32
    with torch.no_grad():
        expected = hf_vit(pixel_values=phikon_like.preprocess(x)).last_hidden_state[:, 0]
    assert torch.allclose(phikon_like(x), expected, atol=1e-6)
    # A local timm folder with pickled weights is refused; hub weights missing offline give a clear error.
    (tmp_path / "timm" / "model.safetensors").unlink()
    torch.save({}, tmp_path / "timm" / "pytorch_model.bin")
    with pytest.raises(HistosynthError, match="only safetensors"):
        load_encoder(str(tmp_path / "timm"))
    with pytest.raises(HistosynthError, match="could not load the weights of encoder 'uni'.*HF_HUB_OFFLINE"):
        load_encoder("uni")


def test_embed_cli_and_bad_encoder_ids_give_one_line_errors(tmp_path, cli, monkeypatch):
    data = tiny_dataset(tmp_path / "ds", side=3)
    save_encoder(tmp_path / "enc")
    code, text = cli(["embed", "--data", data, "--encoder", tmp_path / "enc", "--batch-size", 4])
    assert code == 0, text
    assert "wrote" in text and list((data / "embeddings").glob("enc-*.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    for encoder, message in (("no-such-encoder", "unknown encoder"),
                             ("hf-hub:MahmoodLab/uni", "could not load the weights"),
                             ("owkin/phikon", "could not load the weights")):
        code, text = cli(["embed", "--data", data, "--encoder", encoder])
        lines = [line for line in text.strip().splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], text


def test_evaluation_can_measure_in_an_encoder_space(tmp_path):
    from histosynth.eval.features import build_feature_fn, extractor_names

    assert {"embedding", "uni", "phikon", "lunit-dino", "h-optimus-0"} <= set(extractor_names())
    fn = build_feature_fn("embedding", weights=str(save_encoder(tmp_path / "enc")))
    assert fn(np.zeros((3, 32, 32, 3), np.uint8)).shape == (3, 16)


# ------------------------------------------------------------------------------------------------------ text
def test_captions_composition_and_text_encoders(tmp_path):
    from histosynth.conditions.text import (
        class_fractions,
        composition_phrase,
        load_text_encoder,
        read_caption_file,
        source_caption,
    )

    labels = np.array([[3, 3, 2, 2], [2, 2, 2, 2], [1, 2, 2, 0], [2, 2, 2, 2]])
    fractions = class_fractions(labels, CLASSES)
    assert math.isclose(sum(fractions.values()), 1.0) and math.isclose(fractions["nuclei"], 2 / 15)
    assert composition_phrase(fractions) == "mostly stroma, scattered nuclei, little background"
    assert composition_phrase({"nuclei": 0.4, "stroma": 0.05}) == "dense nuclei, little stroma"
    csv = tmp_path / "captions.csv"
    csv.write_text("source,text,class\nhe_tumour_region.png,breast carcinoma,tumour\n")
    captions = read_caption_file(csv)
    assert source_caption({"id": 0, "path": "/x/he_tumour_region.png"}, captions) == \
        {"text": "breast carcinoma", "class": "tumour"}
    assert source_caption({"id": 1, "path": "/x/cmu_small_region.svs"}, captions)["text"] == "skin"
    (tmp_path / "bad.csv").write_text("name,caption\na,b\n")
    with pytest.raises(HistosynthError, match="source,text"):
        read_caption_file(tmp_path / "bad.csv")
    hashing = load_text_encoder("hashing")
    vectors = hashing(["dense nuclei, little stroma", "dense nuclei, little stroma", "fat"])
    assert vectors.shape == (3, 384) and torch.equal(vectors[0], vectors[1])
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3))
