"""CLI commands: ``histosynth train autoencoder|image|mask|ssl|prior``; YAML config keys mirror the flags."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
import yaml

from histosynth.cli.app import app
from histosynth.errors import HistosynthError

train_app = typer.Typer(help="Train the autoencoder, the image model or the mask model.", no_args_is_help=True)
app.add_typer(train_app, name="train")

DEFAULTS = {"preset": "tiny", "steps": 1000, "batch_size": 16, "learning_rate": 2e-4, "warmup_steps": 50,
            "grad_clip": 1.0, "ema_decay": 0.999, "checkpoint_every": 250, "seed": 0, "mixed_precision": "no",
            "weights_dtype": "float32"}


def resolve(config: Optional[Path], given: dict, defaults: dict) -> dict:
    """Defaults, then the YAML file, then flags given on the command line (None = not given)."""
    values = dict(defaults)
    if config is not None:
        try:
            loaded = yaml.safe_load(config.read_text()) or {}
        except FileNotFoundError:
            raise HistosynthError(f"{config}: file not found") from None
        except yaml.YAMLError as error:
            raise HistosynthError(f"{config}: broken YAML ({str(error).splitlines()[0]})") from error
        except UnicodeDecodeError:
            raise HistosynthError(f"{config}: not a text file") from None
        if not isinstance(loaded, dict):
            raise HistosynthError(f"{config}: expected a mapping of option names to values")
        if not all(isinstance(k, str) for k in loaded):
            raise HistosynthError(f"{config}: option names must be text")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - set(given) - set(defaults))
        if unknown:
            raise HistosynthError(f"{config}: unknown option '{unknown[0]}'")
        loaded = {key: _checked(config, key, value, defaults.get(key)) for key, value in loaded.items()}
        values.update(loaded)
    values.update({k: v for k, v in given.items() if v is not None})
    return values


# Options whose default is None (not given) and that are not text or paths.
_WHOLE_NUMBER_OPTIONS = {"crop", "image_size", "grid"}


def _checked(config: Path, key: str, value, default):
    """A YAML value of the type its flag takes: ``steps: ten`` or ``learning_rate: [1]`` is one line, not a crash
    deep in training (YAML reads ``1e-4`` as text: accepted where a number goes, as on the command line)."""
    if value is None:
        return value
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int) or key in _WHOLE_NUMBER_OPTIONS:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, expected = isinstance(value, (str, int, float)) and not isinstance(value, bool), "text or a path"
    if not ok:
        raise HistosynthError(f"{config}: '{key}' must be {expected}, found {value!r}")
    return value


def _train_config(values: dict):
    from histosynth.train.trainer import TrainConfig

    return TrainConfig.from_dict(values)


def _require(values: dict, *names: str) -> None:
    for name in names:
        if values.get(name) is None:
            raise HistosynthError(f"missing option --{name.replace('_', '-')} (on the command line or in --config)")


ConfigOpt = typer.Option(None, "--config", help="YAML file whose keys mirror these flags.")
DataOpt = typer.Option(None, "--data", help="Dataset folder written by `histosynth prepare`.")
OutOpt = typer.Option(None, "--out", help="Model folder to write (checkpoints go to OUT.train/).")
PresetOpt = typer.Option(None, "--preset", help="Model size: tiny, demo or base.")
StepsOpt = typer.Option(None, "--steps", help="Optimisation steps.")
BatchOpt = typer.Option(None, "--batch-size", help="Global batch size.")
LrOpt = typer.Option(None, "--learning-rate", help="Peak learning rate (after warm-up).")
CkptOpt = typer.Option(None, "--checkpoint-every", help="Write a checkpoint every N steps.")
SeedOpt = typer.Option(None, "--seed", help="Seed for initial weights and every batch.")
ResumeOpt = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT.train/.")


@train_app.command("autoencoder")
def train_autoencoder_cmd(config: Optional[Path] = ConfigOpt, data: Optional[Path] = DataOpt,
                          out: Optional[Path] = OutOpt, preset: Optional[str] = PresetOpt,
                          steps: Optional[int] = StepsOpt, batch_size: Optional[int] = BatchOpt,
                          learning_rate: Optional[float] = LrOpt, checkpoint_every: Optional[int] = CkptOpt,
                          seed: Optional[int] = SeedOpt, resume: bool = ResumeOpt,
                          crop: Optional[int] = typer.Option(None, help="Training crop size in px (default: patch size)."),
                          kl_weight: Optional[float] = typer.Option(None, help="Weight of the KL term."),
                          adversarial_weight: Optional[float] = typer.Option(
                              None, help="Weight of a PatchGAN adversarial term (0: off) for sharper texture."),
                          adversarial_start: Optional[int] = typer.Option(
                              None, help="Step from which the adversarial term is on (reconstruction first)."),
                          init: Optional[str] = typer.Option(
                              None, help="Start from this autoencoder (folder, image model bundle or hub id)."),
                          decoder_only: Optional[bool] = typer.Option(
                              None, "--decoder-only/--whole-autoencoder",
                              help="Freeze the --init encoder and train only the decoder: image models trained on "
                              "its latents stay valid.")):
    """Train the latent autoencoder (diffusers AutoencoderKL) on a dataset's patches."""
    from histosynth.train.run import train_autoencoder

    values = resolve(config, dict(data=data, out=out, preset=preset, steps=steps, batch_size=batch_size,
                                  learning_rate=learning_rate, checkpoint_every=checkpoint_every, seed=seed,
                                  crop=crop, kl_weight=kl_weight, adversarial_weight=adversarial_weight,
                                  adversarial_start=adversarial_start, init=init, decoder_only=decoder_only),
                     DEFAULTS | {"kl_weight": 1e-6, "adversarial_weight": 0.0, "adversarial_start": 0,
                                 "decoder_only": False})
    _require(values, "data", "out")
    path = train_autoencoder(str(values["data"]), str(values["out"]), values["preset"], values.get("crop"),
                             values["kl_weight"], _train_config(values), resume,
                             adversarial_weight=values["adversarial_weight"],
                             adversarial_start=values["adversarial_start"],
                             init=None if values.get("init") is None else str(values["init"]),
                             decoder_only=values["decoder_only"])
    typer.echo(f"wrote autoencoder to {path}")


