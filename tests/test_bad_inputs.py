"""A corpus of bad input, one case each, across the commands: every case must end with exit status 2, exactly one
line ``error: <file>: <problem>`` naming the file (or option) and the problem, no traceback, every input file
byte for byte as it was, and nothing new on disk — no output, no partial output, no hidden temporary file, no
``OUT.train/``.

The workspace of each case (its inputs and the folder its outputs would go to) is snapshotted before and after:
path by path and byte by byte, the two must be equal. Faults a test cannot make for real as root (a read-only or
full disk) are injected where the file system would raise them.
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
import signal
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from cli_runner import run_cli
from tiny_models import tiny_image_model, tiny_mask_model


# ------------------------------------------------------------------------------------------------- shared inputs
@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Tiny models, a small dataset with a mask model's training checkpoints, and a generate checkpoint."""
    from histosynth.data.prepare import prepare_dataset
    from histosynth.pipelines import generate_slide as generate_module

    root = tmp_path_factory.mktemp("shared")
    image, mask = tiny_image_model(root / "image", patch=32), tiny_mask_model(root / "mask")

    rng = np.random.default_rng(0)
    tissue = np.full((256, 256, 3), 240, np.uint8)
    tissue[32:224, 32:224] = rng.integers(100, 200, (192, 192, 3))
    tissue[64:160, 64:160, 2] = 90
    Image.fromarray(tissue).save(root / "tissue.png")
    prepare_dataset([root / "tissue.png"], root / "data", 0.5, 32, source_mpp=0.5, auto_labels="colour",
                    progress=False)
    code, text = run_cli(["train", "mask", "--data", root / "data", "--out", root / "trained", "--steps", 2,
                          "--batch-size", 2, "--crop", 8, "--checkpoint-every", 1])
    assert code == 0, text
    assert sorted(p.name for p in (root / "trained.train" / "checkpoints").iterdir()) == ["step-00000001",
                                                                                           "step-00000002"]

    # A checkpoint of `generate` exactly as a run stopped by SIGTERM in its first step leaves it: the step's canvas,
    # the solver's history and the previous x0 (the finished canvas's checkpoint keeps the latents only).
    class TerminatedInTheFirstStep(generate_module.tqdm):
        def update(self, n=1):
            super().update(n)
            if self.desc == "denoising" and self.n == 1:
                signal.raise_signal(signal.SIGTERM)

    original = generate_module.tqdm
    generate_module.tqdm = TerminatedInTheFirstStep
    try:
        code, text = run_cli(GENERATE(image, mask, root / "ckpt" / "slide.tiff") + ["--checkpoint-every", 1])
    finally:
        generate_module.tqdm = original
    assert code == 2 and (root / "ckpt" / "slide.checkpoint" / KEPT_STEP / "history-1.json").is_file(), text
    return root


def GENERATE(image, mask, out, *extra):  # noqa: N802 - a constant prefix of arguments
    return ["generate", "--model", image, "--mask-model", mask, "--size", "64x64", "--steps", 2, "--mask-steps", 2,
            "--batch", 4, "--out", out, *extra]


