"""A saved model folder (design.md §6): ``histosynth.json``, one diffusers ``save_pretrained`` sub-folder per
component (config JSON + safetensors), a ``scheduler/`` config and a ``README.md`` model card."""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

from histosynth.conditions.embedding import EmbeddingStandardizer
from histosynth.conditions.encoders import ENCODER_COMPONENT, SSLEncoder
from histosynth.conditions.style import NAME as STYLE, StyleEncoder
from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_dir
from histosynth.models.autoencoder import downsampling_factor, latent_scale, refuse_pickles
from histosynth.models.denoiser import ConditionedDenoiser, GlobalProjection, make_sampling_scheduler
from histosynth.models.prior import EmbeddingPrior
from histosynth.version import __version__

BUNDLE_FILE = "histosynth.json"
# Sub-folder name -> the diffusers ModelMixin class saved there with ``save_pretrained``.
COMPONENT_CLASSES = {"autoencoder": AutoencoderKL, "unet": UNet2DModel, "global_projection": GlobalProjection,
                     f"{STYLE}_encoder": StyleEncoder, ENCODER_COMPONENT: SSLEncoder,
                     "embedding_encoder": EmbeddingStandardizer, "prior": EmbeddingPrior}


@dataclass
class Bundle:
    """A loaded model folder: its settings and its diffusers components."""

    config: dict
    components: dict = field(default_factory=dict)
    scheduler_config: dict = field(default_factory=dict)
    path: Path | None = None
    model_hash: str = ""

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def classes(self) -> list[dict]:
        return self.config.get("classes", [])

    @property
    def num_classes(self) -> int:
        return int(self.config.get("num_classes", 0))

    @property
    def autoencoder(self) -> AutoencoderKL | None:
        return self.components.get("autoencoder")

    @property
    def unet(self) -> UNet2DModel | None:
        return self.components.get("unet")

    @property
    def latent_factor(self) -> int:
        """Image pixels per denoiser pixel: the VAE factor for image models, the mask downsampling for mask models."""
        return int(self.config.get("latent_factor", 1))

    @property
    def min_region_um2(self) -> float:
        """Smallest region (µm²) a mask model's layouts keep: that of the labels it learned (0: no rule)."""
        return float(self.config.get("min_region_um2", 0.0))

    @property
    def latent_patch(self) -> int:
        """Side of the denoiser's training patch in its own (latent or mask) pixels."""
        return int(self.config["latent_patch"])

    @property
    def lattice(self) -> int:
        """Latent px of the UNet's down-sampling grid: 2 to the number of its stride-2 down-samplings."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def context_step(self) -> int:
        """Context around a patch must come in multiples of this (latent px), so that the widened window still
        halves evenly at every down-sampling of the UNet."""
        return max(1, self.lattice // 2)

    @property
    def default_context(self) -> int:
        """Latent px of canvas each patch is evaluated with on every side when none is asked for: a quarter patch,
        rounded down to ``context_step`` (README, "Seams": what a patch's borders imprint)."""
        return self.latent_patch // 4 // self.context_step * self.context_step

    def denoiser(self) -> ConditionedDenoiser:
        """The UNet with its conditioning, ready for samplers."""
        unet = self.unet
        channels = unet.config.out_channels
        mask_channels = self.num_classes if self.config.get("conditioning", {}).get("mask") else 0
        return ConditionedDenoiser(unet, channels, mask_channels, self.components.get("global_projection")).eval()

    def sampling_scheduler(self, name: str = "dpm++sde"):
        return make_sampling_scheduler(name, self.scheduler_config)


def file_hash(folder: Path) -> str:
    """SHA-256 over the bundle's safetensors files (names and bytes): the model's identity in provenance."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


WEIGHTS_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def save_bundle(out: str | Path, config: dict, components: dict, scheduler: DDPMScheduler | None,
                card: str, overwrite: bool = False, extra_files: dict[str, str] | None = None,
                weights_dtype: str = "float32") -> Path:
    """Write a model folder atomically; ``components`` maps sub-folder names to diffusers models, stored as
    ``weights_dtype`` (float16 halves the folder; loading always computes in float32)."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise HistosynthError(f"weights dtype must be one of {', '.join(WEIGHTS_DTYPES)}, not '{weights_dtype}'")
    out = Path(out)
    config = dict(config, version=__version__, components=sorted(components))
    if weights_dtype != "float32":
        config["weights_dtype"] = weights_dtype
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name, model in components.items():
            if weights_dtype != "float32":
                model = copy.deepcopy(model).to(WEIGHTS_DTYPES[weights_dtype])  # the caller keeps its float32 copy
            model.save_pretrained(tmp / name, safe_serialization=True)
        if scheduler is not None:
            scheduler.save_pretrained(tmp / "scheduler")
        (tmp / BUNDLE_FILE).write_text(json.dumps(config, indent=2))
        (tmp / "README.md").write_text(card)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


# Kinds of model folder and the fields of ``histosynth.json`` each needs (name -> accepted types); a tampered or
# hand-edited file fails here with one line instead of deep inside sampling, or worse, not at all.
_NUMBER, _WHOLE = (int, float), (int,)
REQUIRED_FIELDS = {
    "image": {"mpp": _NUMBER, "patch_size": _WHOLE, "latent_factor": _WHOLE, "latent_patch": _WHOLE,
              "num_classes": _WHOLE, "classes": (list,)},
    "mask": {"mpp": _NUMBER, "patch_size": _WHOLE, "latent_factor": _WHOLE, "latent_patch": _WHOLE,
             "num_classes": _WHOLE, "classes": (list,)},
    "autoencoder": {"mpp": _NUMBER, "patch_size": _WHOLE, "latent_factor": _WHOLE},
    "encoder": {},
    "prior": {},
}
REQUIRED_COMPONENTS = {"image": ("autoencoder", "unet"), "mask": ("unet",), "autoencoder": ("autoencoder",)}
KIND_NAMES = {"image": "an image model", "mask": "a mask model", "autoencoder": "an autoencoder",
              "encoder": "an SSL encoder", "prior": "an embedding prior"}


def _check_config(file: Path, config) -> None:
    """Refuse a ``histosynth.json`` whose structure the code cannot rely on, naming the first problem."""
    if not isinstance(config, dict):
        raise HistosynthError(f"{file}: expected a JSON object, found {type(config).__name__}")
    kind = config.get("kind")
    if kind not in REQUIRED_FIELDS:
        found = "no 'kind'" if kind is None else f"kind {kind!r}"
        raise HistosynthError(f"{file}: {found}; a model folder is one of: {', '.join(REQUIRED_FIELDS)}")
    components = config.get("components", [])
    if not isinstance(components, list) or not all(isinstance(c, str) for c in components):
        raise HistosynthError(f"{file}: 'components' must be a list of folder names")
    for name in REQUIRED_COMPONENTS.get(kind, ()):
        if name not in components:
            raise HistosynthError(f"{file}: {KIND_NAMES[kind]} needs the component '{name}', the folder lists "
                                  f"{', '.join(components) or 'none'}")
    for key, types in REQUIRED_FIELDS[kind].items():
        if key not in config:
            raise HistosynthError(f"{file}: '{key}' is missing")
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = "a list" if types == (list,) else "a whole number" if types == _WHOLE else "a number"
            raise HistosynthError(f"{file}: '{key}' must be {expected}, found {value!r}")
        if types != (list,) and not (math.isfinite(value) and value > 0) and key != "num_classes":
            raise HistosynthError(f"{file}: '{key}' must be positive, found {value!r}")
    if "conditioning" in config and not isinstance(config["conditioning"], dict):
        raise HistosynthError(f"{file}: 'conditioning' must be an object")
    if kind in ("image", "mask"):
        _check_classes(file, config)
        if config["latent_patch"] * config["latent_factor"] != config["patch_size"]:
            raise HistosynthError(f"{file}: patch_size {config['patch_size']} is not latent_patch "
                                  f"{config['latent_patch']} × latent_factor {config['latent_factor']}")


def _check_classes(file: Path, config: dict) -> None:
    ids = []
    for entry in config["classes"]:
        if not isinstance(entry, dict) or isinstance(entry.get("id"), bool) or not isinstance(entry.get("id"), int) \
                or not 0 <= entry["id"] <= 255 or not isinstance(entry.get("name", ""), str):
            raise HistosynthError(f"{file}: each class must be {{\"id\": 0-255, \"name\": text}}, found {entry!r}")
        color = entry.get("color", [0, 0, 0])
        if not (isinstance(color, str) and len(color.lstrip("#")) == 6 or isinstance(color, list) and len(color) >= 3
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in color[:3])):
            raise HistosynthError(f"{file}: class {entry['id']} colour must be [r, g, b] or \"#rrggbb\", found "
                                  f"{color!r}")
        ids.append(entry["id"])
    if config["num_classes"] != max((i for i in ids if i != 0), default=0):
        raise HistosynthError(f"{file}: num_classes is {config['num_classes']} but the classes go up to id "
                              f"{max(ids, default=0)}")