@train_app.command("image")
def train_image_cmd(config: Optional[Path] = ConfigOpt, data: Optional[Path] = DataOpt,
                    out: Optional[Path] = OutOpt, preset: Optional[str] = PresetOpt,
                    autoencoder: Optional[str] = typer.Option(None, help="Autoencoder folder or diffusers hub id."),
                    steps: Optional[int] = StepsOpt, batch_size: Optional[int] = BatchOpt,
                    learning_rate: Optional[float] = LrOpt, checkpoint_every: Optional[int] = CkptOpt,
                    seed: Optional[int] = SeedOpt, resume: bool = ResumeOpt,
                    prediction_type: Optional[str] = typer.Option(None, help="epsilon or v_prediction."),
                    condition_dropout: Optional[float] = typer.Option(None, help="Probability of the null mask."),
                    preview_every: Optional[int] = typer.Option(None, help="Write preview samples every N steps."),
                    style: Optional[str] = typer.Option(None, "--style", help="Style conditioning (STEDM), style sets"
                                                        " drawn from: nearby, slide or augmented."),
                    style_set_size: Optional[int] = typer.Option(None, help="Images per style set (default 4)."),
                    style_dropout: Optional[float] = typer.Option(None, help="Probability of the null style (0.1)."),
                    style_aggregation: Optional[str] = typer.Option(None, help="mean, max, mlp or attention."),
                    style_encoder: Optional[str] = typer.Option(None, help="small (CNN) or a timm model name."),
                    style_pretrained: bool = typer.Option(False, "--style-pretrained",
                                                          help="Start a timm style encoder from pretrained weights."),
                    embeddings: Optional[str] = typer.Option(None, "--embeddings", help="SSL-embedding conditioning: "
                                                             "an embeddings file or encoder id (`histosynth embed`)."),
                    embedding_dropout: Optional[float] = typer.Option(None, help="Probability of the null (zero) "
                                                                      "embedding (0.1)."),
                    normalize_embeddings: bool = typer.Option(False, "--normalize-embeddings",
                                                              help="Scale embeddings to unit length."),
                    latent_cache_mb: Optional[int] = typer.Option(
                        None, help="Memory for encoded latents (least recently used dropped beyond it; 1024).")):
    """Train the mask-conditioned latent diffusion model."""
    from histosynth.train.run import train_image, work_dir_for

    values = resolve(config, dict(data=data, out=out, preset=preset, autoencoder=autoencoder, steps=steps,
                                  batch_size=batch_size, learning_rate=learning_rate,
                                  checkpoint_every=checkpoint_every, seed=seed, prediction_type=prediction_type,
                                  condition_dropout=condition_dropout, preview_every=preview_every,
                                  latent_cache_mb=latent_cache_mb,
                                  **_style_given(style, style_set_size, style_dropout, style_aggregation,
                                                 style_encoder, style_pretrained),
                                  **embedding_given(embeddings, embedding_dropout, normalize_embeddings)),
                     DEFAULTS | {"prediction_type": "epsilon", "condition_dropout": 0.1, "preview_every": 0,
                                 "latent_cache_mb": 1024}
                     | STYLE_DEFAULTS | EMBEDDING_DEFAULTS)
    _require(values, "data", "out", "autoencoder")
    callbacks = []
    if values["preview_every"]:
        from histosynth.pipelines.previews import image_preview_callback

        callbacks.append(image_preview_callback(str(values["data"]), work_dir_for(values["out"]),
                                                values["preview_every"], str(values["autoencoder"])))
    sources = _style_sources(values) + embedding_sources(values)
    path = train_image(str(values["data"]), str(values["out"]), str(values["autoencoder"]), values["preset"],
                       values["prediction_type"], values["condition_dropout"], _train_config(values), resume,
                       callbacks, sources=sources, latent_cache_mb=values["latent_cache_mb"])
    typer.echo(f"wrote image model to {path}")


