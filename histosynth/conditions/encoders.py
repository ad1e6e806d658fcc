"""The encoder registry of SSL-embedding conditioning: timm ``hf-hub:`` ids, transformers ids, local safetensors
folders and histosynth's own self-supervised ``SSLEncoder``, each with its preprocessing and embedding width.

Nothing here downloads at import; hub weights are fetched only by ``load_encoder`` and only when the Hugging Face
Hub is reachable and ``HF_HUB_OFFLINE`` is not set.
"""
from __future__ import annotations

import hashlib
import json
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
from histosynth.pixels import from_uint8

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_FILE = "histosynth.json"
ENCODER_COMPONENT = "ssl_encoder"


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
        images = from_uint8(batch)
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


def embed_images(encoder: Encoder | Callable, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Embeddings (N, D) of images (N, 3, H, W) in [-1, 1], in batches."""
    return torch.cat([encoder(chunk) for chunk in images.split(batch_size)]) if len(images) else torch.empty(0)
