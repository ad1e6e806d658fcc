"""A blinded reader study on disk: images, the answer key, readers and their answers.

```
STUDY/
  study.json      {"format", "version", "size", "n_per_class", "seed", "items": [id, ...]}   (no answers in it)
  key.json        {"items": {id: {"truth": "real" | "synthetic", "source": file name}}, "real_dir", "synthetic_dir"}
  images/ID.png   every image re-encoded the same way: RGB PNG, size × size, no metadata, random id as its name

Item ids are in every image URL a reader sees, so they come from ``secrets`` (the operating system's randomness):
drawn independently of the truth, the seed and each other, they say nothing about which items are real. The seed
fixes only which images are chosen and their order.
  answers.sqlite  readers (name, token, order seed) and their answers; SQLite in WAL mode
```
Only ``images/`` is ever served, one file at a time by id; ``key.json`` is read by the report alone.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from histosynth.errors import HistosynthError
from histosynth.io.atomic import atomic_dir

STUDY_FILE = "study.json"
KEY_FILE = "key.json"
DB_FILE = "answers.sqlite"
IMAGES_DIR = "images"
FORMAT = "histosynth-survey"
VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
TRUTHS = ("real", "synthetic")
ID_BYTES = 12  # 96 random bits: 16 URL-safe characters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS readers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token TEXT NOT NULL UNIQUE,
    order_seed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    reader_id INTEGER NOT NULL REFERENCES readers(id),
    item TEXT NOT NULL,
    answer TEXT NOT NULL CHECK (answer IN ('real', 'synthetic')),
    confidence INTEGER NOT NULL CHECK (confidence BETWEEN 1 AND 5),
    comment TEXT NOT NULL DEFAULT '',
    answered_at TEXT NOT NULL,
    PRIMARY KEY (reader_id, item)
);
"""


@dataclass(frozen=True)
class Study:
    """An opened study folder: where it is, its item ids and the seed readers' orders derive from."""

    root: Path
    items: tuple[str, ...]
    size: int
    seed: int

    @property
    def db_path(self) -> Path:
        return self.root / DB_FILE

    def image_path(self, item: str) -> Path:
        """The image file of a known item id (callers must check membership: ids come from URLs)."""
        return self.root / IMAGES_DIR / f"{item}.png"


@dataclass(frozen=True)
class Reader:
    """One reader: their name, secret token and the seed of their item order."""

    id: int
    name: str
    token: str
    order_seed: int


@dataclass(frozen=True)
class Answer:
    """One reader's judgement of one item."""

    reader: str
    item: str
    answer: str
    confidence: int
    comment: str


# ---------------------------------------------------------------------------------------------------------- create

def list_images(folder: Path, role: str) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name; a one-line error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HistosynthError(f"{folder}: --{role} is not a folder")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise HistosynthError(f"{folder}: no images in the --{role} folder (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def _check_readable(path: Path) -> None:
    """Fail on a file that is not an image before any work is done (reads the header only)."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header must parse
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise HistosynthError(f"{path}: cannot read image ({error})") from None


def load_square(path: Path, size: int) -> Image.Image:
    """Decode an image, centre-crop it square and resize it to ``size``², as a fresh RGB image with no metadata."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)  # orientation is part of what the pixels show
            icc = image.info.get("icc_profile")
            if icc and image.mode in ("RGB", "RGBA"):
                # Keep the colours the file means; the profile itself is dropped below, so convert to sRGB first.
                source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                image = ImageCms.profileToProfile(image.convert("RGB"), source, ImageCms.createProfile("sRGB"))
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, ImageCms.PyCMSError, Image.DecompressionBombError) as error:
        raise HistosynthError(f"{path}: cannot read image ({error})") from None
    fitted = ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    # A new image from raw bytes carries no info dict: PNG saving would otherwise copy an ICC profile along.
    return Image.frombytes("RGB", fitted.size, fitted.tobytes())


