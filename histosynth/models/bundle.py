"""A saved model folder (design.md §6): ``histosynth.json``, one diffusers ``save_pretrained`` sub-folder per
component (config JSON + safetensors), a ``scheduler/`` config and a ``README.md`` model card."""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

import histosynth
from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_dir
from histosynth.models.autoencoder import downsampling_factor, latent_scale, refuse_pickles
from histosynth.models.denoiser import ConditionedDenoiser, GlobalProjection, make_sampling_scheduler

BUNDLE_FILE = "histosynth.json"
# Sub-folder name -> diffusers class; condition encoders register themselves with ``register_component``.
COMPONENT_CLASSES = {"autoencoder": AutoencoderKL, "unet": UNet2DModel, "global_projection": GlobalProjection}


def register_component(name: str, cls) -> None:
    """Let bundles hold a new kind of component (a diffusers ModelMixin saved with ``save_pretrained``)."""
    COMPONENT_CLASSES[name] = cls


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
    def latent_patch(self) -> int:
        """Side of the denoiser's training patch in its own (latent or mask) pixels."""
        return int(self.config["latent_patch"])

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
    config = dict(config, version=histosynth.__version__, components=sorted(components))
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


def load_bundle(path: str | Path, device: str | None = None) -> Bundle:
    """Rebuild a saved model from its folder; only safetensors are read, a folder with pickles is refused."""
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
    components = {}
    if "style_encoder" in config.get("components", []):
        import histosynth.conditions.style  # noqa: F401  (registers the style_encoder component)
    if {"prior", "ssl_encoder", "embedding_encoder"} & set(config.get("components", [])):
        import histosynth.models.prior  # noqa: F401  (registers the prior, ssl_encoder, embedding_encoder)
    for name in config.get("components", []):
        cls = COMPONENT_CLASSES.get(name)
        if cls is None:
            raise HistosynthError(f"{path}: unknown component '{name}' in {BUNDLE_FILE}")
        try:
            # float32 whatever the stored dtype: float16 weights are a storage format, CPUs compute in float32.
            model = cls.from_pretrained(path / name, use_safetensors=True, torch_dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise HistosynthError(f"{path / name}: cannot load {name} ({str(error).splitlines()[0]})") from error
        components[name] = model.to(device).eval() if device else model.eval()
    scheduler_config = {}
    if (path / "scheduler" / "scheduler_config.json").exists():
        scheduler_config = dict(DDPMScheduler.load_config(path / "scheduler"))
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
