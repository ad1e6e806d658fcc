"""Self-supervised-embedding conditioning (Graikos et al. 2024, "Learned representation-guided diffusion models
for large-image generation"; design.md §3).

A frozen encoder maps each training patch to a vector; the denoiser learns p(patch | embedding). For an image larger
than a patch, a grid of embeddings covers the canvas and each patch receives the spherical-bilinear (slerp)
interpolation of the grid at its centre. This module holds, in order:

- ``slerp`` / ``interpolate_grid`` / ``EmbeddingGrid``: the interpolation rules of §3 and the per-patch condition
  object that ``CanvasDenoiser`` crops;
- the encoder registry (timm ``hf-hub:`` ids, transformers ids, local safetensors folders and histosynth's own
  self-supervised ``SSLEncoder``), each with its preprocessing and embedding width;
- batched extraction over a dataset and its cache, keyed by encoder id + weights hash;
- ``EmbeddingSource``, the training-time condition source (``train/tasks.py``'s ``ConditionSource``).

Nothing here downloads at import; hub weights are fetched only by ``load_encoder`` and only when the Hugging Face
Hub is reachable and ``HF_HUB_OFFLINE`` is not set.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from histosynth.errors import HistosynthError

PARALLEL_ANGLE = 1e-4  # below this angle (radians) slerp is 0/0: interpolate linearly instead (§3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_FILE = "histosynth.json"
ENCODER_COMPONENT = "ssl_encoder"
CACHE_DIR = "embeddings"
CACHE_VERSION = 1


# ================================================================================================ interpolation


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Interpolate ``a`` -> ``b`` (..., D) at ``t``: direction by spherical interpolation, norm linearly (§3).

    SSL embeddings are not unit vectors, so the norm is interpolated separately. Where the angle between the two is
    below ``PARALLEL_ANGLE`` (parallel or equal vectors) or either is zero, the result is the linear interpolation.
    Exactly opposite vectors turn through a fixed perpendicular direction. ``t == 0`` gives ``a`` and ``t == 1``
    gives ``b`` bit for bit.
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    t64 = torch.as_tensor(t, dtype=torch.float64, device=a.device)
    while t64.ndim < a64.ndim:
        t64 = t64.unsqueeze(-1)  # (..., 1)
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)  # (..., 1)
    zero = (na == 0) | (nb == 0)
    ua = a64 / torch.where(na == 0, torch.ones_like(na), na)
    ub = b64 / torch.where(nb == 0, torch.ones_like(nb), nb)
    # The angle from |ua − ub| and |ua + ub| is accurate near 0 and π, unlike acos of the dot product.
    angle = 2 * torch.atan2((ua - ub).norm(dim=-1, keepdim=True), (ua + ub).norm(dim=-1, keepdim=True))  # (..., 1)
    linear = a64 + t64 * (b64 - a64)
    # Opposite vectors: no unique great circle; rotate through a perpendicular fixed by ua alone.
    opposite = (math.pi - angle) < PARALLEL_ANGLE
    axis = torch.zeros_like(ua)
    axis.scatter_(-1, ua.abs().argmin(dim=-1, keepdim=True), 1.0)
    perpendicular = axis - (axis * ua).sum(-1, keepdim=True) * ua
    perpendicular = perpendicular / perpendicular.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    sin = torch.sin(angle).clamp_min(1e-300)
    direction = (torch.sin((1 - t64) * angle) * ua + torch.sin(t64 * angle) * ub) / sin
    half_turn = torch.cos(t64 * math.pi) * ua + torch.sin(t64 * math.pi) * perpendicular
    direction = torch.where(opposite, half_turn, direction)
    spherical = ((1 - t64) * na + t64 * nb) * direction
    out = torch.where(zero | (angle < PARALLEL_ANGLE), linear, spherical)
    out = torch.where(t64 == 0, a64, torch.where(t64 == 1, b64, out))
    return out.to(dtype)


def interpolate_grid(grid: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Slerp-bilinear value of ``grid`` (R, C, D) at fractional node coordinates ``y``, ``x`` (N,) -> (N, D).

    Fixed order (§3): along each of the two bracketing rows first (between columns), then between the two rows.
    Coordinates are clamped to the grid, so the border nodes extend outwards; integer coordinates give the node.
    """
    rows, cols = grid.shape[:2]
    y = torch.as_tensor(y, dtype=torch.float64).clamp(0, rows - 1)
    x = torch.as_tensor(x, dtype=torch.float64).clamp(0, cols - 1)
    y0 = y.floor().long().clamp(max=rows - 1)
    x0 = x.floor().long().clamp(max=cols - 1)
    y1, x1 = (y0 + 1).clamp(max=rows - 1), (x0 + 1).clamp(max=cols - 1)
    ty, tx = y - y0, x - x0  # (N,) in [0, 1)
    top = slerp(grid[y0, x0], grid[y0, x1], tx)  # (N, D)
    bottom = slerp(grid[y1, x0], grid[y1, x1], tx)  # (N, D)
    return slerp(top, bottom, ty)  # (N, D)


