"""Reader study: blinded creation, bad input, the web app's access rules, resuming, and the report's counts."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from cli_runner import cli  # noqa: F401  (fixture)
from histosynth.survey.app import create_app
from histosynth.survey.study import (
    KEY_FILE,
    open_study,
    reader_by_name,
    reader_order,
)

# Distinctive markers: none may ever reach a reader's browser or a study image.
REAL_MARK, SYNTH_MARK, META_MARK = "REALSRC", "SYNTHSRC", "METASECRET"


def make_images(folder: Path, count: int, mark: str, seed: int, kinds: tuple[str, ...] = ("png",)) -> Path:
    """``count`` small random images of varied sizes, formats and metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        kind = kinds[i % len(kinds)]
        h, w = 40 + 8 * (i % 3), 56 - 4 * (i % 2)
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        if kind == "jpg":
            exif = Image.Exif()
            exif[0x010E] = META_MARK  # ImageDescription
            image.save(folder / f"{mark}_{i}.jpg", quality=90, exif=exif)
        elif kind == "rgba":
            image.putalpha(200)
            image.save(folder / f"{mark}_{i}.png")
        else:
            info = PngImagePlugin.PngInfo()
            info.add_text("Comment", META_MARK)
            image.save(folder / f"{mark}_{i}.png", pnginfo=info)
    return folder


@pytest.fixture
def folders(tmp_path):
    real = make_images(tmp_path / "real", 4, REAL_MARK, 0, kinds=("jpg", "png"))
    synthetic = make_images(tmp_path / "synthetic", 5, SYNTH_MARK, 1, kinds=("png", "rgba"))
    return real, synthetic


@pytest.fixture
def study(tmp_path, folders, cli):
    real, synthetic = folders
    code, out = cli(["survey", "create", "--real", real, "--synthetic", synthetic, "--n", 4, "--size", 32,
                     "--seed", 7, "--out", tmp_path / "study"])
    assert code == 0, out
    return tmp_path / "study"


def _token(link: str) -> str:
    return link.strip().rsplit("/r/", 1)[1]


def test_create_is_balanced_blinded_and_deterministic(tmp_path, folders, study, cli):
    key = json.loads((study / KEY_FILE).read_text())["items"]
    truths = [entry["truth"] for entry in key.values()]
    assert sorted(truths) == ["real"] * 4 + ["synthetic"] * 4
    meta = json.loads((study / "study.json").read_text())
    assert set(meta) == {"format", "version", "size", "n_per_class", "seed", "items"}  # no truths, no sources
    assert meta["items"] == sorted(key)  # stored sorted: not in the shuffled order that follows the truths
    images = sorted((study / "images").iterdir())
    assert [p.stem for p in images] == sorted(key)
    for path in images:
        assert re.fullmatch(r"[A-Za-z0-9_-]{16}\.png", path.name)  # 96 random bits, URL-safe
        data = path.read_bytes()
        assert META_MARK.encode() not in data and b"Exif" not in data and b"tEXt" not in data
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
            assert not set(image.info) - {"dpi"}  # nothing that says where it came from

    # Same inputs and seed: the same images, but new ids (the seed must not give them away); another seed: other ids.
    again = tmp_path / "again"
    assert cli(["survey", "create", "--real", folders[0], "--synthetic", folders[1], "--n", 4, "--size", 32,
                "--seed", 7, "--out", again])[0] == 0
    again_key = json.loads((again / KEY_FILE).read_text())["items"]
    assert sorted((v["source"], (again / "images" / f"{k}.png").read_bytes()) for k, v in again_key.items()) == \
        sorted((v["source"], (study / "images" / f"{k}.png").read_bytes()) for k, v in key.items())
    assert set(again_key).isdisjoint(key)
    other = tmp_path / "other"
    assert cli(["survey", "create", "--real", folders[0], "--synthetic", folders[1], "--n", 4, "--size", 32,
                "--seed", 8, "--out", other])[0] == 0
    assert {p.name for p in (other / "images").iterdir()}.isdisjoint(p.name for p in images)