def _random_ids(count: int) -> list[str]:
    """``count`` distinct item ids from the operating system's randomness: never derivable from the study's seed,
    its truths or one another (an id drawn from the seeded generator gave the seed, and with it the key, away)."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        candidate = secrets.token_urlsafe(ID_BYTES)
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


def create_study(real: Path, synthetic: Path, out: Path, n: int | None = None, seed: int = 0,
                 size: int = 512) -> Study:
    """Build a balanced, shuffled, blinded study of ``n`` real and ``n`` synthetic images (default: as many as
    the smaller folder holds), written atomically to ``out``."""
    out = Path(out)
    if out.exists():
        raise HistosynthError(f"{out}: already exists; choose a new --out folder")
    if size < 1:
        raise HistosynthError(f"--size {size}: must be at least 1 px")
    folders = {"real": Path(real), "synthetic": Path(synthetic)}
    if folders["real"].resolve() == folders["synthetic"].resolve():
        raise HistosynthError(f"{real}: --real and --synthetic are the same folder")
    files = {truth: list_images(folder, truth) for truth, folder in folders.items()}
    for paths in files.values():
        for path in paths:
            _check_readable(path)
    available = min(len(paths) for paths in files.values())
    if n is None:
        n = available
    if n < 1:
        raise HistosynthError(f"--n {n}: must be at least 1")
    for truth, paths in files.items():
        if len(paths) < n:
            raise HistosynthError(f"{folders[truth]}: --n {n} needs {n} {truth} images, the folder has {len(paths)}")

    rng = random.Random(f"histosynth-survey:{seed}")
    chosen = [(truth, path) for truth in TRUTHS for path in sorted(rng.sample(files[truth], n))]
    rng.shuffle(chosen)
    ids = _random_ids(len(chosen))

    key = {"items": {}, "real_dir": str(folders["real"].resolve()),
           "synthetic_dir": str(folders["synthetic"].resolve())}
    with atomic_dir(out) as tmp:
        (tmp / IMAGES_DIR).mkdir()
        for item, (truth, path) in zip(ids, chosen):
            load_square(path, size).save(tmp / IMAGES_DIR / f"{item}.png", format="PNG")
            key["items"][item] = {"truth": truth, "source": path.name}
        key["items"] = dict(sorted(key["items"].items()))
        (tmp / KEY_FILE).write_text(json.dumps(key, indent=1) + "\n")
        study = {"format": FORMAT, "version": VERSION, "size": size, "n_per_class": n, "seed": seed,
                 "items": sorted(ids)}  # sorted: the stored order must not be the shuffled truth order
        (tmp / STUDY_FILE).write_text(json.dumps(study, indent=1) + "\n")
        conn = _connect_path(tmp / DB_FILE)
        try:
            conn.executescript(_SCHEMA)
        finally:
            conn.close()
    return open_study(out)


# ------------------------------------------------------------------------------------------------------------ open

def open_study(root: Path) -> Study:
    """Open a study folder written by ``create_study``; a one-line error if it is not one."""
    root = Path(root)
    meta_path = root / STUDY_FILE
    if not meta_path.is_file():
        raise HistosynthError(f"{root}: not a reader study (no {STUDY_FILE}); make one with `histosynth survey create`")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}")
        if meta.get("version") != VERSION:
            raise ValueError(f"version {meta.get('version')} is not {VERSION}")
        study = Study(root=root, items=tuple(meta["items"]), size=int(meta["size"]), seed=int(meta["seed"]))
    except (ValueError, KeyError, TypeError) as error:
        raise HistosynthError(f"{meta_path}: not a valid study file ({error})") from None
    if not study.db_path.is_file():
        raise HistosynthError(f"{study.db_path}: missing; the study folder is incomplete")
    return study


def load_key(study: Study) -> dict[str, str]:
    """The truth ('real' or 'synthetic') of every item; for the report only, never for the web app."""
    path = study.root / KEY_FILE
    try:
        items = json.loads(path.read_text())["items"]
        key = {item: items[item]["truth"] for item in study.items}
    except FileNotFoundError:
        raise HistosynthError(f"{path}: the answer key is missing") from None
    except (ValueError, KeyError, TypeError) as error:
        raise HistosynthError(f"{path}: not a valid answer key ({error})") from None
    if not set(key.values()) <= set(TRUTHS):
        raise HistosynthError(f"{path}: truths must be one of {TRUTHS}")
    return key


# ------------------------------------------------------------------------------------------------------- database

def _connect_path(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10)
    # WAL lets the report (and other readers' requests) read while one reader's answer is being written.
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def connect(study: Study) -> sqlite3.Connection:
    """A new connection to the study's answer database (one per thread or request)."""
    return _connect_path(study.db_path)