def _check_channels(path: Path, config: dict, components: dict) -> None:
    """The UNet's channels must match the classes and latents the folder says it has."""
    unet = components.get("unet")
    if unet is None or config["kind"] not in ("image", "mask"):
        return
    kind, classes = config["kind"], config["num_classes"]
    if kind == "mask":
        expected_in = expected_out = classes
    else:
        expected_out = components["autoencoder"].config.latent_channels
        expected_in = expected_out + (classes if config.get("conditioning", {}).get("mask") else 0)
    if (unet.config.in_channels, unet.config.out_channels) != (expected_in, expected_out):
        raise HistosynthError(f"{path / 'unet'}: {unet.config.in_channels} input / {unet.config.out_channels} "
                              f"output channels, but {BUNDLE_FILE} implies {expected_in} / {expected_out} "
                              f"({classes} classes)")


def _check_weights(folder: Path, model) -> None:
    """Every parameter the model has must come from the files (diffusers would silently initialise missing ones
    at random) and be finite (NaN weights make every output NaN)."""
    from safetensors import safe_open

    stored: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            stored |= set(handle.keys())
    state = model.state_dict()
    missing = sorted(set(state) - stored)
    if missing:
        raise HistosynthError(f"{folder}: the weights lack {len(missing)} tensor(s), e.g. '{missing[0]}' "
                              "(an incomplete or mismatched safetensors file)")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise HistosynthError(f"{folder}: weight '{name}' holds NaN or infinite values; the model is broken")


