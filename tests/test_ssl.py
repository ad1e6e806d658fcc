"""histosynth's self-supervised encoder: the NT-Xent loss against a hand computation, seeded augmentations, and
`histosynth train ssl` writing an encoder folder whose weights changed and that `embed` accepts."""
import json
import math

import torch
import torch.nn.functional as F

from histosynth.conditions.encoders import load_encoder, load_ssl_encoder
from histosynth.train.ssl import augment_view, build_ssl_encoder, nt_xent
from test_embedding import tiny_dataset
from cli_runner import cli  # noqa: F401  (fixture)

torch.set_num_threads(1)


def test_nt_xent_matches_a_hand_computation():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    t = 0.5
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i, positive in enumerate([2, 3, 0, 1]):
        others = [j for j in range(4) if j != i]
        logits = torch.stack([z[i] @ z[j] / t for j in others])
        total += -(z[i] @ z[positive] / t - torch.logsumexp(logits, 0))
    assert torch.allclose(nt_xent(z1, z2, t), total / 4, atol=1e-6)
    # Identical pairs far from the others give a loss near its minimum.
    far = torch.eye(4) * 10
    assert nt_xent(far, far, 0.1) < 1e-3


def test_augmentation_is_seeded_and_strong():
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = augment_view(image, torch.Generator().manual_seed(1), 24)
    b = augment_view(image, torch.Generator().manual_seed(1), 24)
    c = augment_view(image, torch.Generator().manual_seed(2), 24)
    assert a.shape == (3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= float(a.min()) and float(a.max()) <= 1


def test_train_ssl_cli_writes_an_encoder_whose_weights_changed(tmp_path, cli):
    data = tiny_dataset(tmp_path / "ds", side=4)
    out = tmp_path / "encoder"
    code, text = cli(["train", "ssl", "--data", data, "--out", out, "--steps", 6, "--batch-size", 8,
                      "--checkpoint-every", 0, "--image-size", 24])
    assert code == 0, text
    config = json.loads((out / "histosynth.json").read_text())
    assert config["kind"] == "encoder" and config["method"] == "simclr" and config["input_size"] == 24
    assert math.isfinite(config["training"]["loss_last"])
    trained = load_ssl_encoder(out)
    torch.manual_seed(0)  # the initial weights train_ssl starts from (seed 0)
    initial = build_ssl_encoder("tiny", 24)
    changed = [name for name, p in trained.named_parameters()
               if not torch.equal(p, dict(initial.named_parameters())[name])]
    assert len(changed) == len(list(initial.parameters()))  # every parameter received gradients
    encoder = load_encoder(str(out))
    assert encoder.dim == config["dim"] == 64 and encoder.input_size == 24
    code, text = cli(["embed", "--data", data, "--encoder", out])
    assert code == 0, text
    code, text = cli(["train", "ssl", "--data", data, "--out", tmp_path / "x", "--preset", "huge"])
    assert code == 2 and "unknown preset" in text