STYLE_DEFAULTS = {"style": None, "style_set_size": 4, "style_dropout": 0.1, "style_aggregation": "mean",
                  "style_encoder": "small", "style_pretrained": False}


def _style_given(style, set_size, dropout, aggregation, encoder, pretrained) -> dict:
    return dict(style=style, style_set_size=set_size, style_dropout=dropout, style_aggregation=aggregation,
                style_encoder=encoder, style_pretrained=pretrained or None)


def _style_sources(values: dict) -> list:
    """The style condition source of ``--style ...`` (none without --style)."""
    if not values.get("style"):
        return []
    from histosynth.train.sources import style_source

    return [style_source(str(values["data"]), values["style"], int(values["style_set_size"]),
                         float(values["style_dropout"]), values["style_aggregation"], values["style_encoder"],
                         bool(values["style_pretrained"]), seed=int(values["seed"]))]


@train_app.command("mask")
def train_mask_cmd(config: Optional[Path] = ConfigOpt, data: Optional[Path] = DataOpt,
                   out: Optional[Path] = OutOpt, preset: Optional[str] = PresetOpt,
                   steps: Optional[int] = StepsOpt, batch_size: Optional[int] = BatchOpt,
                   learning_rate: Optional[float] = LrOpt, checkpoint_every: Optional[int] = CkptOpt,
                   seed: Optional[int] = SeedOpt, resume: bool = ResumeOpt,
                   crop: Optional[int] = typer.Option(None, help="Crop of the label maps, in label-map px."),
                   label_downsample: Optional[int] = typer.Option(
                       None, help="Coarsen the label maps N× (majority vote) first: a crop spans N× more tissue."),
                   slide_labels: Optional[bool] = typer.Option(
                       None, "--slide-labels/--no-slide-labels", help="Condition on each slide's label (`prepare "
                       "--slide-labels`): `generate --mask-label NAME` then steers layouts to it."),
                   label_dropout: Optional[float] = typer.Option(None, help="Probability of the null label (0.1)."),
                   prediction_type: Optional[str] = typer.Option(None, help="epsilon or v_prediction."),
                   zero_terminal_snr: Optional[bool] = typer.Option(
                       None, "--zero-terminal-snr/--no-zero-terminal-snr", help="Train on a schedule whose last step "
                       "holds no signal (needs v_prediction): the model, not the starting noise, sets the class "
                       "fractions.")):
    """Train the mask model on large crops of the dataset's low-resolution label maps."""
    from histosynth.train.run import train_mask

    values = resolve(config, dict(data=data, out=out, preset=preset, steps=steps, batch_size=batch_size,
                                  learning_rate=learning_rate, checkpoint_every=checkpoint_every, seed=seed,
                                  crop=crop, label_downsample=label_downsample, slide_labels=slide_labels,
                                  label_dropout=label_dropout, prediction_type=prediction_type,
                                  zero_terminal_snr=zero_terminal_snr),
                     DEFAULTS | {"crop": 32, "label_downsample": 1, "slide_labels": False, "label_dropout": 0.1,
                                 "prediction_type": "epsilon", "zero_terminal_snr": False})
    _require(values, "data", "out")
    path = train_mask(str(values["data"]), str(values["out"]), values["preset"], values["crop"],
                      _train_config(values), resume, label_downsample=values["label_downsample"],
                      slide_labels=values["slide_labels"], label_dropout=values["label_dropout"],
                      prediction_type=values["prediction_type"], zero_terminal_snr=values["zero_terminal_snr"])
    typer.echo(f"wrote mask model to {path}")