def _one_error_line(code: int, out: str) -> str:
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def test_create_bad_input(tmp_path, folders, cli):
    real, synthetic = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    create = lambda *extra: cli(["survey", "create", "--real", real, "--synthetic", synthetic, *extra])  # noqa: E731

    assert "no images" in _one_error_line(*cli(["survey", "create", "--real", empty, "--synthetic", synthetic,
                                                 "--out", tmp_path / "s1"]))
    line = _one_error_line(*create("--n", 5, "--out", tmp_path / "s2"))
    assert "needs 5 real images" in line and "has 4" in line

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"this is no png")
    assert "cannot read image" in _one_error_line(*cli(["survey", "create", "--real", real, "--synthetic", broken,
                                                        "--out", tmp_path / "s3"]))
    # A valid header and truncated pixels fail half-way through writing: nothing may be left behind.
    truncated = make_images(tmp_path / "truncated", 1, SYNTH_MARK, 2)
    png = next(truncated.iterdir())
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    line = _one_error_line(*cli(["survey", "create", "--real", real, "--synthetic", truncated, "--n", 1,
                                 "--out", tmp_path / "s4"]))
    assert "cannot read image" in line and png.name in line
    assert not (tmp_path / "s4").exists() and not list(tmp_path.glob(".s4*"))

    (tmp_path / "taken").mkdir()
    assert "already exists" in _one_error_line(*create("--out", tmp_path / "taken"))
    assert "not a reader study" in _one_error_line(*cli(["survey", "add-reader", tmp_path / "taken", "ann"]))


def test_readers_orders_and_duplicate_names(study, cli):
    code, link = cli(["survey", "add-reader", study, "ann", "--url", "http://127.0.0.1:9999"])
    assert code == 0 and re.fullmatch(r"http://127\.0\.0\.1:9999/r/[\w-]{20,}\n", link)
    assert cli(["survey", "add-reader", study, "ben"])[0] == 0
    assert "already has a reader" in _one_error_line(*cli(["survey", "add-reader", study, "ann"]))
    opened = open_study(study)
    ann, ben = reader_by_name(opened, "ann"), reader_by_name(opened, "ben")
    assert ann.token != ben.token
    assert sorted(reader_order(opened, ann)) == sorted(opened.items)
    assert reader_order(opened, ann) != reader_order(opened, ben)  # each their own order
    assert reader_order(opened, ann) == reader_order(open_study(study), reader_by_name(opened, "ann"))
    code, listing = cli(["survey", "readers", study])
    assert code == 0 and "ann\t0/8" in listing and ben.token in listing