@dataclass
class EmbeddingGrid:
    """A grid of embeddings (R, C, D) stretched over a latent canvas (h, w); node (i, j) sits at the centre of
    cell (i, j) of an R×C partition of the canvas.

    ``crop(rows, cols)`` is the per-patch condition that ``CanvasDenoiser`` asks for: ``rows``/``cols`` are the
    patch's working-canvas index tensors (latent px, possibly wrapped around the periodic working canvas). A patch
    takes the embedding at the centre of the output rows and columns it writes — one contiguous run, since the
    scratch margin is at least P − 1 wide — so a patch that wraps from the margin onto row 0 gets the embedding of
    the top rows it paints, not of the bottom edge it started beside. A patch wholly in the margin writes nothing
    and takes the centre of its rows mirrored into the canvas, as spatial conditions are (``reflect_indices``).
    """

    grid: torch.Tensor  # (R, C, D)
    canvas: tuple[int, int]  # (h, w) of the output canvas in latent px
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # raw (N, D) -> model input (the standardiser)

    def __post_init__(self):
        if self.grid.ndim != 3:
            raise HistosynthError(f"an embedding grid is (rows, cols, width); got shape {tuple(self.grid.shape)}")
        if not torch.isfinite(self.grid).all():
            raise HistosynthError("the embedding grid holds NaN or infinite values")
        self.grid = self.grid.detach().float().cpu()
        self._cache: dict[tuple[int, int, int, int], torch.Tensor] = {}  # windows recur across steps

    @property
    def dim(self) -> int:
        return int(self.grid.shape[-1])

    def at(self, y: float, x: float) -> torch.Tensor:
        """The embedding at canvas position (y, x) in latent px (1, D)."""
        (h, w), (rows, cols) = self.canvas, self.grid.shape[:2]
        gy = torch.tensor([y * rows / h - 0.5], dtype=torch.float64)
        gx = torch.tensor([x * cols / w - 0.5], dtype=torch.float64)
        return self._condition(interpolate_grid(self.grid, gy, gx).float())  # (1, D)

    def _condition(self, raw: torch.Tensor) -> torch.Tensor:
        if self.transform is None:
            return raw
        with torch.no_grad():
            return self.transform(raw).float()

    def crop(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The embedding of the patch covering working-canvas ``rows`` × ``cols`` (1, D)."""
        key = (int(rows[0]), len(rows), int(cols[0]), len(cols))
        if key not in self._cache:
            (h, w), (n_rows, n_cols) = self.canvas, self.grid.shape[:2]
            # Integer arithmetic up to one division, so a patch centred on a node gets the node bit for bit.
            gy = torch.tensor([_written_span(rows, h) * n_rows - h], dtype=torch.float64) / (2 * h)
            gx = torch.tensor([_written_span(cols, w) * n_cols - w], dtype=torch.float64) / (2 * w)
            self._cache[key] = self._condition(interpolate_grid(self.grid, gy, gx).float())  # (1, D)
        return self._cache[key]

    def to(self, *_args, **_kwargs) -> "EmbeddingGrid":
        return self


def _written_span(indices: torch.Tensor, size: int) -> int:
    """Twice the centre (first + last + 1) of the output indices (< ``size``) a patch's working-canvas ``indices``
    write; for a patch wholly in the margin, of its indices mirrored into 0..size-1."""
    written = indices[indices < size]
    if len(written) == 0:
        mirrored = indices % (2 * size)
        written = torch.where(mirrored < size, mirrored, 2 * size - 1 - mirrored)
    return int(written.min()) + int(written.max()) + 1


def normalize_embeddings(vectors: torch.Tensor) -> torch.Tensor:
    """Unit-length embeddings (..., D); zero vectors stay zero."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class EmbeddingStandardizer(ModelMixin, ConfigMixin):
    """Raw SSL embeddings (B, D) -> the denoiser's condition: optionally unit length, then standardised per
    dimension with the training patches' mean and std, so every encoder's embeddings reach the projection at unit
    scale. Zero (the dataset's mean embedding) is not used as a value: the null is the zero *output*, which the
    objective and the guidance wrapper set directly. Saved in the image model as the ``embedding_encoder``
    component (no trainable parameters)."""

    @register_to_config
    def __init__(self, dim: int, normalize: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, raw: torch.Tensor) -> "EmbeddingStandardizer":
        """Measure mean and std on raw embeddings (N, D)."""
        x = normalize_embeddings(raw.float()) if self.config.normalize else raw.float()
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(self.std))
        return self

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        x = normalize_embeddings(raw) if self.config.normalize else raw
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # (B, D)


