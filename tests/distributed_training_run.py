"""Run by test_distributed.py under torchrun (or alone): a few steps of the tiny image model; rank 0 saves the
first step's gradients and the loss curve to OUT."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from histosynth.data.dataset import load_dataset_index
from histosynth.models.autoencoder import load_autoencoder, measure_latent_scale
from histosynth.models.denoiser import ConditionedDenoiser, DiffusionObjective, build_unet, make_train_scheduler
from histosynth.train.run import _patches
from histosynth.train.tasks import ImageTask
from histosynth.train.trainer import Trainer, TrainConfig

torch.set_num_threads(1)
data, autoencoder, out, steps = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
index = load_dataset_index(data)
vae = load_autoencoder(autoencoder).eval()
with torch.no_grad():
    measure_latent_scale(vae, _patches(data, "train", 16))
torch.manual_seed(0)
num_classes = max(c["id"] for c in index["classes"])
unet = build_unet("tiny", 4 + num_classes, 4, index["patch_size"] // 4)
objective = DiffusionObjective(ConditionedDenoiser(unet, 4, num_classes), make_train_scheduler())
task = ImageTask(objective, vae, data, num_classes, 0.1)
gradients = {}


def keep_first(step, module):
    if step == 1:
        gradients.update({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})


trainer = Trainer(task, TrainConfig(steps=steps, batch_size=4, learning_rate=1e-3, warmup_steps=1, checkpoint_every=0,
                                    ema_decay=0.0), out / "work", after_backward=[keep_first])
trainer.fit()
if trainer.accelerator.is_main_process:
    save_file(gradients, str(out / "gradients.safetensors"))
    (out / "losses.json").write_text(json.dumps([loss for _, loss in trainer.history]))
if torch.distributed.is_initialized():  # leave together: a rank exiting early can abort its peer's transport
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