@train_app.command("ssl")
def train_ssl_cmd(config: Optional[Path] = ConfigOpt, data: Optional[Path] = DataOpt,
                  out: Optional[Path] = OutOpt,
                  preset: Optional[str] = typer.Option(None, "--preset", help="Encoder size: tiny, demo, base "
                                                       "(ResNet-18) or timm:NAME."),
                  steps: Optional[int] = StepsOpt, batch_size: Optional[int] = BatchOpt,
                  learning_rate: Optional[float] = LrOpt, checkpoint_every: Optional[int] = CkptOpt,
                  seed: Optional[int] = SeedOpt, resume: bool = ResumeOpt,
                  image_size: Optional[int] = typer.Option(None, help="Encoder input size in px (default: the "
                                                           "patch size)."),
                  temperature: Optional[float] = typer.Option(None, help="NT-Xent temperature (0.2).")):
    """Train histosynth's own self-supervised encoder (SimCLR) on a dataset's training patches."""
    from histosynth.train.ssl import train_ssl

    values = resolve(config, dict(data=data, out=out, preset=preset, steps=steps, batch_size=batch_size,
                                  learning_rate=learning_rate, checkpoint_every=checkpoint_every, seed=seed,
                                  image_size=image_size, temperature=temperature),
                     DEFAULTS | {"learning_rate": 2e-3, "batch_size": 128, "ema_decay": 0.0, "temperature": 0.2,
                                 "image_size": None})
    _require(values, "data", "out")
    path = train_ssl(str(values["data"]), str(values["out"]), values["preset"], values.get("image_size"),
                     float(values["temperature"]), _train_config(values), resume)
    typer.echo(f"wrote encoder to {path}")


@train_app.command("prior")
def train_prior_cmd(config: Optional[Path] = ConfigOpt, data: Optional[Path] = DataOpt,
                    out: Optional[Path] = OutOpt, preset: Optional[str] = PresetOpt,
                    encoder: Optional[str] = typer.Option(None, "--encoder", help="Encoder whose cached embeddings "
                                                          "(`histosynth embed`) to model, or an embeddings file."),
                    grid: Optional[int] = typer.Option(None, "--grid", help="Grid side k in patches (4)."),
                    text_file: Optional[Path] = typer.Option(None, "--text-file", help="captions.csv with columns "
                                                             "source,text[,class] describing each slide."),
                    text_encoder: Optional[str] = typer.Option(None, help="minilm (default), hashing, or a "
                                                               "sentence-transformers folder."),
                    steps: Optional[int] = StepsOpt, batch_size: Optional[int] = BatchOpt,
                    learning_rate: Optional[float] = LrOpt, checkpoint_every: Optional[int] = CkptOpt,
                    seed: Optional[int] = SeedOpt, resume: bool = ResumeOpt):
    """Train the embedding prior: diffusion over k×k embedding grids conditioned on a caption or a class."""
    from histosynth.train.ssl import train_prior

    values = resolve(config, dict(data=data, out=out, preset=preset, encoder=encoder, grid=grid,
                                  text_file=text_file, text_encoder=text_encoder, steps=steps,
                                  batch_size=batch_size, learning_rate=learning_rate,
                                  checkpoint_every=checkpoint_every, seed=seed),
                     DEFAULTS | {"grid": 4, "text_encoder": "minilm", "text_file": None, "learning_rate": 5e-4})
    _require(values, "data", "out", "encoder")
    path = train_prior(str(values["data"]), str(values["out"]), str(values["encoder"]), int(values["grid"]),
                       str(values["text_file"]) if values.get("text_file") else None, values["text_encoder"],
                       values["preset"], _train_config(values), resume)
    typer.echo(f"wrote embedding prior to {path}")


def embedding_given(embeddings, dropout, normalize) -> dict:
    """``train image`` flags of the embedding condition (None = not given)."""
    return dict(embeddings=embeddings, embedding_dropout=dropout, normalize_embeddings=normalize or None)


EMBEDDING_DEFAULTS = {"embeddings": None, "embedding_dropout": 0.1, "normalize_embeddings": False}


def embedding_sources(values: dict) -> list:
    """The embedding condition source of ``train image --embeddings E`` (none without it)."""
    if not values.get("embeddings"):
        return []
    from histosynth.conditions.embedding_cache import resolve_embeddings
    from histosynth.train.sources import EmbeddingSource

    cache = resolve_embeddings(str(values["data"]), str(values["embeddings"]))
    return [EmbeddingSource(cache, str(values["data"]), float(values["embedding_dropout"]),
                            bool(values["normalize_embeddings"]))]