# ===================================================================================================== encoders


class SSLEncoder(ModelMixin, ConfigMixin):
    """histosynth's own self-supervised encoder (trained by ``histosynth train ssl``): a small residual CNN or any
    timm architecture by name (``arch="timm:resnet18"``), global-average pooled to a ``dim``-wide embedding."""

    @register_to_config
    def __init__(self, arch: str = "cnn", widths: tuple = (32, 64, 128), input_size: int = 64,
                 mean: tuple = (0.5, 0.5, 0.5), std: tuple = (0.5, 0.5, 0.5)):
        super().__init__()
        if arch == "cnn":
            layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                       nn.ReLU(inplace=True)]
            previous = widths[0]
            for width in widths:
                layers.append(_ResidualDown(previous, width))
                previous = width
            self.body = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self._dim = widths[-1]
        elif arch.startswith("timm:"):
            import timm

            self.body = timm.create_model(arch[5:], pretrained=False, num_classes=0)
            self.pool = nn.Identity()
            self._dim = int(self.body.num_features)
        else:
            raise HistosynthError(f"unknown SSL encoder architecture '{arch}'; use 'cnn' or 'timm:NAME'")

    @property
    def dim(self) -> int:
        return self._dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> embeddings (B, D)."""
        return self.pool(self.body(x)).flatten(1)  # (B, D)


class _ResidualDown(nn.Module):
    """Two 3×3 convolutions with a strided shortcut: halves the resolution."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.main(x) + self.skip(x))


