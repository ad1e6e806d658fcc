"""The `demo` preset on this CPU: autoencoder PSNR and sharpness on the test split, training throughput, sampling time
per patch.

    python benchmarks/image_model.py [--data demo-data/dataset] [--threads 2]

Uses the bundled demo weights; prepares the demo dataset (the same recipe as `make demo-weights`) when missing.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import histosynth  # noqa: E402
from histosynth.data.prepare import prepare_dataset  # noqa: E402
from histosynth.data.samples import svs_path  # noqa: E402
from histosynth.eval.sharpness import high_frequency_ratio  # noqa: E402
from histosynth.models.autoencoder import psnr, reconstruct  # noqa: E402
from histosynth.pipelines.sample_patches import sample_images  # noqa: E402
from histosynth.pixels import to_uint8  # noqa: E402
from histosynth.train.run import _patches, train_image  # noqa: E402
from histosynth.train.trainer import TrainConfig  # noqa: E402

DEMO = ROOT / "histosynth" / "weights" / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "demo-data" / "dataset"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not data.exists():
        prepare_dataset([svs_path()], data, 0.5, 128, stride=64, auto_labels="regions", label_fraction=0.5, seed=0,
                        progress=False)
    model = histosynth.load(DEMO / "image")
    vae = model.autoencoder
    with torch.no_grad():
        test = _patches(str(data), "test", 10_000)
        recon = reconstruct(vae, test)
    sharpness = high_frequency_ratio(to_uint8(recon), to_uint8(test))
    print(f"autoencoder ({sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, "
          f"{model.latent_factor}× latents, {vae.config.latent_channels} channels): PSNR on {len(test)} test patches "
          f"= {psnr(recon, test):.2f} dB, high-frequency energy ratio (reconstructed / real) = {sharpness:.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(steps=args.train_steps, batch_size=16, checkpoint_every=0, warmup_steps=1)
        began = time.perf_counter()
        train_image(str(data), str(Path(tmp) / "m"), str(DEMO / "autoencoder"), "demo", config=config)
        seconds = time.perf_counter() - began
        shutil.rmtree(tmp, ignore_errors=True)
    unet_parameters = sum(p.numel() for p in model.unet.parameters()) / 1e6
    print(f"image model training (demo preset, {unet_parameters:.2f} M parameters, batch 16 × "
          f"{model.config['patch_size']} px): {args.train_steps * 16 / seconds:.1f} patches/s "
          f"({seconds / args.train_steps:.2f} s/step, first-step latent encoding included)")

    mask = torch.zeros(model.config["patch_size"], model.config["patch_size"], dtype=torch.uint8).numpy()
    mask[:, : mask.shape[1] // 2] = min(2, model.num_classes)
    mask[: mask.shape[0] // 2] = model.num_classes
    for guidance in (1.0, 1.5):
        began = time.perf_counter()
        sample_images(model, mask, n=args.samples, guidance=guidance, steps=20, seed=0)
        seconds = time.perf_counter() - began
        print(f"sampling, stochastic DPM-Solver++ (dpm++sde) 20 steps, guidance {guidance}: {seconds / args.samples:.2f} s per "
              f"{model.config['patch_size']} px patch (batch of {args.samples})")


if __name__ == "__main__":
    main()