def test_web_app_access_rules_resume_and_report(study, cli):
    tokens = {name: _token(cli(["survey", "add-reader", study, name])[1]) for name in ("ann", "ben")}
    opened = open_study(study)
    key = {item: v["truth"] for item, v in json.loads((study / KEY_FILE).read_text())["items"].items()}
    client = create_app(study).test_client()
    ann, ben = tokens["ann"], tokens["ben"]

    # Invalid tokens: 403 everywhere.
    item = opened.items[0]
    for url in ("/r/nope", "/r/nope/state", f"/r/nope/items/{item}.png"):
        assert client.get(url).status_code == 403
    assert client.post("/r/nope/answer", json={}).status_code == 403

    # Bad answers are refused and change nothing.
    state = client.get(f"/r/{ann}/state").get_json()
    assert state == {"reader": "ann", "total": 8, "done": 0, "position": 1,
                     "item": reader_order(opened, reader_by_name(opened, "ann"))[0]}
    good = {"item": state["item"], "answer": "real", "confidence": 3, "comment": ""}
    for bad in ({"answer": "maybe"}, {"confidence": 0}, {"confidence": 6}, {"confidence": "3"}, {"confidence": True},
                {"comment": 5}):
        assert client.post(f"/r/{ann}/answer", json={**good, **bad}).status_code == 400
    assert client.post(f"/r/{ann}/answer", data="answer=real").status_code == 400
    wrong_item = next(i for i in opened.items if i != state["item"])
    assert client.post(f"/r/{ann}/answer", json={**good, "item": wrong_item}).status_code == 409

    # Ann answers 3 items, Ben answers all 8 (with a comment Ann must never see).
    given = {"ann": [], "ben": []}
    for name, count in (("ann", 3), ("ben", 8)):
        for i in range(count):
            current = client.get(f"/r/{tokens[name]}/state").get_json()["item"]
            answer = "synthetic" if (i + len(name)) % 3 else "real"
            body = {"item": current, "answer": answer, "confidence": i % 5 + 1,
                    "comment": "BENSECRETCOMMENT" if name == "ben" else ""}
            assert client.post(f"/r/{tokens[name]}/answer", json=body).status_code == 200
            given[name].append((current, answer))
    # A repeated submit of the last item is refused, not counted twice.
    assert client.post(f"/r/{ann}/answer", json={**good, "item": given["ann"][-1][0]}).status_code == 409

    # Resume: a fresh client (a closed browser) is at Ann's 4th item of her own order.
    state = create_app(study).test_client().get(f"/r/{ann}/state").get_json()
    assert state["done"] == 3 and state["position"] == 4
    assert state["item"] == reader_order(opened, reader_by_name(opened, "ann"))[3]
    assert client.get(f"/r/{ben}/state").get_json()["item"] is None

    # Nothing of the key, the database or Ben is reachable with Ann's token (or none), by any route.
    secrets = [REAL_MARK, SYNTH_MARK, ben, "BENSECRETCOMMENT", '"truth"', "SQLite format"]
    probes = ["/", "/favicon.ico", "/key.json", "/study.json", "/answers.sqlite", f"/images/{item}.png",
              "/static/../key.json", "/static/..%2fkey.json", "/static/%2e%2e/key.json", "/static/survey.js",
              f"/r/{ann}", f"/r/{ann}/state", f"/r/{ann}/key.json", f"/r/{ann}/items/..%2fkey.json",
              f"/r/{ann}/items/../../key.json", f"/r/{ann}/items/key.png", f"/r/{ann}/items/{item}.png",
              f"/r/{ann}/answers", f"/r/{ann}/../{ben}/state"]
    for rule in client.application.url_map.iter_rules():  # every route, fed the worst arguments
        for value in (ann, "key.json", "../key.json", KEY_FILE.split(".")[0], "answers.sqlite", item):
            probes.append(re.sub(r"<[^>]+>", value, rule.rule))
    for url in probes:
        for method in (client.get, client.post):
            response = method(url)
            body = response.get_data(as_text=True) if not response.mimetype.startswith("image/") else ""
            for secret in secrets:
                assert secret not in body, (url, secret)
            assert not response.get_data().startswith(b"SQLite format")

    # The report counts what was answered.
    code, out = cli(["survey", "report", study])
    assert code == 0, out
    report = json.loads((study / "report" / "report.json").read_text())
    for name, reader in zip(("ann", "ben"), report["readers"]):
        assert reader["reader"] == name and reader["n_answers"] == len(given[name])
        assert reader["n_correct"] == sum(key[i] == a for i, a in given[name])
        assert reader["confusion"]["tp"] == sum(key[i] == a == "synthetic" for i, a in given[name])
    assert report["pooled"]["n_answers"] == 11
    assert report["agreement"]["n_items"] == 3 and report["agreement"]["n_readers"] == 2
    html = (study / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)  # self-contained
    assert "BENSECRETCOMMENT" in html  # the organiser does see comments


def test_report_without_answers_and_serve_defaults(study, cli):
    assert "no answers yet" in _one_error_line(*cli(["survey", "report", study]))
    import inspect

    from histosynth.cli.survey import serve_command
    assert inspect.signature(serve_command).parameters["host"].default == "127.0.0.1"