@dataclass
class Encoder:
    """A loaded, frozen feature extractor with its preprocessing: images in [-1, 1] (B, 3, H, W) -> (B, D)."""

    id: str  # canonical id: a hub id, or the absolute path of a local folder
    network: nn.Module  # normalised (B, 3, S, S) -> (B, D)
    dim: int
    input_size: int
    mean: tuple
    std: tuple
    weights_hash: str
    device: str = "cpu"
    description: str = ""

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (B, 3, H, W) -> resized, normalised (B, 3, S, S) on the encoder's device."""
        x = (images.float().to(self.device) + 1) / 2  # (B, 3, H, W) in [0, 1]
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        mean = torch.tensor(self.mean, device=x.device)[None, :, None, None]
        std = torch.tensor(self.std, device=x.device)[None, :, None, None]
        return (x - mean) / std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.preprocess(images)).float().cpu()  # (B, D)

    def embed_uint8(self, batch: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, D) float64 (the evaluation FeatureFn signature)."""
        images = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return self(images).double().numpy()


@dataclass(frozen=True)
class HubEncoder:
    """A named encoder on the Hugging Face Hub: which library builds it, its preprocessing and width."""

    repo: str  # "hf-hub:ORG/NAME" for timm, "ORG/NAME" for transformers
    library: str  # "timm" or "transformers"
    dim: int
    input_size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    kwargs: dict = field(default_factory=dict)
    description: str = ""


# Named pathology foundation models (their model cards give these settings).
KNOWN_ENCODERS: dict[str, HubEncoder] = {
    "uni": HubEncoder("hf-hub:MahmoodLab/uni", "timm", 1024, kwargs={"init_values": 1e-5, "dynamic_img_size": True},
                      description="UNI ViT-L/16 (Chen et al. 2024); gated, needs an accepted licence"),
    "lunit-dino": HubEncoder("hf-hub:1aurent/vit_small_patch8_224.lunit_dino", "timm", 384,
                             mean=(0.70322989, 0.53606487, 0.66096631), std=(0.21716536, 0.26081574, 0.20723464),
                             description="Lunit DINO ViT-S/8 (Kang et al. 2023)"),
    "h-optimus-0": HubEncoder("hf-hub:bioptimus/H-optimus-0", "timm", 1536,
                              mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
                              kwargs={"init_values": 1e-5, "dynamic_img_size": False},
                              description="H-optimus-0 ViT-g/14 (Bioptimus 2024); gated"),
    "phikon": HubEncoder("owkin/phikon", "transformers", 768, description="Phikon ViT-B/16 iBOT (Filiot et al. 2023)"),
}
for _name, _spec in list(KNOWN_ENCODERS.items()):
    KNOWN_ENCODERS.setdefault(_spec.repo, _spec)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> str | None:
    """The Hugging Face cache, read from the environment at call time (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _hub_snapshot(encoder_id: str, repo: str) -> Path:
    """The local snapshot folder of hub repo ``repo`` (from the cache; downloaded when online)."""
    from huggingface_hub import snapshot_download

    offline = _offline()
    cache = hub_cache_dir()
    try:
        path = snapshot_download(repo, cache_dir=cache, local_files_only=offline,
                                 allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"])
    except Exception as error:  # offline, unreachable, gated or missing: all end the same way for the user
        where = cache or "the default Hugging Face cache (~/.cache/huggingface/hub)"
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hub could not be reached ({type(error).__name__})"
        raise HistosynthError(
            f"could not load the weights of encoder '{encoder_id}': they are not in {where} and {why}; download "
            f"them once where the Hub is reachable (`hf download {repo}`, gated models need an accepted licence and "
            "a token) and copy that cache here (or set HF_HOME / HF_HUB_CACHE), or pass --encoder PATH to a local "
            "folder with config.json and model.safetensors") from None
    return Path(path)


def _weights_hash(files: list[Path]) -> str:
    """SHA-256 over weight files (names and bytes); a Hugging Face cache blob is already named by its SHA-256."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(path.name.encode())
        blob = path.resolve().name
        if re.fullmatch(r"[0-9a-f]{64}", blob):
            digest.update(blob.encode())
            continue
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _weight_files(folder: Path, allow_pickles: bool) -> list[Path]:
    safe = sorted(folder.glob("*.safetensors"))
    if safe:
        return safe
    pickles = sorted(p for p in folder.glob("*") if p.suffix in (".bin", ".pth", ".pt", ".ckpt"))
    if pickles and allow_pickles:
        return pickles
    if pickles:
        raise HistosynthError(f"{folder}: only safetensors weights are loaded from local folders; convert "
                              f"{pickles[0].name} to model.safetensors")
    raise HistosynthError(f"{folder}: no weights (model.safetensors) in this folder")


def _timm_encoder(encoder_id: str, folder: Path, spec: HubEncoder | None, device: str, hub: bool) -> Encoder:
    import timm

    files = _weight_files(folder, allow_pickles=hub)  # hub .bin files are read by timm with weights_only=True
    kwargs = dict(spec.kwargs) if spec else {}
    try:
        network = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0, **kwargs)
    except Exception as error:
        raise HistosynthError(f"{folder}: cannot build the timm encoder ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if spec is not None:
        size, mean, std = spec.input_size, spec.mean, spec.std
    else:
        data = timm.data.resolve_data_config({}, model=network)
        size, mean, std = int(data["input_size"][-1]), tuple(data["mean"]), tuple(data["std"])
    return Encoder(encoder_id, network.to(device).eval(), int(network.num_features), size, tuple(mean), tuple(std),
                   _weights_hash(files), device, spec.description if spec else "timm model")


class _ClsToken(nn.Module):
    """A transformers ViT as an encoder: the class token of the last hidden state (Phikon's documented usage)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, 0]  # (B, D)


def _transformers_encoder(encoder_id: str, folder: Path, spec: HubEncoder | None, device: str, hub: bool) -> Encoder:
    from transformers import AutoModel

    files = _weight_files(folder, allow_pickles=False)
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report lists the unused pooler; we take the CLS token
    try:
        try:
            model = AutoModel.from_pretrained(str(folder), use_safetensors=True, add_pooling_layer=False)
        except TypeError:  # a model class without a pooler option
            model = AutoModel.from_pretrained(str(folder), use_safetensors=True)
    except Exception as error:
        raise HistosynthError(f"{folder}: cannot build the transformers encoder ({type(error).__name__})") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    size, mean, std = int(getattr(model.config, "image_size", 224)), IMAGENET_MEAN, IMAGENET_STD
    processor = folder / "preprocessor_config.json"
    if spec is not None:
        size, mean, std = spec.input_size, spec.mean, spec.std
    elif processor.is_file():
        settings = json.loads(processor.read_text())
        size_value = settings.get("size", size)
        size = int(size_value.get("height", size_value.get("shortest_edge", 224)) if isinstance(size_value, dict)
                   else size_value)
        mean, std = tuple(settings.get("image_mean", mean)), tuple(settings.get("image_std", std))
    network = _ClsToken(model).to(device).eval()
    return Encoder(encoder_id, network, int(model.config.hidden_size), size, tuple(mean), tuple(std),
                   _weights_hash(files), device, spec.description if spec else "transformers model")


def folder_hash(folder: Path) -> str:
    """SHA-256 over a folder's safetensors files (names and bytes), as ``models.bundle.file_hash``."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_ssl_encoder(folder: Path) -> SSLEncoder:
    """The ``SSLEncoder`` of a folder written by ``histosynth train ssl`` (safetensors only)."""
    for path in folder.rglob("*"):
        if path.suffix in (".bin", ".pth", ".pt", ".ckpt", ".pkl"):
            raise HistosynthError(f"{path}: pickle-based weights are not loaded; convert them to safetensors")
    try:
        return SSLEncoder.from_pretrained(folder / ENCODER_COMPONENT, use_safetensors=True).eval()
    except (OSError, ValueError) as error:
        raise HistosynthError(f"{folder}: cannot load the SSL encoder ({str(error).splitlines()[0]})") from None


def _histosynth_encoder(folder: Path, device: str) -> Encoder:
    config = json.loads((folder / ENCODER_FILE).read_text())
    if config.get("kind") != "encoder":
        raise HistosynthError(f"{folder}: a histosynth {config.get('kind')} model, not an encoder "
                              "(train one with `histosynth train ssl`)")
    network = load_ssl_encoder(folder)
    cfg = network.config
    return Encoder(str(folder.resolve()), network.to(device), network.dim, int(cfg.input_size), tuple(cfg.mean),
                   tuple(cfg.std), folder_hash(folder), device, "histosynth self-supervised encoder")


def encoder_names() -> list[str]:
    """Short names of the known hub encoders."""
    return [name for name, spec in KNOWN_ENCODERS.items() if not name.startswith("hf-hub:") and name != spec.repo]


def describe_encoders() -> str:
    """One line per accepted kind of encoder id, for help texts and errors."""
    return ("known ids: " + ", ".join(encoder_names()) + "; or hf-hub:ORG/NAME (timm), ORG/NAME (transformers), "
            "or a local folder (histosynth train ssl output, or config.json + model.safetensors)")


def load_encoder(encoder_id: str, device: str = "cpu") -> Encoder:
    """Build the encoder named by ``encoder_id``: a known name (``uni``, ``phikon``, ``lunit-dino``,
    ``h-optimus-0``), a timm ``hf-hub:ORG/NAME`` id, a transformers ``ORG/NAME`` id, or a local folder."""
    text = str(encoder_id).strip()
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise HistosynthError(f"{local}: an encoder is a folder (config.json + model.safetensors, or the "
                                  "output of `histosynth train ssl`), not a single file")
        folder = local.resolve()
        if (folder / ENCODER_FILE).is_file():
            return _histosynth_encoder(folder, device)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise HistosynthError(f"{folder}: not an encoder folder (no config.json or {ENCODER_FILE})")
        config = json.loads(config_file.read_text())
        if "architecture" in config:
            return _timm_encoder(str(folder), folder, None, device, hub=False)
        if "model_type" in config:
            return _transformers_encoder(str(folder), folder, None, device, hub=False)
        raise HistosynthError(f"{config_file}: neither a timm config (architecture) nor a transformers one "
                              "(model_type)")
    spec = KNOWN_ENCODERS.get(text) or KNOWN_ENCODERS.get(text.lower())
    if spec is not None:
        repo = spec.repo
    elif text.startswith("hf-hub:") and "/" in text:
        repo = text
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        repo = text  # a transformers id
    else:
        raise HistosynthError(f"unknown encoder '{text}' (not a folder either); {describe_encoders()}")
    library = spec.library if spec else ("timm" if repo.startswith("hf-hub:") else "transformers")
    folder = _hub_snapshot(text, repo.removeprefix("hf-hub:"))
    build = _timm_encoder if library == "timm" else _transformers_encoder
    return build(repo, folder, spec, device, hub=True)


# ================================================================================================== extraction


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The dihedral transform k of the last two dims, as ``train.tasks.dihedral`` (rot90 k%4, then flip if k≥4)."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def embed_images(encoder: Encoder | Callable, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Embeddings (N, D) of images (N, 3, H, W) in [-1, 1], in batches."""
    return torch.cat([encoder(chunk) for chunk in images.split(batch_size)]) if len(images) else torch.empty(0)


@dataclass
class EmbeddingCache:
    """Embeddings of every patch of a dataset: ``embeddings`` (N, V, D), V = 1 (original) or 8 (every dihedral
    transform k, in ``train.tasks.dihedral`` order), rows in the order of ``images``."""

    path: Path
    embeddings: torch.Tensor
    images: list[str]
    encoder: str
    weights_hash: str

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[-1])

    @property
    def views(self) -> int:
        return int(self.embeddings.shape[1])

    def rows(self, images: list[str]) -> torch.Tensor:
        """Row indices of the given image paths; a path the cache lacks is an error (the dataset changed)."""
        where = {name: i for i, name in enumerate(self.images)}
        missing = [name for name in images if name not in where]
        if missing:
            raise HistosynthError(f"{self.path}: no embedding for {missing[0]} (the dataset changed since "
                                  "`histosynth embed`; run it again)")
        return torch.tensor([where[name] for name in images], dtype=torch.long)

    def check_encoder(self, encoder_id: str, weights_hash: str | None = None) -> None:
        """Refuse a cache made by another encoder (id or weights)."""
        if encoder_id != self.encoder or (weights_hash is not None and weights_hash != self.weights_hash):
            raise HistosynthError(f"{self.path}: these embeddings were made by encoder '{self.encoder}' "
                                  f"(weights {self.weights_hash[:12]}), not '{encoder_id}'"
                                  + (f" (weights {weights_hash[:12]})" if weights_hash else "")
                                  + "; run `histosynth embed` with this encoder")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text.removeprefix("hf-hub:")).strip("-")[-48:] or "encoder"


def cache_path(data: str | Path, encoder: Encoder) -> Path:
    """Where ``histosynth embed`` keeps a dataset's embeddings: keyed by encoder id and weights hash."""
    key = hashlib.sha256(f"{encoder.id}\n{encoder.weights_hash}".encode()).hexdigest()[:16]
    return Path(data) / CACHE_DIR / f"{_slug(Path(encoder.id).name if Path(encoder.id).is_absolute() else encoder.id)}-{key}.safetensors"


def load_cache(path: str | Path) -> EmbeddingCache:
    """Read an embeddings file written by ``histosynth embed``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise HistosynthError(f"{path}: embeddings file not found (write it with `histosynth embed`)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            embeddings = handle.get_tensor("embeddings")
    except Exception as error:
        raise HistosynthError(f"{path}: not a readable embeddings file ({type(error).__name__})") from None
    if meta.get("format") != "histosynth-embeddings":
        raise HistosynthError(f"{path}: not a histosynth embeddings file")
    return EmbeddingCache(path, embeddings, json.loads(meta["images"]), meta["encoder"], meta["weights_hash"])


def embed_dataset(data: str | Path, encoder: Encoder, batch_size: int = 64, dihedral_views: bool = False,
                  progress: Callable[[int, int], None] | None = None, force: bool = False) -> tuple[Path, bool]:
    """Embed every patch of a dataset (all splits) and cache the result; returns (path, computed).

    An existing cache of the same encoder id and weights, covering the same patches (and views), is reused.
    """
    from safetensors.torch import save_file

    from histosynth.data.dataset import load_dataset_index
    from histosynth.data.dataset import _read_png  # one PNG reader for the whole project
    from histosynth.io.atomic import atomic_path

    index = load_dataset_index(data)
    images = [p["image"] for p in index["patches"]]
    if not images:
        raise HistosynthError(f"{data}: the dataset has no patches")
    views = 8 if dihedral_views else 1
    path = cache_path(data, encoder)
    if path.exists() and not force:
        try:
            cached = load_cache(path)
            cached.check_encoder(encoder.id, encoder.weights_hash)
            if cached.images == images and cached.views >= views:
                return path, False
        except HistosynthError:
            pass
    rows = []
    for start in range(0, len(images), batch_size):
        names = images[start:start + batch_size]
        batch = torch.stack([torch.from_numpy(np.array(_read_png(Path(data) / name)[..., :3]))
                             for name in names]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
        per_view = [encoder(dihedral(batch, k)) for k in range(views)]  # [(B, D)]
        rows.append(torch.stack(per_view, dim=1))  # (B, V, D)
        if progress is not None:
            progress(min(start + batch_size, len(images)), len(images))
    embeddings = torch.cat(rows).contiguous()  # (N, V, D)
    meta = {"format": "histosynth-embeddings", "version": str(CACHE_VERSION), "encoder": encoder.id,
            "weights_hash": encoder.weights_hash, "dim": str(encoder.dim), "views": str(views),
            "images": json.dumps(images)}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({"embeddings": embeddings}, str(tmp), metadata=meta)
    return path, True


def resolve_embeddings(data: str | Path, spec: str, device: str = "cpu") -> EmbeddingCache:
    """``--embeddings``: an embeddings file, or an encoder id whose cache in ``data`` is used (never another
    encoder's)."""
    path = Path(spec)
    if path.is_file():
        return load_cache(path)
    encoder = load_encoder(spec, device)
    found = cache_path(data, encoder)
    if not found.exists():
        raise HistosynthError(f"{data}: no embeddings of encoder '{encoder.id}' yet; run "
                              f"`histosynth embed --data {data} --encoder {spec}` first")
    cache = load_cache(found)
    cache.check_encoder(encoder.id, encoder.weights_hash)
    return cache


# ================================================================================================== training


class EmbeddingSource:
    """The ``embedding`` condition of ``ImageTask``: each training patch's cached embedding (of the same dihedral
    transform when the cache has all eight, else of the original), standardised by ``encoder``; dropped to the
    zero vector (the null) with probability ``dropout``."""

    name = "embedding"

    def __init__(self, cache: EmbeddingCache, data: str | Path, dropout: float = 0.1, normalize: bool = False):
        from histosynth.data.dataset import load_dataset_index

        if not 0 <= dropout < 1:
            raise HistosynthError(f"embedding dropout must be in [0, 1), got {dropout}")
        train = [p["image"] for p in load_dataset_index(data)["patches"] if p["split"] == "train"]
        if not train:
            raise HistosynthError(f"{data}: no training patches")
        self.table = cache.embeddings[cache.rows(train)].float()  # (N_train, V, D) raw
        self.dim = cache.dim
        # Applied inside the objective and saved with the model; it has buffers only, so nothing trains.
        self.encoder = EmbeddingStandardizer(cache.dim, normalize).fit(self.table.reshape(-1, cache.dim))
        self.dropout = dropout
        self.bundle_settings = {"embedding_encoder": cache.encoder, "embedding_weights_hash": cache.weights_hash,
                                "embedding_normalize": bool(normalize), "embedding_views": cache.views}

    def draw(self, index: int, item: dict, k: int, generator: torch.Generator) -> torch.Tensor:
        return self.table[index, k if self.table.shape[1] == 8 else 0]  # (D,)

    def collate(self, values: list) -> torch.Tensor:
        return torch.stack(values)  # (B, D)


# =========================================================================================== evaluation features


FEATURE_SPACES = ("embedding", "uni", "phikon", "lunit-dino", "h-optimus-0")


def feature_extractor(name: str, device: str = "cpu", weights=None, **_) -> Callable[[np.ndarray], np.ndarray]:
    """The evaluation FeatureFn ``(B, H, W, 3) uint8 -> (B, D)`` of an encoder feature space (registered in
    ``eval.features``): ``embedding`` takes the encoder id or folder as ``weights`` (or from
    ``HISTOSYNTH_EMBEDDING_ENCODER``); a named hub encoder takes an optional local folder of it as ``weights``."""
    if name == "embedding":
        encoder_id = str(weights) if weights is not None else os.environ.get("HISTOSYNTH_EMBEDDING_ENCODER")
        if not encoder_id:
            raise HistosynthError("the 'embedding' feature space needs an encoder: pass its id or folder as the "
                                  "weights, or set HISTOSYNTH_EMBEDDING_ENCODER")
    else:
        encoder_id = str(weights) if weights is not None else KNOWN_ENCODERS[name].repo
    encoder = load_encoder(encoder_id, device)

    def features(batch: np.ndarray) -> np.ndarray:
        return encoder.embed_uint8(batch)  # (B, D)

    features.feature_names = [f"{name}_{i}" for i in range(encoder.dim)]  # type: ignore[attr-defined]
    return features
