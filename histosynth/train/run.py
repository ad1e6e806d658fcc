"""Train each model from a dataset folder and save it as a model folder (what ``histosynth train`` calls)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from histosynth.data.dataset import PatchDataset, load_dataset_index
from histosynth.checks import finite_number, fraction, one_of, whole_number
from histosynth.errors import HistosynthError
from histosynth.io.paths import check_outputs
from histosynth.models.autoencoder import (
    build_autoencoder,
    downsampling_factor,
    latent_scale,
    load_autoencoder,
    measure_latent_scale,
    psnr,
    reconstruct,
)
from histosynth.models.bundle import image_model_config, model_card, save_bundle
from histosynth.models.denoiser import (
    ConditionedDenoiser,
    DiffusionObjective,
    GlobalProjection,
    build_unet,
    make_train_scheduler,
    time_embedding_width,
)
from histosynth.train.tasks import AutoencoderTask, ConditionSource, ImageTask, MaskTask, trainable_parameters
from histosynth.train.trainer import Callback, TrainConfig, Trainer, checkpoints


def work_dir_for(out: str | Path) -> Path:
    """Checkpoints, loss curve and previews live beside the model folder, which is written only at the end."""
    out = Path(out)
    return out.parent / f"{out.name}.train"


def _check_out(out: Path, resume: bool, inputs: dict | None = None) -> None:
    """The model folder must be new, and not an input; ``OUT.train/`` is continued only with --resume."""
    check_outputs({"--out": out, "its checkpoint folder": work_dir_for(out)}, inputs or {},
                  folders=["--out", "its checkpoint folder"], sealed=[k for k in inputs or {} if k != "--data"])
    if out.exists():
        raise HistosynthError(f"{out}: already exists; choose another --out or remove it")
    work = work_dir_for(out)
    if work.exists() and not resume:
        if checkpoints(work):
            raise HistosynthError(f"{work}: an earlier training is there; pass --resume to continue it, or remove "
                                  "it to start afresh")
        raise HistosynthError(f"{work}: an earlier training stopped there before its first checkpoint (nothing to "
                              "resume); remove it to start afresh")


def _patches(data: str, split: str, limit: int) -> torch.Tensor:
    """Up to ``limit`` patches of a split as one tensor (N, 3, H, W) in [-1, 1], in a fixed order."""
    dataset = PatchDataset(data, split=split, augment=False)
    if len(dataset) == 0:
        return torch.empty(0)
    step = max(1, len(dataset) // limit)
    return torch.stack([dataset[i]["image"] for i in range(0, len(dataset), step)][:limit])


def _data_facts(data: str, index: dict) -> dict:
    """Where a model's training data came from, and how much of it carried labels (what downstream benchmarks must
    match: a generator that saw N labelled patches is compared against real training on N)."""
    splits = {}
    for patch in index["patches"]:
        splits[patch["split"]] = splits.get(patch["split"], 0) + 1
    return {"dataset": str(data), "sources": ", ".join(Path(s["path"]).name for s in index["sources"]),
            "patches": splits,
            "labelled_train": sum(1 for p in index["patches"] if p["split"] == "train" and p.get("mask"))}


def _save_once(trainer: Trainer, out: Path, settings: dict, components: dict, scheduler, card: str) -> None:
    """The main process writes the model folder; the others wait for it."""
    if trainer.accelerator.is_main_process:
        save_bundle(out, settings, components, scheduler, card,
                    extra_files={"loss.csv": (work_dir_for(out) / "loss.csv").read_text()},
                    weights_dtype=trainer.config.weights_dtype)
    trainer.accelerator.wait_for_everyone()


def train_autoencoder(data: str, out: str, preset_name: str = "tiny", crop: int | None = None,
                      kl_weight: float = 1e-6, config: TrainConfig | None = None, resume: bool = False,
                      callbacks: list[Callback] = (), adversarial_weight: float = 0.0,
                      adversarial_start: int = 0, init: str | None = None, decoder_only: bool = False) -> Path:
    """Train an ``AutoencoderKL`` on the dataset's patches, measure its latent scale and PSNR, save it.

    ``adversarial_weight`` > 0 adds a PatchGAN discriminator from step ``adversarial_start`` (sharper textures);
    only the autoencoder is saved. ``init`` starts from an existing autoencoder (a folder, an image model's bundle or
    a hub id) instead of fresh weights; with ``decoder_only`` its encoder is frozen, so the latent space — and every
    image model trained in it — stays valid while the decoder learns to draw sharper pixels from the same latents
    (as Stable Diffusion's fine-tuned VAE decoders were made)."""
    out, config = Path(out), config or TrainConfig()
    if crop is not None:
        whole_number("--crop", crop)
    finite_number("--kl-weight", kl_weight, minimum=0.0)
    finite_number("--adversarial-weight", adversarial_weight, minimum=0.0)
    whole_number("--adversarial-start", adversarial_start, 0)
    if decoder_only and init is None:
        raise HistosynthError("--decoder-only needs --init: it fine-tunes the decoder of an existing autoencoder")
    _check_out(out, resume, {"--data": data, "--init": init if init and Path(init).exists() else None})
    index = load_dataset_index(data)
    torch.manual_seed(config.seed)  # initial weights (of the discriminator too, when starting from --init)
    vae = load_autoencoder(init) if init is not None else build_autoencoder(preset_name)
    if decoder_only:
        for frozen in (vae.encoder, vae.quant_conv):
            if frozen is not None:
                frozen.requires_grad_(False)
    crop = crop or index["patch_size"]
    task = AutoencoderTask(vae, data, crop, kl_weight, adversarial_weight, adversarial_start)
    identity = {"model": "autoencoder", "preset": preset_name, "crop": crop, "kl_weight": kl_weight,
                "adversarial_weight": adversarial_weight, "adversarial_start": adversarial_start,
                "init": init, "decoder_only": decoder_only}
    trainer = Trainer(task, config, work_dir_for(out), callbacks, identity=identity)
    vae = trainer.fit(resume=resume).vae.eval()
    with torch.no_grad():
        if not decoder_only:  # a frozen encoder keeps its latent space, and so the scale the image models learned
            measure_latent_scale(vae, _patches(data, "train", 64))
        test_images = _patches(data, "test", 64)
        quality = None
        if len(test_images):
            quality = round(psnr(reconstruct(vae, test_images), test_images), 2)
    summary = trainer.summary() | {"preset": preset_name, "crop": crop, "parameters": trainable_parameters(vae),
                                   "adversarial_weight": adversarial_weight, "adversarial_start": adversarial_start}
    if init is not None:
        summary |= {"init": str(init), "decoder_only": decoder_only}
    settings = {"kind": "autoencoder", "mpp": index["mpp"], "patch_size": index["patch_size"],
                "latent_factor": downsampling_factor(vae),
                "latent_scale": latent_scale(vae),
                "training": summary, "data": _data_facts(data, index), "metrics": {"psnr_test_db": quality}}
    card = model_card("histosynth autoencoder", settings, summary, {"reconstruction PSNR on the test split (dB)": quality})
    _save_once(trainer, out, settings, {"autoencoder": vae}, None, card)
    return out


def train_image(data: str, out: str, autoencoder: str, preset_name: str = "tiny", prediction_type: str = "epsilon",
                condition_dropout: float = 0.1, config: TrainConfig | None = None, resume: bool = False,
                callbacks: list[Callback] = (), sources: list[ConditionSource] = (),
                latent_cache_mb: int = 1024) -> Path:
    """Train the mask-conditioned latent denoiser; unlabelled patches and dropout train the null mask.

    ``sources`` add global conditions (style, SSL embedding, ...): each has ``name``, ``dim`` (vector width),
    ``dropout`` and optionally a trainable ``encoder`` (a diffusers ModelMixin) trained jointly and saved as the
    component ``<name>_encoder``.
    """
    out, config = Path(out), config or TrainConfig()
    one_of("--prediction-type", prediction_type, ("epsilon", "v_prediction"))
    fraction("--condition-dropout", condition_dropout)
    _check_out(out, resume, {"--data": data, "--autoencoder": autoencoder if Path(autoencoder).exists() else None})
    index = load_dataset_index(data)
    vae = load_autoencoder(autoencoder).eval()
    factor = downsampling_factor(vae)
    if index["patch_size"] % factor:
        raise HistosynthError(f"{data}: patch size {index['patch_size']} is not a multiple of the autoencoder's {factor}×")
    with torch.no_grad():
        measure_latent_scale(vae, _patches(data, "train", 64))
    classes = [c for c in index["classes"] if c["id"] != 0]
    num_classes = max((c["id"] for c in classes), default=0)
    torch.manual_seed(config.seed)
    latent_patch = index["patch_size"] // factor
    channels = vae.config.latent_channels
    global_dims = {source.name: int(source.dim) for source in sources}
    unet = build_unet(preset_name, channels + num_classes, channels, latent_patch, global_conditioning=bool(sources))
    projection = GlobalProjection(global_dims, time_embedding_width(unet)) if sources else None
    encoders = {s.name: s.encoder for s in sources if getattr(s, "encoder", None) is not None}
    objective = DiffusionObjective(ConditionedDenoiser(unet, channels, num_classes, projection),
                                   make_train_scheduler(prediction_type), encoders)
    if latent_cache_mb < 0:
        raise HistosynthError(f"--latent-cache-mb must not be negative, got {latent_cache_mb}")
    task = ImageTask(objective, vae, data, num_classes, condition_dropout, sources,
                     latent_cache_bytes=latent_cache_mb << 20)
    identity = {"model": "image", "preset": preset_name, "prediction_type": prediction_type,
                "condition_dropout": condition_dropout, "conditions": sorted(global_dims)}
    trainer = Trainer(task, config, work_dir_for(out), callbacks, identity=identity)
    trained = trainer.fit(resume=resume)
    unet = trained.denoiser.unet.eval()
    summary = trainer.summary() | {"preset": preset_name, "parameters": trainable_parameters(unet),
                                   "condition_dropout": condition_dropout, "autoencoder": str(autoencoder)}
    settings = image_model_config(index["classes"], index["mpp"], index["patch_size"], vae, prediction_type,
                                  summary, _data_facts(data, index))
    components = {"autoencoder": vae, "unet": unet}
    if sources:
        settings["conditioning"]["global"] = global_dims
        settings["conditioning"]["global_dropout"] = {s.name: s.dropout for s in sources}
        for source in sources:  # e.g. the embedding encoder's id and weights hash
            settings["conditioning"].update(getattr(source, "bundle_settings", {}))
        components["global_projection"] = trained.denoiser.projection
        components.update({f"{name}_encoder": encoder.eval() for name, encoder in trained.encoders.items()})
    card = model_card("histosynth mask-conditioned latent image model", settings, summary)
    _save_once(trainer, out, settings, components, objective.train_scheduler, card)
    return out


def train_mask(data: str, out: str, preset_name: str = "tiny", crop: int = 32, config: TrainConfig | None = None,
               resume: bool = False, callbacks: list[Callback] = (), label_downsample: int = 1,
               slide_labels: bool = False, label_dropout: float = 0.1, prediction_type: str = "epsilon",
               zero_terminal_snr: bool = False) -> Path:
    """Train the mask model: diffusion over one-hot class maps on crops of the low-resolution label maps, coarsened
    ``label_downsample``× (majority vote) so that a crop spans more tissue (DiffInfinite's masks cover ~1 mm).

    With ``slide_labels`` it is also conditioned on each crop's slide label (``prepare --slide-labels``; DiffInfinite's
    subtype prompt), dropped to the null label with probability ``label_dropout``. ``zero_terminal_snr`` (with
    v-prediction) trains on a schedule whose last step holds no signal, so layouts take their class fractions from
    the model, not from the starting noise's channel means (make_train_scheduler)."""
    out, config = Path(out), config or TrainConfig()
    train_scheduler = make_train_scheduler(prediction_type, zero_terminal_snr)  # bad choices fail before any work
    whole_number("--crop", crop)
    whole_number("--label-downsample", label_downsample)
    _check_out(out, resume, {"--data": data})
    index = load_dataset_index(data)
    mask_mpp = float(index["sources"][0]["labelmap_mpp"]) * label_downsample
    factor = round(mask_mpp / index["mpp"])
    classes = [c for c in index["classes"] if c["id"] != 0]
    num_classes = max((c["id"] for c in classes), default=0)
    if num_classes == 0:
        raise HistosynthError(f"{data}: the dataset has no classes to train a mask model on")
    labels = None
    if slide_labels:
        labels = {int(s["id"]): s.get("label") for s in index["sources"] if s.get("labelmap")}
        if not labels or any(name is None for name in labels.values()):
            raise HistosynthError(f"{data}: --slide-labels needs a label for every slide with a label map "
                                  "(`histosynth prepare --slide-labels CSV`)")
    torch.manual_seed(config.seed)

    unet = build_unet(preset_name, num_classes, num_classes, crop, kind="mask_unet",
                      global_conditioning=labels is not None)
    names = sorted(set(labels.values())) if labels else []
    projection = GlobalProjection({"label": len(names)}, time_embedding_width(unet)) if labels else None
    objective = DiffusionObjective(ConditionedDenoiser(unet, num_classes, 0, projection), train_scheduler)
    task = MaskTask(objective, data, crop, num_classes, downsample=label_downsample, slide_labels=labels,
                    label_dropout=label_dropout)
    identity = {"model": "mask", "preset": preset_name, "crop": crop, "label_downsample": label_downsample}
    if zero_terminal_snr or prediction_type != "epsilon":  # older checkpoints (ε, no such key) still resume
        identity |= {"prediction_type": prediction_type, "zero_terminal_snr": zero_terminal_snr}
    if labels:
        identity |= {"slide_labels": names, "label_dropout": label_dropout}
    trainer = Trainer(task, config, work_dir_for(out), callbacks, identity=identity)
    trained = trainer.fit(resume=resume).denoiser.eval()
    unet = trained.unet
    summary = trainer.summary() | {"preset": preset_name, "parameters": trainable_parameters(trained),
                                   "label_downsample": label_downsample}
    settings = {"kind": "mask", "classes": index["classes"], "num_classes": num_classes, "mpp": index["mpp"],
                "mask_mpp": mask_mpp, "latent_factor": factor, "latent_patch": crop,
                "patch_size": crop * factor, "prediction_type": prediction_type, "conditioning": {},
                "min_region_um2": float(index.get("labels", {}).get("min_region_um2", 0.0)),
                "training": summary, "data": _data_facts(data, index)}
    components = {"unet": unet}
    if labels:
        settings["conditioning"] = {"global": {"label": len(names)}, "global_dropout": {"label": label_dropout}}
        settings["labels"] = names
        components["global_projection"] = trained.projection
    card = model_card("histosynth mask model", settings, summary)
    _save_once(trainer, out, settings, components, objective.train_scheduler, card)
    return out


def remove_work_dir(out: str | Path) -> None:
    """Delete the checkpoints of a finished training."""
    shutil.rmtree(work_dir_for(out), ignore_errors=True)