def _reader(row: tuple) -> Reader:
    return Reader(id=row[0], name=row[1], token=row[2], order_seed=row[3])


def add_reader(study: Study, name: str) -> Reader:
    """Register a reader and give them a secret token; names are unique within a study."""
    name = name.strip()
    if not name or len(name) > 100 or any(ch in name for ch in "\r\n\t"):
        raise HistosynthError(f"{name!r}: a reader name must be 1-100 characters on one line")
    # Each reader's own order, reproducible from the study seed and their name.
    digest = hashlib.sha256(f"{study.seed}:{name}".encode()).digest()
    order_seed = int.from_bytes(digest[:6], "big")
    conn = connect(study)
    try:
        with conn:  # one transaction: commits on success
            if conn.execute("SELECT 1 FROM readers WHERE name = ?", (name,)).fetchone():
                raise HistosynthError(f"{name!r}: this study already has a reader of that name"
                                      " (`histosynth survey readers` shows their link)")
            conn.execute("INSERT INTO readers (name, token, order_seed) VALUES (?, ?, ?)",
                         (name, secrets.token_urlsafe(18), order_seed))
    finally:
        conn.close()
    return reader_by_name(study, name)


def list_readers(study: Study) -> list[Reader]:
    """Every reader of the study, in the order they were added."""
    conn = connect(study)
    try:
        rows = conn.execute("SELECT id, name, token, order_seed FROM readers ORDER BY id").fetchall()
    finally:
        conn.close()
    return [_reader(row) for row in rows]


def reader_by_name(study: Study, name: str) -> Reader:
    for reader in list_readers(study):
        if reader.name == name:
            return reader
    raise HistosynthError(f"{name!r}: no such reader in {study.root}")


def reader_by_token(conn: sqlite3.Connection, token: str) -> Reader | None:
    """The reader a token belongs to, or None."""
    row = conn.execute("SELECT id, name, token, order_seed FROM readers WHERE token = ?", (token,)).fetchone()
    return _reader(row) if row else None


def reader_order(study: Study, reader: Reader) -> list[str]:
    """The order this reader sees the items in: a shuffle seeded by their own order seed."""
    order = sorted(study.items)
    random.Random(reader.order_seed).shuffle(order)
    return order


def answered_items(conn: sqlite3.Connection, reader: Reader) -> set[str]:
    return {row[0] for row in conn.execute("SELECT item FROM answers WHERE reader_id = ?", (reader.id,))}


def record_answer(conn: sqlite3.Connection, reader: Reader, item: str, answer: str, confidence: int,
                  comment: str = "") -> bool:
    """Store one answer; False if this reader had already answered the item (a double submit keeps the first).

    The primary key (reader, item) makes this atomic: of simultaneous answers to one item exactly one is stored."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with conn:
        cursor = conn.execute(
            "INSERT OR IGNORE INTO answers (reader_id, item, answer, confidence, comment, answered_at)"
            " VALUES (?, ?, ?, ?, ?, ?)", (reader.id, item, answer, confidence, comment, stamp))
    return cursor.rowcount == 1


def all_answers(study: Study) -> list[Answer]:
    """Every stored answer, by reader (in the order they were added), then item id."""
    conn = connect(study)
    try:
        rows = conn.execute(
            "SELECT r.name, a.item, a.answer, a.confidence, a.comment FROM answers a"
            " JOIN readers r ON r.id = a.reader_id ORDER BY r.id, a.item").fetchall()
    finally:
        conn.close()
    return [Answer(*row) for row in rows]
