"""Two CPU processes (gloo) agree with one: training gradients and losses, and the canvas bit for bit.

Every two-process run goes through tests/torchrun.py: its own free rendezvous port, a timeout, and a failure message
naming the rank and the signal.
"""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from histosynth.data.prepare import prepare_dataset
from histosynth.data.samples import png_path
from histosynth.models.autoencoder import build_autoencoder
from tiny_models import tiny_image_model, tiny_mask_model
from torchrun import env, failed_ranks, kill_group, run_two, start

HERE = Path(__file__).parent


def test_failed_ranks_are_named_with_their_signal():
    report = """[0]:
  time      : 2026-12-01_10:00:00
  host      : ci
  rank      : 1 (local_rank: 1)
  exitcode  : -6 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 6 (SIGABRT) received by PID 4242
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 4241)
"""
    assert failed_ranks(report) == ["rank 0: exit code 1", "rank 1: killed by signal 6 (SIGABRT)"]


def test_two_process_training_matches_one(tmp_path):
    data = tmp_path / "data"
    prepare_dataset([png_path()], data, 0.5, 32, source_mpp=0.25, auto_labels_=True, progress=False)
    torch.manual_seed(0)
    build_autoencoder("tiny").save_pretrained(tmp_path / "vae", safe_serialization=True)
    script = str(HERE / "distributed_training_run.py")
    args = [str(data), str(tmp_path / "vae")]
    subprocess.run([sys.executable, script, *args, str(tmp_path / "one"), "20"], check=True, env=env(),
                   capture_output=True, timeout=300)
    run_two([script, *args, str(tmp_path / "two"), "20"])
    one, two = load_file(str(tmp_path / "one" / "gradients.safetensors")), load_file(str(tmp_path / "two" / "gradients.safetensors"))
    assert one.keys() == two.keys() and len(one) > 10
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5, rtol=1e-4), name
    losses_one = json.loads((tmp_path / "one" / "losses.json").read_text())
    losses_two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert len(losses_one) == len(losses_two) == 20
    for a, b in zip(losses_one, losses_two):
        assert abs(a - b) <= 0.01 * abs(a)


def test_two_process_canvas_equals_one_bit_for_bit(tmp_path):
    image, mask = tiny_image_model(tmp_path / "image", patch=32), tiny_mask_model(tmp_path / "mask")
    command = ["-m", "histosynth", "generate", "--model", str(image), "--mask-model", str(mask), "--size", "256x192",
               "--steps", "3", "--batch", "2"]
    subprocess.run([sys.executable, *command, "--out", str(tmp_path / "one.tiff")], check=True, env=env(),
                   capture_output=True, timeout=300)
    run_two([*command, "--out", tmp_path / "two.tiff", "--stats", tmp_path / "two.json"])
    assert (tmp_path / "one.tiff").read_bytes() == (tmp_path / "two.tiff").read_bytes()
    assert (tmp_path / "one.mask.tiff").read_bytes() == (tmp_path / "two.mask.tiff").read_bytes()
    stats = json.loads((tmp_path / "two.json").read_text())
    assert stats["processes"] == 2 and 0 < stats["unet_evals_this_process"] < stats["unet_evals"]


def test_two_process_synthesize_writes_the_same_pairs(tmp_path):
    image, mask = tiny_image_model(tmp_path / "image", patch=32), tiny_mask_model(tmp_path / "mask", crop=4)
    command = ["-m", "histosynth", "synthesize", "--model", str(image), "--mask-model", str(mask), "-n", "5",
               "--batch", "2", "--steps", "2", "--seed", "4"]
    subprocess.run([sys.executable, *command, "--out", str(tmp_path / "one")], check=True, env=env(),
                   capture_output=True, timeout=300)
    run_two([*command, "--out", tmp_path / "two"])
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert one == two and len([p for p in one if p.parts[0] == "images"]) == 5
    for name in one:
        a, b = (tmp_path / "one" / name).read_bytes(), (tmp_path / "two" / name).read_bytes()
        if name.name == "dataset.json":  # sources record the absolute path of each image
            a, b = a.replace(str(tmp_path / "one").encode(), b""), b.replace(str(tmp_path / "two").encode(), b"")
        assert a == b, name
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_process_that_dies_stops_the_others_with_an_error(tmp_path):
    """SIGKILL one of two ranks mid-canvas: the run ends (no hang) with a non-zero status naming the failure."""
    image, mask = tiny_image_model(tmp_path / "image", patch=32), tiny_mask_model(tmp_path / "mask")
    command = ["-m", "histosynth", "generate", "--model", str(image), "--mask-model", str(mask), "--size", "512x512",
               "--steps", "400", "--batch", "2", "--checkpoint-every", "1", "--out", str(tmp_path / "slide.tiff")]
    run = start(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "slide.checkpoint").exists():  # the canvas is under way
            assert time.monotonic() < deadline and run.poll() is None, "generation did not start"
            time.sleep(0.2)
        workers = [p for p in psutil.Process(run.pid).children(recursive=True)
                   if p.environ().get("RANK") == "1"]
        assert len(workers) == 1
        workers[0].send_signal(signal.SIGKILL)
        output, _ = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            kill_group(run)
    assert run.returncode != 0
    assert "rank 1: killed by signal 9 (SIGKILL)" in failed_ranks(output), output[-2000:]
    assert not (tmp_path / "slide.tiff").exists()