def load_bundle(path: str | Path, device: str | None = None, kind: str | None = None) -> Bundle:
    """Rebuild a saved model from its folder; only safetensors are read, a folder with pickles is refused.

    ``kind`` (image, mask, ...): refuse any other kind of folder with one line, before its weights are read.
    The folder's settings, components, channel counts and weights are checked: what is tampered with or
    incomplete is refused with one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise HistosynthError(f"{path}: model folder not found")
    if not (path / BUNDLE_FILE).is_file():
        raise HistosynthError(f"{path}: not a histosynth model folder (no {BUNDLE_FILE})")
    refuse_pickles(path)
    try:
        config = json.loads((path / BUNDLE_FILE).read_text())
    except json.JSONDecodeError as error:
        raise HistosynthError(f"{path / BUNDLE_FILE}: broken JSON ({error.msg} at line {error.lineno})") from error
    except UnicodeDecodeError:
        raise HistosynthError(f"{path / BUNDLE_FILE}: not a text file") from None
    _check_config(path / BUNDLE_FILE, config)
    if kind is not None and config["kind"] != kind:
        raise HistosynthError(f"{path}: {KIND_NAMES[config['kind']]}, not {KIND_NAMES[kind]}")
    components = {}
    from diffusers.utils import logging as diffusers_logging

    for name in config.get("components", []):
        cls = COMPONENT_CLASSES.get(name)
        if cls is None:
            raise HistosynthError(f"{path}: unknown component '{name}' in {BUNDLE_FILE}")
        if not (path / name).is_dir():
            raise HistosynthError(f"{path / name}: component folder missing")
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # missing weights are our one-line error, not its warning
        try:
            # float32 whatever the stored dtype: float16 weights are a storage format, CPUs compute in float32.
            model = cls.from_pretrained(path / name, use_safetensors=True, torch_dtype=torch.float32)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise HistosynthError(f"{path / name}: cannot load {name} ({reason})") from error
        finally:
            diffusers_logging.set_verbosity(verbosity)
        _check_weights(path / name, model)
        components[name] = model.to(device).eval() if device else model.eval()
    _check_channels(path, config, components)
    scheduler_config = {}
    if (path / "scheduler" / "scheduler_config.json").exists():
        try:
            scheduler_config = dict(DDPMScheduler.load_config(path / "scheduler"))
        except (OSError, ValueError) as error:
            raise HistosynthError(f"{path / 'scheduler'}: cannot read the scheduler config ({error})") from error
    return Bundle(config=config, components=components, scheduler_config=scheduler_config, path=path,
                  model_hash=file_hash(path))


def image_model_config(classes: list[dict], mpp: float, patch_size: int, vae: AutoencoderKL,
                       prediction_type: str, training: dict, data: dict) -> dict:
    """Settings of a mask-conditioned latent image model, as stored in ``histosynth.json``."""
    factor = downsampling_factor(vae)
    return {
        "kind": "image",
        "classes": classes,
        "num_classes": max((c["id"] for c in classes), default=0),
        "mpp": mpp,
        "patch_size": patch_size,
        "latent_factor": factor,
        "latent_patch": patch_size // factor,
        "latent_channels": vae.config.latent_channels,
        "latent_scale": latent_scale(vae),
        "prediction_type": prediction_type,
        "conditioning": {"mask": True},
        "training": training,
        "data": data,
    }


def model_card(title: str, config: dict, training: dict, metrics: dict | None = None, notes: str = "") -> str:
    """A short README.md for a model folder: what it is, its data, its training and its measured figures."""
    lines = [f"# {title}", "", "Made with histosynth. Synthetic images from this model are synthetic data, "
             "not patient data.", "", "## Settings", ""]
    for key in ("kind", "mpp", "patch_size", "latent_factor", "latent_patch", "prediction_type"):
        if key in config:
            lines.append(f"- {key}: {config[key]}")
    if config.get("classes"):
        lines.append("- classes: " + ", ".join(f"{c['id']} {c['name']}" for c in config["classes"]))
    if config.get("data"):
        lines += ["", "## Training data", ""] + [f"- {k}: {v}" for k, v in config["data"].items()]
    lines += ["", "## Training", ""] + [f"- {k}: {v}" for k, v in training.items()]
    if metrics:
        lines += ["", "## Measured", ""] + [f"- {k}: {v}" for k, v in metrics.items()]
    if notes:
        lines += ["", notes]
    lines += ["", "## Intended use", "", "Research on synthetic training data for computational pathology. "
              "Not for diagnosis.", ""]
    return "\n".join(lines)
