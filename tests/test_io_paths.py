"""Output paths against inputs, all-or-nothing writes of several files, and what a killed writer leaves."""
import errno
import os
import subprocess

import pytest

from histosynth.cli import os_error_line
from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_files, atomic_path, remove_stale_temps
from histosynth.io.paths import check_outputs


@pytest.fixture
def files(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.safetensors").write_bytes(b"w")
    (tmp_path / "mask.png").write_bytes(b"m")
    (tmp_path / "link.png").hardlink_to(tmp_path / "mask.png")
    (tmp_path / "folder").mkdir()
    (tmp_path / "plain").write_bytes(b"p")
    return tmp_path


@pytest.mark.parametrize("outputs, folders, message", [
    ({"--out": "mask.png"}, [], "--out would overwrite the input --mask"),
    ({"--out": "sub/../mask.png"}, [], "--out would overwrite the input --mask"),  # the same file, spelt otherwise
    ({"--out": "link.png"}, [], "--out would overwrite the input --mask"),  # a hard link to it
    ({"--out": "model/slide.tiff"}, [], "lies inside the --model folder"),
    ({"--out": "."}, ["--out"], "would replace the folder holding the input --model"),
    ({"--out": "folder"}, [], "is an existing folder"),
    ({"--out": "plain/slide.tiff"}, [], "is a file, not a folder"),
    ({"--out": "a.tiff", "--stats": "a.tiff"}, [], "--out and --stats would be the same file"),
    ({"--out": "pairs", "--stats": "pairs/stats.json"}, ["--out"], "would be the same file"),
])
def test_colliding_outputs_are_refused(files, outputs, folders, message):
    (files / "sub").mkdir()
    with pytest.raises(HistosynthError, match=message.replace("(", r"\(")):
        check_outputs({label: files / path for label, path in outputs.items()},
                      {"--model": files / "model", "--mask": files / "mask.png", "--style": None},
                      folders=folders, sealed=["--model"])


def test_distinct_outputs_pass(files):
    check_outputs({"--out": files / "new" / "slide.tiff", "--stats": files / "stats.json"},
                  {"--model": files / "model", "--mask": [files / "mask.png"], "--style": None}, sealed=["--model"])


def test_several_files_appear_together_or_not_at_all(tmp_path):
    finals = {"a": tmp_path / "out" / "a.txt", "b": tmp_path / "out" / "b.txt", "c": tmp_path / "c.txt"}
    with pytest.raises(RuntimeError):
        with atomic_files(finals) as tmp:
            tmp["a"].write_text("a")
            tmp["b"].write_text("b")
            raise RuntimeError("fails before the last file")
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # not even the folder it made
    with atomic_files(finals) as tmp:
        for key, path in tmp.items():
            assert path.parent.name.startswith(".") and path.name == finals[key].name
            path.write_text(key)
    assert {key: path.read_text() for key, path in finals.items()} == {"a": "a", "b": "b", "c": "c"}
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []


def test_an_error_without_a_file_names_the_output(tmp_path):
    with pytest.raises(OSError) as caught:
        with atomic_path(tmp_path / "slide.tiff") as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.filename == str(tmp_path / "slide.tiff")
    assert os_error_line(caught.value) == f"{tmp_path / 'slide.tiff'}: no space left on device; free some space " \
                                          "or write elsewhere"
    assert list(tmp_path.iterdir()) == []


def test_only_the_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.png.{dead.pid}-ab12.tmp"
    alive = tmp_path / f".out.png.{os.getppid()}-cd34.tmp"
    mine = tmp_path / f".out.png.{os.getpid()}-ef56.tmp"
    other = tmp_path / f".out.png.extra.{dead.pid}-gh78.tmp"  # the temporary of out.png.extra, not of out.png
    for path in (stale, alive, mine, other):
        path.write_bytes(b"x")
    assert remove_stale_temps(tmp_path / "out.png") == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (alive, mine, other))
