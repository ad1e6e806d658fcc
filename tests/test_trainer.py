"""The shared trainer: resume equals an uninterrupted run; state round-trips without pickles."""
import torch

from histosynth.io.state import load_state, save_state
from histosynth.train.trainer import Trainer, TrainConfig, checkpoints, rank_slice, step_plan

torch.set_num_threads(1)


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1))

    def forward(self, batch):
        return ((self.net(batch["x"]) - batch["y"]) ** 2).mean()


class RegressionTask:
    def __init__(self):
        self.module = Regression()

    def dataset_size(self):
        return 50

    def make_batch(self, indices, seeds, device):
        xs = torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return {"x": xs, "y": xs.sum(1, keepdim=True) + torch.tensor(indices, dtype=torch.float32)[:, None] / 50}


def weights(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path):
    config = TrainConfig(steps=12, batch_size=4, learning_rate=1e-2, warmup_steps=3, checkpoint_every=5)
    straight = Trainer(RegressionTask(), config, tmp_path / "a").fit()
    # Interrupted after step 5 (the checkpoint), then resumed.
    Trainer(RegressionTask(), TrainConfig(**{**config.__dict__, "steps": 5}), tmp_path / "b").fit()
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["step-00000005"]
    resumed_trainer = Trainer(RegressionTask(), config, tmp_path / "b")
    resumed = resumed_trainer.fit(resume=True)
    assert torch.allclose(weights(straight), weights(resumed), atol=1e-6)
    assert len(resumed_trainer.history) == 12
    assert (tmp_path / "b" / "loss.csv").read_text().count("\n") == 13


def test_loss_decreases_and_ema_is_applied(tmp_path):
    trainer = Trainer(RegressionTask(), TrainConfig(steps=60, batch_size=8, learning_rate=2e-2, warmup_steps=1,
                                                    checkpoint_every=0, ema_decay=0.9), tmp_path)
    trainer.fit()
    summary = trainer.summary()
    assert summary["loss_last"] < summary["loss_first"] / 2


def test_step_plan_depends_only_on_seed_and_step():
    assert step_plan(0, 7, 4, 100) == step_plan(0, 7, 4, 100)
    assert step_plan(0, 7, 4, 100) != step_plan(0, 8, 4, 100)
    indices, _ = step_plan(1, 0, 6, 10)
    assert rank_slice(indices, 0, 2) + rank_slice(indices, 1, 2) == indices


def test_nested_state_round_trips(tmp_path):
    state = {"a": torch.arange(3), "b": [torch.ones(2), None, 3], "c": {"d": 1.5, "e": "x"}, 4: torch.zeros(1)}
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert torch.equal(back["a"], state["a"]) and back["b"][1] is None and back["b"][2] == 3
    assert back["c"] == {"d": 1.5, "e": "x"}
    assert torch.equal(back[4], state[4])


def test_the_latent_cache_is_bounded_and_changes_no_batch(tmp_path):
    """Least recently used latents are dropped beyond the cap; a batch is the same bytes with a cache of two
    latents as with a cache of all (encoding is deterministic)."""
    from histosynth.data.prepare import prepare_dataset
    from histosynth.data.samples import png_path
    from histosynth.models.autoencoder import build_autoencoder
    from histosynth.models.denoiser import ConditionedDenoiser, DiffusionObjective, build_unet, make_train_scheduler
    from histosynth.train.tasks import ImageTask, LatentCache

    cache = LatentCache(max_bytes=2 * 4 * 16)  # room for two (4, 2, 2) float32 latents
    for key in range(3):
        cache.put((key, 0), torch.full((4, 2, 2), float(key)))
    assert len(cache) == 2 and cache.get((0, 0)) is None and cache.bytes == 128
    cache.get((1, 0))  # used: (2, 0) is now the least recent
    cache.put((3, 0), torch.zeros(4, 2, 2))
    assert cache.get((2, 0)) is None and cache.get((1, 0)) is not None

    prepare_dataset([png_path()], tmp_path / "ds", 1.0, 16, source_mpp=0.25, auto_labels="colour", progress=False)
    torch.manual_seed(0)
    vae = build_autoencoder("tiny")
    objective = DiffusionObjective(ConditionedDenoiser(build_unet("tiny", 7, 4, 4), 4, 3), make_train_scheduler())
    latent_bytes = 4 * 4 * 4 * 4
    small = ImageTask(objective, vae, str(tmp_path / "ds"), 3, latent_cache_bytes=2 * latent_bytes)
    large = ImageTask(objective, vae, str(tmp_path / "ds"), 3)
    for step in range(3):
        indices, seeds = list(range(step, step + 6)), [11 * step + i for i in range(6)]
        a, b = small.make_batch(indices, seeds, "cpu"), large.make_batch(indices, seeds, "cpu")
        assert torch.equal(a["clean"], b["clean"]) and torch.equal(a["conditions"]["mask"], b["conditions"]["mask"])
    assert small._latents.bytes <= 2 * latent_bytes and len(small._latents) == 2
    assert len(large._latents) > 10