# ----------------------------------------------------------------------------------------------- the case record
@dataclass
class Case:
    args: list
    expect: str  # a piece of the problem the line must state
    names: str | Path  # the file or option the line must name
    fault: tuple | None = None  # monkeypatch.setattr arguments: a fault injected for this case only


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def mask_png(path: Path, size: int = 64, value: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def bomb_png(path: Path, side: int = 60000) -> Path:
    """A 100-byte PNG that claims side² pixels (3.6 billion at 60000: 10 GB of RGB once decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return write(path, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                 + chunk(b"IEND", b""))


def truncated_tiff(path: Path) -> Path:
    """A pyramidal TIFF cut at 60 %: its header and first directories are intact, most tiles are missing."""
    from histosynth.io.tiff import write_pyramid

    pixels = np.random.default_rng(1).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    whole = path.with_name("whole-" + path.name)
    write_pyramid(whole, 512, 512, [pixels], mpp=0.5, compression="deflate")
    data = whole.read_bytes()
    whole.unlink()
    return write(path, data[: len(data) * 6 // 10])


def tampered_model(tmp: Path, source: Path, change=None, replace=None) -> Path:
    """A copy of a model folder whose histosynth.json is changed in place by ``change(config)``, or replaced by
    ``replace(config)``."""
    folder = tmp / "inputs" / "tampered"
    shutil.copytree(source, folder)
    config = json.loads((folder / "histosynth.json").read_text())
    if change is not None:
        change(config)
    (folder / "histosynth.json").write_text(json.dumps(replace(config) if replace is not None else config))
    return folder


def tampered_weights(tmp: Path, source: Path, component: str, change) -> Path:
    folder = tmp / "inputs" / "tampered"
    shutil.copytree(source, folder)
    file = next((folder / component).glob("*.safetensors"))
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)
    return folder


KEPT_STEP = "step-000001"  # the checkpoint of a 2-step run stopped in its first step


def generate_checkpoint(tmp: Path, shared: Path, change=None) -> Path:
    """A copy of the shared generate checkpoint beside ``tmp/out/slide.tiff``, changed by ``change(step folder)``."""
    target = tmp / "out" / "slide.checkpoint"
    shutil.copytree(shared / "ckpt" / "slide.checkpoint", target)
    if change is not None:
        change(target / KEPT_STEP)
    return target


def train_checkpoint(tmp: Path, shared: Path, change=None) -> Path:
    """A copy of the mask model's training folder as ``tmp/out/mask.train``, the last checkpoint changed."""
    target = tmp / "out" / "mask.train"
    shutil.copytree(shared / "trained.train", target)
    if change is not None:
        change(target / "checkpoints" / "step-00000002")
    return target


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def raise_os_error(code: int, text: str):
    def fail(*args, **kwargs):
        raise OSError(code, text)
    return fail


# ------------------------------------------------------------------------------------------------------ the corpus
def build(name: str, tmp: Path, shared: Path) -> Case:  # noqa: C901 - one branch per case, on purpose
    image, mask = shared / "image", shared / "mask"
    out = tmp / "out"
    slide = out / "slide.tiff"
    inputs = tmp / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    gen = lambda *extra: GENERATE(image, mask, slide, *extra)  # noqa: E731
    sample = lambda *extra: ["sample", "--model", image, "--steps", 2, "--out", out / "p.png", *extra]  # noqa: E731
    train = lambda *extra: ["train", "mask", "--data", shared / "data", "--out", out / "mask",  # noqa: E731
                            "--steps", 4, "--batch-size", 2, "--crop", 8, *extra]

    # -- 2. silent garbage: option ranges, checked before anything is loaded -------------------------------------
    if name == "generate-guidance-nan":
        return Case(gen("--guidance", "nan"), "must be a finite number", "--guidance")
    if name == "generate-guidance-inf":
        return Case(gen("--guidance", "inf"), "must be a finite number", "--guidance")
    if name == "generate-steps-0":
        return Case(gen("--steps", 0), "at least 1", "--steps")
    if name == "generate-steps-negative":
        return Case(gen("--steps", -3), "at least 1", "--steps")
    if name == "generate-mask-steps-0":
        return Case(gen("--mask-steps", 0), "at least 1", "--mask-steps")
    if name == "generate-batch-0":
        return Case(gen("--batch", 0), "at least 1", "--batch")
    if name == "generate-stride-0":
        return Case(gen("--sampler", "multidiffusion", "--stride", 0), "at least 1", "--stride")
    if name == "generate-blend-last-beyond-steps":
        return Case(gen("--blend-last", 9), "from 0 to 2", "--blend-last")
    if name == "generate-heal-detail-negative":
        return Case(gen("--heal-detail", -1), "at least 0", "--heal-detail")
    if name == "generate-checkpoint-every-negative":
        return Case(gen("--checkpoint-every", -1), "at least 0", "--checkpoint-every")
    if name == "generate-sampler-bogus":
        return Case(gen("--sampler", "bogus"), "not one of random", "--sampler")
    if name == "generate-scheduler-bogus":
        return Case(gen("--scheduler", "bogus"), "not one of dpm++sde", "--scheduler")
    if name == "generate-compression-bogus":
        return Case(gen("--compression", "bogus"), "not one of jpeg, deflate", "--compression")
    if name == "generate-format-bogus":
        return Case(gen("--format", "bmp"), "not one of tiff, ome-tiff", "--format")
    if name == "generate-size-zero":
        return Case(gen("--size", "0x64"), "positive sides", "size '0x64'")
    if name == "generate-size-text":
        return Case(gen("--size", "big"), "is not WxH", "size 'big'")
    if name == "generate-size-beyond-memory":
        return Case(gen("--size", "10000000x10000000"), "GiB of memory", "--size 10000000x10000000")
    if name == "generate-size-beyond-tiff":
        return Case(gen("--size", "5000000000x64"), "a TIFF side is at most", "size '5000000000x64'")
    if name == "generate-size-not-integer-option":
        return Case(gen("--steps", "2.5"), "Invalid value for '--steps'", "--steps")
    if name == "generate-guidance-overflows":
        # Finite options whose product overflows: the sampled numbers are checked before anything is written.
        return Case(gen("--guidance", "1e38"), "not finite", image)
    if name == "sample-n-0":
        return Case(sample("--n", 0), "at least 1", "--n")
    if name == "sample-steps-0":
        return Case(sample("--steps", 0), "at least 1", "--steps")
    if name == "sample-guidance-nan":
        return Case(sample("--guidance", "nan"), "must be a finite number", "--guidance")
    if name == "sample-scheduler-bogus":
        return Case(sample("--scheduler", "bogus"), "not one of", "--scheduler")
    if name == "synthesize-n-0":
        return Case(["synthesize", "--model", image, "--mask-model", mask, "--n", 0, "--out", out / "pairs"],
                    "at least 1", "--n")
    if name == "synthesize-elastic-nan":
        return Case(["synthesize", "--model", image, "--mask-model", mask, "--n", 2, "--elastic", "nan",
                     "--out", out / "pairs"], "must be a finite number", "--elastic")
    if name == "vary-steps-0":
        return Case(["vary", mask_png(inputs / "ref.png", 32), "--model", image, "--steps", 0, "--out", out / "v"],
                    "at least 1", "--steps")
    if name == "demo-size-0":
        return Case(["demo", "--size", 0, "--out", out / "demo"], "at least 1", "--size")
    if name == "evaluate-layouts-steps-0":
        return Case(["evaluate-layouts", "--mask-model", mask, "--data", shared / "data", "--steps", 0,
                     "--out", out / "layouts"], "greater than or equal to 1", "--steps")
    if name == "prepare-mpp-nan":
        return Case(["prepare", shared / "tissue.png", "--source-mpp", 0.5, "--out", out / "data", "--mpp", "nan",
                     "--patch", 32], "must be a finite number", "--mpp")
    if name == "prepare-mpp-negative":
        return Case(["prepare", shared / "tissue.png", "--source-mpp", 0.5, "--out", out / "data", "--mpp", -1,
                     "--patch", 32], "greater than 0", "--mpp")
    if name == "prepare-source-mpp-inf":
        return Case(["prepare", shared / "tissue.png", "--source-mpp", "inf", "--out", out / "data", "--mpp", 0.5,
                     "--patch", 32], "must be a finite number", "--source-mpp")
    if name == "prepare-patch-0":
        return Case(["prepare", shared / "tissue.png", "--source-mpp", 0.5, "--out", out / "data", "--mpp", 0.5,
                     "--patch", 0], "at least 1", "--patch")
    if name == "prepare-fraction-nan":
        return Case(["prepare", shared / "tissue.png", "--source-mpp", 0.5, "--out", out / "data", "--mpp", 0.5,
                     "--patch", 32, "--label-fraction", "nan"], "must be a finite number", "--label-fraction")
    if name == "train-steps-0":
        return Case(train("--steps", 0), "at least 1", "--steps")
    if name == "train-learning-rate-nan":
        return Case(train("--learning-rate", "nan"), "must be a finite number", "--learning-rate")
    if name == "train-batch-size-0":
        return Case(train("--batch-size", 0), "at least 1", "--batch-size")

    # -- 2. model folders: the wrong kind, tampered histosynth.json, broken weights -------------------------------
    if name == "model-is-a-mask-model":
        return Case(["generate", "--model", mask, "--size", "64x64", "--out", slide], "a mask model, not an image",
                    mask)
    if name == "sample-model-is-a-mask-model":
        return Case(["sample", "--model", mask, "--out", out / "p.png"], "a mask model, not an image", mask)
    if name == "mask-model-is-an-image-model":
        return Case(["generate", "--model", image, "--mask-model", image, "--size", "64x64", "--out", slide],
                    "an image model, not a mask model", image)
    if name == "model-json-without-kind":
        model = tampered_model(tmp, image, lambda c: c.pop("kind"))
        return Case(gen()[:2] + [model] + gen()[3:], "no 'kind'", model / "histosynth.json")
    if name == "model-json-kind-unknown":
        model = tampered_model(tmp, image, lambda c: c.update(kind="banana"))
        return Case(gen()[:2] + [model] + gen()[3:], "kind 'banana'", model / "histosynth.json")
    if name == "model-json-mask-relabelled-image":
        model = tampered_model(tmp, mask, lambda c: c.update(kind="image"))
        return Case(gen()[:2] + [model] + gen()[3:], "needs the component 'autoencoder'", model / "histosynth.json")
    if name == "model-json-is-a-list":
        model = tampered_model(tmp, image, replace=lambda c: [c])
        return Case(gen()[:2] + [model] + gen()[3:], "expected a JSON object", model / "histosynth.json")
    if name == "model-json-missing-key":
        model = tampered_model(tmp, image, lambda c: c.pop("latent_patch"))
        return Case(gen()[:2] + [model] + gen()[3:], "'latent_patch' is missing", model / "histosynth.json")
    if name == "model-json-wrong-type":
        model = tampered_model(tmp, image, lambda c: c.update(patch_size="32"))
        return Case(gen()[:2] + [model] + gen()[3:], "'patch_size' must be a whole number",
                    model / "histosynth.json")
    if name == "model-json-mpp-negative":
        model = tampered_model(tmp, image, lambda c: c.update(mpp=-0.5))
        return Case(gen()[:2] + [model] + gen()[3:], "'mpp' must be positive", model / "histosynth.json")
    if name == "model-json-class-count-mismatch":
        model = tampered_model(tmp, image, lambda c: c.update(num_classes=5))
        return Case(gen()[:2] + [model] + gen()[3:], "num_classes is 5", model / "histosynth.json")
    if name == "model-json-class-channels-mismatch":
        def add_class(config):
            config["classes"].append({"id": 3, "name": "c", "color": [0, 255, 0]})
            config["num_classes"] = 3
        model = tampered_model(tmp, image, add_class)
        return Case(gen()[:2] + [model] + gen()[3:], "input / 4 output channels", model / "unet")
    if name == "model-json-bad-class-colour":
        model = tampered_model(tmp, image, lambda c: c["classes"][1].update(color="red"))
        return Case(gen()[:2] + [model] + gen()[3:], "colour must be", model / "histosynth.json")
    if name == "model-json-broken":
        model = tampered_model(tmp, image)
        write(model / "histosynth.json", '{"kind": "image",')
        return Case(gen()[:2] + [model] + gen()[3:], "broken JSON", model / "histosynth.json")
    if name == "model-missing-tensor":
        model = tampered_weights(tmp, image, "unet", lambda t: t.pop(sorted(t)[0]))
        return Case(gen()[:2] + [model] + gen()[3:], "the weights lack 1 tensor", model / "unet")
    if name == "model-nan-weights":
        model = tampered_weights(tmp, image, "unet", lambda t: t[sorted(t)[0]].fill_(float("nan")))
        return Case(gen()[:2] + [model] + gen()[3:], "NaN or infinite values", model / "unet")
    if name == "model-inf-weights":
        model = tampered_weights(tmp, image, "autoencoder", lambda t: t[sorted(t)[-1]].fill_(float("inf")))
        return Case(gen()[:2] + [model] + gen()[3:], "NaN or infinite values", model / "autoencoder")
    if name == "mask-model-nan-weights":
        model = tampered_weights(tmp, mask, "unet", lambda t: t[sorted(t)[2]].fill_(float("nan")))
        return Case(GENERATE(image, model, slide), "NaN or infinite values", model / "unet")
    if name == "model-weights-truncated":
        model = tampered_model(tmp, image)
        cut(next((model / "unet").glob("*.safetensors")))
        return Case(gen()[:2] + [model] + gen()[3:], "cannot load unet", model / "unet")
    if name == "model-pickle-planted":
        model = tampered_model(tmp, image)
        write(model / "unet" / "diffusion_pytorch_model.bin", b"\x80\x04pickle")
        return Case(gen()[:2] + [model] + gen()[3:], "pickle", model)

    # -- 3. silent data loss: outputs against inputs and each other ------------------------------------------------
    if name == "out-equals-mask":
        user_mask = mask_png(out / "layout.png")
        return Case(["generate", "--model", image, "--mask", user_mask, "--size", "64x64", "--out", user_mask],
                    "would overwrite the input --mask", user_mask)
    if name == "mask-named-like-an-output":
        user_mask = mask_png(out / "slide.mask.png")
        return Case(["generate", "--model", image, "--mask", user_mask, "--size", "64x64", "--out", slide],
                    "would overwrite the input --mask", user_mask)
    if name == "stats-equals-out":
        return Case(gen("--stats", slide), "--out and --stats would be the same file", slide)
    if name == "stats-equals-thumbnail":
        return Case(gen("--stats", out / "slide.thumbnail.png"), "the thumbnail and --stats", out)
    if name == "stats-equals-mask-input":
        user_mask = mask_png(out / "layout.png")
        return Case(["generate", "--model", image, "--mask", user_mask, "--size", "64x64", "--out", slide,
                     "--stats", user_mask], "--stats would overwrite the input --mask", user_mask)
    if name == "out-inside-model-folder":
        model = tampered_model(tmp, image)
        return Case(gen()[:2] + [model] + gen()[3:-2] + ["--out", model / "README.md"],
                    "lies inside the --model folder", model)
    if name == "out-is-a-folder":
        (out / "folder").mkdir(parents=True)
        return Case(gen()[:-2] + ["--out", out / "folder"], "is an existing folder", out / "folder")
    if name == "out-hard-link-to-mask":
        user_mask = mask_png(out / "layout.png")
        (out / "link.tiff").hardlink_to(user_mask)
        return Case(["generate", "--model", image, "--mask", user_mask, "--size", "64x64",
                     "--out", out / "link.tiff"], "would overwrite the input --mask", out / "link.tiff")
    if name == "sample-out-equals-mask":
        user_mask = mask_png(out / "m.png", 32)
        return Case(["sample", "--model", image, "--mask", user_mask, "--out", user_mask],
                    "would overwrite the input --mask", user_mask)
    if name == "sample-numbered-output-equals-mask":
        user_mask = mask_png(out / "p-1.png", 32)
        return Case(sample("--mask", user_mask, "--n", 2), "would overwrite the input --mask", user_mask)
    if name == "synthesize-out-inside-model":
        return Case(["synthesize", "--model", image, "--mask-model", mask, "--n", 2, "--out", image / "pairs"],
                    "lies inside the --model folder", image / "pairs")
    if name == "train-out-is-data":
        data = tmp / "inputs" / "data"
        shutil.copytree(shared / "data", data)
        return Case(["train", "mask", "--data", data, "--out", data], "would overwrite the input --data", data)
    if name == "evaluate-layouts-out-is-data":
        data = tmp / "inputs" / "data"
        shutil.copytree(shared / "data", data)
        return Case(["evaluate-layouts", "--mask-model", mask, "--data", data, "--n", 10, "--out", data],
                    "would overwrite the input --data", data)

    # -- 4. operating-system errors and broken files: one line, not a traceback -----------------------------------
    if name == "output-disk-read-only":
        return Case(gen(), "read-only file system", out,
                    fault=("histosynth.io.atomic.tempfile.mkdtemp",
                           raise_os_error(errno.EROFS, "Read-only file system")))
    if name == "output-disk-full":
        import tifffile
        return Case(gen(), "no space left on device", slide,
                    fault=(tifffile.TiffWriter, "write", raise_os_error(errno.ENOSPC, "No space left on device")))
    if name == "output-permission-denied":
        return Case(sample(), "permission denied", out,
                    fault=("histosynth.io.atomic.tempfile.mkdtemp", raise_os_error(errno.EACCES, "Permission denied")))
    if name == "output-parent-is-a-file":
        write(out / "file", "x")
        return Case(gen()[:-2] + ["--out", out / "file" / "slide.tiff"], "is a file, not a folder", out / "file")
    if name == "config-is-a-folder":
        (inputs / "config.yaml").mkdir()
        return Case(["train", "mask", "--config", inputs / "config.yaml"], "is a directory",
                    inputs / "config.yaml")
    if name == "resume-progress-not-json":
        generate_checkpoint(tmp, shared, lambda step: write(step / "progress.json", "{step: 1"))
        return Case(gen("--resume"), "unreadable checkpoint", "progress.json")
    if name == "resume-progress-missing-key":
        generate_checkpoint(tmp, shared, lambda step: edit_json(step / "progress.json", lambda p: p.pop("step")))
        return Case(gen("--resume"), "not a checkpoint record", "progress.json")
    if name == "resume-progress-wrong-type":
        generate_checkpoint(tmp, shared, lambda step: edit_json(step / "progress.json", lambda p: p.update(step="1")))
        return Case(gen("--resume"), "not a checkpoint record", "progress.json")
    if name == "resume-progress-step-outside-run":
        generate_checkpoint(tmp, shared, lambda step: edit_json(step / "progress.json", lambda p: p.update(step=7)))
        return Case(gen("--resume"), "step 7 is not inside the 2-step run", "progress.json")
    if name == "resume-state-truncated":
        generate_checkpoint(tmp, shared, lambda step: cut(step / "state.safetensors"))
        return Case(gen("--resume"), "damaged checkpoint", "state.safetensors")
    if name == "resume-history-truncated":
        generate_checkpoint(tmp, shared, lambda step: cut(step / "history-1.safetensors"))
        return Case(gen("--resume"), "damaged checkpoint", "history-1.safetensors")
    if name == "resume-history-unknown-canvas":
        generate_checkpoint(tmp, shared, lambda step: edit_json(step / "progress.json",
                                                                lambda p: p["canvases"].append("history-x")))
        return Case(gen("--resume"), "names a canvas 'history-x' this run has no place for", "progress.json")
    if name == "resume-history-out-of-place":
        def misplace(step):
            for suffix in (".safetensors", ".json"):
                (step / f"history-1{suffix}").rename(step / f"history-9{suffix}")
            tensors = load_file(step / "history-9.safetensors")
            save_file({key.replace("history-1", "history-9"): value for key, value in tensors.items()},
                      step / "history-9.safetensors")
            skeleton = (step / "history-9.json").read_text().replace("history-1", "history-9")
            (step / "history-9.json").write_text(skeleton)
            edit_json(step / "progress.json", lambda p: p.update(canvases=["history-9"]))
        generate_checkpoint(tmp, shared, misplace)
        return Case(gen("--resume"), "names a canvas 'history-9' this run has no place for", "progress.json")
    if name == "resume-state-wrong-shape":
        def shrink(step):
            tensors = load_file(step / "state.safetensors")
            tensors["/latents"] = tensors["/latents"][..., :4, :4].contiguous()
            save_file(tensors, step / "state.safetensors")
        generate_checkpoint(tmp, shared, shrink)
        return Case(gen("--resume"), "do not fit this canvas", "state.safetensors")
    if name == "resume-state-foreign-scheduler":
        def foreign(step):
            skeleton = json.loads((step / "state.json").read_text())
            for pair in skeleton["__dict__"]:
                if pair[0] == "scheduler":
                    pair[1]["__dict__"].append(["no_such_attribute", 1])
            (step / "state.json").write_text(json.dumps(skeleton))
        generate_checkpoint(tmp, shared, foreign)
        return Case(gen("--resume"), "scheduler state of another scheduler", "state.json")
    if name == "resume-other-seed":
        generate_checkpoint(tmp, shared)
        return Case(gen("--resume", "--seed", 5), "different settings", "slide.checkpoint")
    if name == "resume-without-checkpoint":
        return Case(gen("--resume"), "no checkpoint there; run without --resume", "slide.checkpoint")
    if name == "train-resume-record-is-a-list":
        train_checkpoint(tmp, shared, lambda step: write(step / "trainer.json", "[1, 2]"))
        return Case(train("--resume"), "not a checkpoint record", "trainer.json")
    if name == "train-resume-record-missing-step":
        train_checkpoint(tmp, shared, lambda step: edit_json(step / "trainer.json", lambda r: r.pop("step")))
        return Case(train("--resume"), "not a checkpoint record", "trainer.json")
    if name == "train-resume-record-not-json":
        train_checkpoint(tmp, shared, lambda step: cut(step / "trainer.json"))
        return Case(train("--resume"), "unreadable checkpoint record", "trainer.json")
    if name == "train-resume-other-seed":
        train_checkpoint(tmp, shared)
        return Case(train("--resume", "--seed", 3), "trained with seed 0, this run asks for 3", "trainer.json")
    if name == "train-resume-other-preset":
        train_checkpoint(tmp, shared)
        return Case(train("--resume", "--preset", "demo"), "preset 'tiny', this run trains 'demo'", "trainer.json")
    if name == "train-resume-weights-truncated":
        train_checkpoint(tmp, shared, lambda step: cut(step / "model.safetensors"))
        return Case(train("--resume"), "damaged checkpoint", "model.safetensors")
    if name == "train-resume-weights-of-another-model":
        def swap(step):
            tensors = load_file(step / "model.safetensors")
            key = next(k for k in sorted(tensors) if tensors[k].ndim == 4)
            tensors[key] = tensors[key][:1].contiguous()
            save_file(tensors, step / "model.safetensors")
        train_checkpoint(tmp, shared, swap)
        return Case(train("--resume"), "weights of another model", "model.safetensors")
    if name == "train-resume-optimizer-damaged":
        train_checkpoint(tmp, shared, lambda step: cut(step / "optimizer.safetensors"))
        return Case(train("--resume"), "damaged optimizer state", "optimizer.safetensors")
    if name == "train-resume-without-checkpoint":
        (out / "mask.train").mkdir(parents=True)
        return Case(train("--resume"), "no checkpoint found there", "mask.train")
    if name == "train-left-without-checkpoint":
        write(out / "mask.train" / "loss.csv", "step,loss\n")
        return Case(train(), "before its first checkpoint", "mask.train")
    if name == "train-yaml-steps-text":
        config = write(inputs / "c.yaml", f"data: {shared / 'data'}\nout: {out / 'm'}\nsteps: ten\n")
        return Case(["train", "mask", "--config", config], "'steps' must be a whole number", config)
    if name == "train-yaml-learning-rate-list":
        config = write(inputs / "c.yaml", f"data: {shared / 'data'}\nout: {out / 'm'}\nlearning_rate: [1]\n")
        return Case(["train", "mask", "--config", config], "'learning_rate' must be a number", config)
    if name == "train-yaml-seed-fraction":
        config = write(inputs / "c.yaml", f"data: {shared / 'data'}\nout: {out / 'm'}\nseed: 1.5\n")
        return Case(["train", "mask", "--config", config], "'seed' must be a whole number", config)
    if name == "train-yaml-data-mapping":
        config = write(inputs / "c.yaml", f"data: {{a: 1}}\nout: {out / 'm'}\n")
        return Case(["train", "mask", "--config", config], "'data' must be text or a path", config)
    if name == "train-yaml-not-a-mapping":
        config = write(inputs / "c.yaml", "- steps\n- 3\n")
        return Case(["train", "mask", "--config", config], "expected a mapping", config)
    if name == "train-yaml-binary":
        config = write(inputs / "c.yaml", b"\xff\xfe\x00\x01")
        return Case(["train", "mask", "--config", config], "not a text file", config)
    if name == "mask-decompression-bomb":
        bomb = bomb_png(inputs / "bomb.png")
        return Case(["generate", "--model", image, "--mask", bomb, "--size", "64x64", "--out", slide],
                    "decompression bomb", bomb)
    if name == "prepare-decompression-bomb":
        bomb = bomb_png(inputs / "bomb.png")
        return Case(["prepare", bomb, "--source-mpp", 0.5, "--out", out / "data", "--mpp", 0.5, "--patch", 32],
                    "decompression bomb", bomb)
    if name == "seams-decompression-bomb":
        bomb = bomb_png(inputs / "bomb.png")
        return Case(["seams", bomb, "--patch", 16], "cannot read as an image", bomb)
    if name == "survey-decompression-bomb":
        real, synthetic = inputs / "real", inputs / "synthetic"
        mask_png(real / "a.png", 8)
        mask_png(synthetic / "b.png", 8)
        bomb_png(real / "c.png")
        return Case(["survey", "create", "--real", real, "--synthetic", synthetic, "--out", out / "study"],
                    "cannot read image", real / "c.png")
    if name == "seams-truncated-tiff":
        broken = truncated_tiff(inputs / "cut.tiff")
        return Case(["seams", broken, "--patch", 64], "truncated", broken)
    if name == "view-truncated-tiff":
        broken = truncated_tiff(inputs / "cut.tiff")
        return Case(["view", broken, "--export", out / "viewer"], "truncated", broken)
    if name == "prepare-truncated-tiff":
        broken = truncated_tiff(inputs / "cut.tiff")
        return Case(["prepare", broken, "--source-mpp", 0.5, "--out", out / "data", "--mpp", 0.5, "--patch", 32],
                    "truncated", broken)
    if name == "mask-truncated-png":
        broken = mask_png(inputs / "layout.png")
        cut(broken, 0.6)
        return Case(["generate", "--model", image, "--mask", broken, "--size", "64x64", "--out", slide],
                    "not a readable mask image", broken)
    if name == "usage-unknown-option":
        return Case(gen("--no-such-flag"), "No such option", "--no-such-flag")
    raise KeyError(name)


CASES = [
    # 2. option ranges
    "generate-guidance-nan", "generate-guidance-inf", "generate-steps-0", "generate-steps-negative",
    "generate-mask-steps-0", "generate-batch-0", "generate-stride-0", "generate-blend-last-beyond-steps",
    "generate-heal-detail-negative", "generate-checkpoint-every-negative", "generate-sampler-bogus", "generate-scheduler-bogus",
    "generate-compression-bogus", "generate-format-bogus", "generate-size-zero", "generate-size-text",
    "generate-size-beyond-memory", "generate-size-beyond-tiff", "generate-size-not-integer-option",
    "generate-guidance-overflows", "sample-n-0", "sample-steps-0", "sample-guidance-nan", "sample-scheduler-bogus",
    "synthesize-n-0", "synthesize-elastic-nan", "vary-steps-0", "demo-size-0", "evaluate-layouts-steps-0",
    "prepare-mpp-nan", "prepare-mpp-negative", "prepare-source-mpp-inf", "prepare-patch-0", "prepare-fraction-nan",
    "train-steps-0", "train-learning-rate-nan", "train-batch-size-0",
    # 2. model folders
    "model-is-a-mask-model", "sample-model-is-a-mask-model", "mask-model-is-an-image-model",
    "model-json-without-kind", "model-json-kind-unknown", "model-json-mask-relabelled-image", "model-json-is-a-list",
    "model-json-missing-key", "model-json-wrong-type", "model-json-mpp-negative", "model-json-class-count-mismatch",
    "model-json-class-channels-mismatch", "model-json-bad-class-colour", "model-json-broken",
    "model-missing-tensor", "model-nan-weights", "model-inf-weights", "mask-model-nan-weights",
    "model-weights-truncated", "model-pickle-planted",
    # 3. outputs against inputs and each other
    "out-equals-mask", "mask-named-like-an-output", "stats-equals-out", "stats-equals-thumbnail",
    "stats-equals-mask-input", "out-inside-model-folder", "out-is-a-folder", "out-hard-link-to-mask",
    "sample-out-equals-mask", "sample-numbered-output-equals-mask", "synthesize-out-inside-model",
    "train-out-is-data", "evaluate-layouts-out-is-data",
    # 4. operating-system errors, resume checkpoints, configs, broken files
    "output-disk-read-only", "output-disk-full", "output-permission-denied", "output-parent-is-a-file",
    "config-is-a-folder",
    "resume-progress-not-json", "resume-progress-missing-key", "resume-progress-wrong-type",
    "resume-progress-step-outside-run", "resume-state-truncated", "resume-state-wrong-shape",
    "resume-history-truncated", "resume-history-unknown-canvas", "resume-history-out-of-place",
    "resume-state-foreign-scheduler", "resume-other-seed", "resume-without-checkpoint",
    "train-resume-record-is-a-list", "train-resume-record-missing-step", "train-resume-record-not-json",
    "train-resume-other-seed", "train-resume-other-preset", "train-resume-weights-truncated",
    "train-resume-weights-of-another-model", "train-resume-optimizer-damaged", "train-resume-without-checkpoint",
    "train-left-without-checkpoint",
    "train-yaml-steps-text", "train-yaml-learning-rate-list", "train-yaml-seed-fraction", "train-yaml-data-mapping",
    "train-yaml-not-a-mapping", "train-yaml-binary",
    "mask-decompression-bomb", "prepare-decompression-bomb", "seams-decompression-bomb", "survey-decompression-bomb",
    "seams-truncated-tiff", "view-truncated-tiff", "prepare-truncated-tiff", "mask-truncated-png",
    "usage-unknown-option",
]


def snapshot(*folders: Path) -> dict[str, str]:
    """Every path under the folders (hidden ones too) with a digest of its bytes; folders as themselves."""
    state = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            state[str(path)] = "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def _is_progress(line: str) -> bool:
    return "%|" in line or "it/s" in line or "s/it" in line


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, tmp_path, shared, monkeypatch):
    case = build(name, tmp_path, shared)
    before = snapshot(tmp_path, shared)
    if case.fault is not None:
        monkeypatch.setattr(*case.fault)
    code, text = run_cli(case.args)
    monkeypatch.undo()
    lines = [line for line in text.splitlines() if line.strip() and not _is_progress(line)]
    assert code == 2, text
    assert "Traceback" not in text, text
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert str(case.names) in lines[0] and case.expect.lower() in lines[0].lower(), lines[0]
    assert snapshot(tmp_path, shared) == before  # inputs unchanged, nothing written, nothing left behind


def test_the_corpus_covers_every_case_once():
    assert len(CASES) == len(set(CASES)) >= 60
