"""Caption sources, read exactly as LensToWords reads them, and its train/val split.

Every loader returns `{image key: [captions]}`: keys in file order (a dict keeps it), captions
stripped, in file order per image. The key is the image's file name (`1000092795.jpg`,
`000000000139.jpg`), which is also the key of LensToWords' LMDB feature cache.

    caps = load_flickr30k("captions.txt")              # Flickr30k: {file name: [5 captions]}
    caps = load_coco("captions_val2017.json")          # COCO 2017
    caps = load_karpathy("dataset_coco.json", "test")  # Karpathy splits
    caps = load_instagram(["part1.csv", "part2.csv"])  # Instagram CSVs, concatenated
    train, val = seed_split(list(caps), seed=42, train_frac=0.9)

`caption_source` wraps them in a `CaptionSet` that also knows the image folder.

Bad input raises: FileNotFoundError for a missing file, ValueError naming the file (and line
or JSON field) for anything unreadable.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

PathLike = str | os.PathLike

# Flickr30k's header; the original file has a space after each '|'.
FLICKR_HEADER = ("image_name", "comment_number", "comment")
# Karpathy's split names; "restval" is the leftover COCO val images, conventionally trained on.
KARPATHY_SPLITS = ("train", "val", "test", "restval")
# Instagram CSV columns, lower-cased, as LensToWords' files name them.
_IMAGE_COLUMNS = ("image file", "image_file", "image_name", "image", "filename", "file_name")
_CAPTION_COLUMNS = ("caption", "captions", "comment", "text")
# "2199200615.jpg| 4   A dog runs ...": comment number and comment with no '|' between them.
_MERGED_NUMBER_AND_COMMENT = re.compile(r"(\d+)\s+(\S.*)")

Format = Literal["auto", "flickr30k", "coco", "karpathy", "instagram", "tfds"]


@dataclasses.dataclass
class CaptionSet:
    """Captions per image key, plus the folder that holds the images (if known)."""

    captions: dict[str, list[str]]
    image_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.image_dir is not None:
            self.image_dir = Path(self.image_dir)

    def __len__(self) -> int:
        return len(self.captions)

    def keys(self) -> list[str]:
        return list(self.captions)

    def image_path(self, key: str) -> Path:
        """`image_dir / key`; ValueError when no image folder was given."""
        if self.image_dir is None:
            raise ValueError(f"no image folder was given, so {key!r} has no image path")
        return self.image_dir / key

    def missing_images(self) -> list[str]:
        """Keys (in order) whose image file is absent; [] when no image folder was given."""
        if self.image_dir is None:
            return []
        if not self.image_dir.is_dir():
            return list(self.captions)
        present = set(os.listdir(self.image_dir))
        return [k for k in self.captions if k not in present and not (self.image_dir / k).is_file()]

    def pairs(self) -> list[tuple[str, str]]:
        """Every (key, caption) pair: one training example each, as in LensToWords."""
        return [(k, c) for k, caps in self.captions.items() for c in caps]


def caption_source(
    path: PathLike | Sequence[PathLike] | None,
    format: Format = "auto",
    image_dir: PathLike | None = None,
    split: str | None = None,
) -> CaptionSet:
    """Any caption source -> `CaptionSet`.

    `format="auto"` picks by content: a `.json` with `annotations` is COCO, one with
    `images[].sentences` is Karpathy; a text file whose header is Flickr30k's (or `image,caption`)
    is Flickr30k, any other CSV (or a list of paths) is Instagram. `format="tfds"` reads TFDS
    `coco_captions` with `path` as the TFDS data dir (None: TFDS's default). `split` is for
    Karpathy JSON and TFDS only; split other sources with `seed_split`.
    """
    if format == "tfds":
        return CaptionSet(load_tfds_coco(split or "val", data_dir=path), image_dir)
    if path is None:
        raise ValueError(f"format {format!r} needs a caption file path")
    data = None
    if format == "auto":
        format, data = _detect_format(path)
    if split is not None and format != "karpathy":
        raise ValueError(
            f"split={split!r} applies to Karpathy JSON and TFDS only; "
            f"split a {format} source with seed_split"
        )
    if format == "flickr30k":
        captions = load_flickr30k(path)  # type: ignore[arg-type]
    elif format == "coco":
        captions = load_coco(path) if data is None else _coco(Path(path), data)
    elif format == "karpathy":
        captions = (
            load_karpathy(path, split) if data is None else _karpathy(Path(path), data, split, True)
        )
    elif format == "instagram":
        captions = load_instagram(path)
    else:
        raise ValueError(
            f"unknown caption format {format!r}; expected one of "
            "'auto', 'flickr30k', 'coco', 'karpathy', 'instagram', 'tfds'"
        )
    return CaptionSet(captions, Path(image_dir) if image_dir is not None else None)


# --- Flickr30k --------------------------------------------------------------------------------


def load_flickr30k(path: PathLike) -> dict[str, list[str]]:
    """Flickr30k `captions.txt` -> {file name: captions}.

    The format LensToWords reads: `|`-separated, header `image_name| comment_number| comment`,
    rows `1000092795.jpg| 0| Two young guys ...`; values are stripped, blank lines skipped.
    A row whose comment number and comment lost the `|` between them (`x.jpg| 4   A dog ...`,
    as in one row of the widely shared Kaggle copy) is read as the two fields it was meant to
    be. Kaggle's other layout, a CSV with header `image,caption`, is read too.
    """
    path = Path(path)
    text = read_utf8_text(path)
    lines = _lines(text)
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise ValueError(f"{path}: empty caption file (no header, no captions)")
    header = lines[first]
    if [c.strip().lower() for c in header.split(",")] == ["image", "caption"]:
        return _flickr_csv(path, text)
    if tuple(c.strip() for c in header.split("|")) != FLICKR_HEADER:
        raise ValueError(
            f"{path}:{first + 1}: not a Flickr30k captions file: expected the header "
            f"'image_name| comment_number| comment', found {_short(header)}"
        )
    captions: dict[str, list[str]] = {}
    for index in range(first + 1, len(lines)):
        line = lines[index]
        if not line.strip():
            continue
        name, caption = _flickr_row(path, index + 1, line)
        captions.setdefault(name, []).append(caption)
    if not captions:
        raise ValueError(f"{path}: no captions after the header")
    return captions


def _flickr_row(path: Path, lineno: int, line: str) -> tuple[str, str]:
    fields = [f.strip() for f in line.split("|")]
    if len(fields) == 2 and (merged := _MERGED_NUMBER_AND_COMMENT.fullmatch(fields[1])):
        fields = [fields[0], merged.group(1), merged.group(2)]
    if len(fields) != 3:
        raise ValueError(
            f"{path}:{lineno}: expected 3 '|'-separated fields "
            f"(image_name| comment_number| comment), found {len(fields)}: {_short(line)}"
        )
    name, number, caption = fields
    if not name:
        raise ValueError(f"{path}:{lineno}: empty image_name: {_short(line)}")
    if not number.isdigit():
        raise ValueError(
            f"{path}:{lineno}: comment_number {number!r} is not a number: {_short(line)}"
        )
    if not caption:
        raise ValueError(f"{path}:{lineno}: empty comment for {name!r}")
    return name, caption


def _flickr_csv(path: Path, text: str) -> dict[str, list[str]]:
    """Kaggle's `image,caption` CSV layout of Flickr30k."""
    captions: dict[str, list[str]] = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise ValueError(
                f"{path}:{reader.line_num}: expected 2 fields (image,caption), found {len(row)}"
            )
        name, caption = row[0].strip(), row[1].strip()
        if not name or not caption:
            raise ValueError(f"{path}:{reader.line_num}: empty image or caption field")
        captions.setdefault(name, []).append(caption)
    if not captions:
        raise ValueError(f"{path}: no captions after the header")
    return captions


# --- COCO and Karpathy JSON -------------------------------------------------------------------


def load_coco(path: PathLike) -> dict[str, list[str]]:
    """COCO `captions_{train,val}2017.json` -> {file name: captions}.

    Keys follow `images` order (images without a caption are left out); each image's captions
    follow `annotations` order. Reads `images[].id`, `images[].file_name`,
    `annotations[].image_id` and `annotations[].caption`.
    """
    path = Path(path)
    return _coco(path, _read_json(path))


def _coco(path: Path, data: Any) -> dict[str, list[str]]:
    images = _field(path, data, "images", list, "")
    annotations = _field(path, data, "annotations", list, "")
    names: dict[Any, str] = {}
    for i, image in enumerate(images):
        where = f"images[{i}]"
        image_id = _field(path, image, "id", (int, str), where)
        names[image_id] = _field(path, image, "file_name", str, where)
    by_id: dict[Any, list[str]] = {}
    for j, annotation in enumerate(annotations):
        where = f"annotations[{j}]"
        image_id = _field(path, annotation, "image_id", (int, str), where)
        caption = _field(path, annotation, "caption", str, where)
        if image_id not in names:
            raise ValueError(f"{path}: {where}.image_id {image_id!r} is not the id of any image")
        by_id.setdefault(image_id, []).append(caption.strip())
    captions: dict[str, list[str]] = {}
    for image_id, name in names.items():
        if image_id in by_id:
            captions.setdefault(name, []).extend(by_id[image_id])
    if not captions:
        raise ValueError(f"{path}: no captions (empty 'annotations')")
    return captions


def load_karpathy(
    path: PathLike, split: str | None = None, restval_as_train: bool = True
) -> dict[str, list[str]]:
    """Karpathy-split JSON (`dataset_flickr30k.json`, `dataset_coco.json`) -> {filename: captions}.

    Reads `images[].filename`, `images[].split` and `images[].sentences[].raw`. `split` None
    keeps every image; otherwise the images whose split is exactly `split`, except that
    `split="train"` also takes the `"restval"` images (the usual 113k COCO training set) unless
    `restval_as_train=False`.
    """
    path = Path(path)
    return _karpathy(path, _read_json(path), split, restval_as_train)


def _karpathy(
    path: Path, data: Any, split: str | None, restval_as_train: bool
) -> dict[str, list[str]]:
    images = _field(path, data, "images", list, "")
    wanted = None if split is None else {split}
    if wanted is not None and split == "train" and restval_as_train:
        wanted.add("restval")
    captions: dict[str, list[str]] = {}
    seen: set[str] = set()
    for i, image in enumerate(images):
        where = f"images[{i}]"
        name = _field(path, image, "filename", str, where)
        image_split = _field(path, image, "split", str, where)
        sentences = _field(path, image, "sentences", list, where)
        seen.add(image_split)
        if wanted is not None and image_split not in wanted:
            continue
        for j, sentence in enumerate(sentences):
            raw = _field(path, sentence, "raw", str, f"{where}.sentences[{j}]")
            captions.setdefault(name, []).append(raw.strip())
    if not captions:
        if split is not None:
            raise ValueError(
                f"{path}: no images in split {split!r}; splits present: {sorted(seen)}"
            )
        raise ValueError(f"{path}: no captions (empty 'images')")
    return captions


# --- Instagram CSV ----------------------------------------------------------------------------


def load_instagram(paths: PathLike | Iterable[PathLike]) -> dict[str, list[str]]:
    """Instagram CSV file(s) -> {image file: captions}, files read in the order given.

    The layouts LensToWords used: header `Image File,Caption`; header `image_name,caption`;
    a pandas index column before either (`,Image File,Caption`); or no header and three
    columns (index, image file, caption). Captions may hold commas and quotes (CSV quoting).
    Several captions for one image accumulate. Rows with an empty caption are skipped, as
    pandas' `dropna` skips them (Instagram posts without text).
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("load_instagram: no CSV paths given")
    captions: dict[str, list[str]] = {}
    for path in paths:
        for name, caption in instagram_rows(path):
            captions.setdefault(name, []).append(caption)
    if not captions:
        raise ValueError(f"{', '.join(map(str, paths))}: no captions")
    return captions


def instagram_rows(path: Path, empty: list[int] | None = None
                   ) -> Iterable[tuple[str, str]]:
    """(image file, caption) of each row with a caption, in file order (`load_instagram`'s
    layouts and errors); the line numbers of rows with an empty caption go to `empty`."""
    reader = csv.reader(io.StringIO(read_utf8_text(path), newline=""))
    rows = ((reader.line_num, row) for row in reader if any(cell.strip() for cell in row))
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{path}: empty CSV file")
    columns = _instagram_columns(path, *first)
    if columns is None:  # no header: (index, image file, caption)
        columns, ncols = (1, 2), 3
        rows = _chain_first(first, rows)
    else:
        ncols = len(first[1])
    image_col, caption_col = columns
    for lineno, row in rows:
        if len(row) != ncols:
            raise ValueError(f"{path}:{lineno}: expected {ncols} CSV fields, found {len(row)}")
        if ncols == 3 and image_col == 1 and not row[0].strip().lstrip("-").isdigit():
            raise ValueError(
                f"{path}:{lineno}: expected an integer index in the first column of a "
                f"header-less (index, image file, caption) CSV, found {_short(row[0])}"
            )
        name, caption = row[image_col].strip(), row[caption_col].strip()
        if not name:
            raise ValueError(f"{path}:{lineno}: empty image file name")
        if caption:
            yield name, caption
        elif empty is not None:
            empty.append(lineno)


def _instagram_columns(path: Path, lineno: int, row: list[str]) -> tuple[int, int] | None:
    """(image column, caption column) from a header row; None when the row is data."""
    names = [cell.strip().lower() for cell in row]
    image = next((i for i, n in enumerate(names) if n in _IMAGE_COLUMNS), None)
    caption = next((i for i, n in enumerate(names) if n in _CAPTION_COLUMNS), None)
    if image is not None and caption is not None:
        return image, caption
    if image is not None or caption is not None or len(row) != 3:
        raise ValueError(
            f"{path}:{lineno}: unknown Instagram CSV layout: first row {_short(','.join(row))}; "
            "expected a header 'Image File,Caption' or 'image_name,caption', "
            "or no header and 3 columns (index, image file, caption)"
        )
    return None


def _chain_first(first, rest):
    yield first
    yield from rest


# --- TFDS -------------------------------------------------------------------------------------


def load_tfds_coco(split: str = "val", data_dir: PathLike | None = None) -> dict[str, list[str]]:
    """TFDS `coco_captions` (COCO 2014, Karpathy splits) -> {file name: captions}.

    Reads the features `image/filename` and `captions/text` only (images are not decoded).
    `split`: "train", "val", "test", "restval" or any TFDS split expression. Nothing is
    downloaded: the dataset must already be prepared under `data_dir` (None: TFDS's default).
    Imports tensorflow_datasets (and so TensorFlow) on first call only.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            "load_tfds_coco needs tensorflow-datasets: pip install 'lensjax[tfds]'"
        ) from error
    decoders = tfds.decode.PartialDecoding({"image/filename": True, "captions": {"text": True}})
    try:
        ds = tfds.load(
            "coco_captions",
            split=split,
            data_dir=None if data_dir is None else str(data_dir),
            download=False,
            decoders=decoders,
        )
    except AssertionError as error:  # TFDS' way of saying "not prepared"
        raise FileNotFoundError(
            errno.ENOENT,
            f"TFDS coco_captions is not prepared (nothing is downloaded at run time): {error}",
            str(data_dir) if data_dir is not None else "default TFDS data dir",
        ) from error
    captions: dict[str, list[str]] = {}
    for example in tfds.as_numpy(ds):
        name = example["image/filename"].decode("utf-8")
        texts = [t.decode("utf-8").strip() for t in example["captions"]["text"]]
        captions.setdefault(name, []).extend(texts)
    if not captions:
        raise ValueError(f"TFDS coco_captions split {split!r} is empty")
    return captions


# --- Splits -----------------------------------------------------------------------------------


def seed_split(
    keys: Iterable[str], seed: int = 42, train_frac: float = 0.9
) -> tuple[list[str], list[str]]:
    """LensToWords' split: shuffle with `random.seed(seed)`, first `int(frac * n)` are train.

    `random.Random(seed).shuffle` gives exactly the permutation of the original's
    `random.seed(seed); random.shuffle(keys)`, without touching the global generator.
    Flickr30k (31,783 images, seed 42) -> 28,604 train / 3,179 val.
    """
    if not 0.0 <= train_frac <= 1.0:
        raise ValueError(f"train_frac must be in [0, 1], got {train_frac}")
    keys = list(keys)
    random.Random(seed).shuffle(keys)
    n = int(train_frac * len(keys))
    return keys[:n], keys[n:]


def sklearn_split(keys: Iterable[str], test_size: float = 0.1, random_state: int = 42
                  ) -> tuple[list[str], list[str]]:
    """v1's and v2's split: scikit-learn's `train_test_split(keys, test_size=0.1,
    random_state=42, shuffle=True)` without scikit-learn: the permutation of
    `np.random.RandomState(random_state)`, its first `ceil(test_size * n)` keys for
    validation, the rest (in that order) for training. -> (train, val)."""
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    keys = list(keys)
    order = np.random.RandomState(random_state).permutation(len(keys))
    n_test = math.ceil(test_size * len(keys))
    return [keys[i] for i in order[n_test:]], [keys[i] for i in order[:n_test]]


def coco_subset(keys: Sequence[str], size: int = 50_000, seed: int = 0) -> list[str]:
    """`size` keys drawn without replacement (seeded), returned in their original order.

    For phase 3a (COCO 2017 train, 50k-image subset). How the original chose its 50k images
    is not recorded, so this is lensjax's own seeded choice, not a reproduction of it.
    """
    keys = list(keys)
    if not 0 <= size <= len(keys):
        raise ValueError(f"subset size {size} is not between 0 and the {len(keys)} keys given")
    chosen = set(random.Random(seed).sample(range(len(keys)), size))
    return [k for i, k in enumerate(keys) if i in chosen]


# --- Helpers ----------------------------------------------------------------------------------


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "caption file not found", str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "expected a caption file, found a folder", str(path))
    return path


def read_utf8_text(path: Path) -> str:
    """UTF-8 text (a BOM is dropped); ValueError naming the line of the first bad byte."""
    data = _existing(path).read_bytes()
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = data.count(b"\n", 0, offset) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset})"
        ) from None


def _read_json(path: Path) -> Any:
    text = read_utf8_text(path)
    if not text.strip():
        raise ValueError(f"{path}: empty caption file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno})"
        ) from None


def _field(path: Path, obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`obj[key]`, checked to be present and of `kind`; ValueError naming the JSON field."""
    name = f"{where}.{key}" if where else key
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {where or 'the top level'} is not a JSON object")
    if key not in obj:
        raise ValueError(f"{path}: missing required field '{name}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
        raise ValueError(
            f"{path}: field '{name}' should be {expected}, found {type(value).__name__}"
        )
    return value


_JSON_NAMES = {list: "a list", str: "a string", int: "an integer", dict: "an object"}


def _detect_format(path: PathLike | Sequence[PathLike]) -> tuple[str, Any]:
    """(format, the parsed JSON when the file is JSON, else None)."""
    if not isinstance(path, str | os.PathLike):
        return "instagram", None
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and "annotations" in data:
            return "coco", data
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            images = data["images"]
            if images and isinstance(images[0], dict) and "sentences" in images[0]:
                return "karpathy", data
        raise ValueError(
            f"{path}: JSON that is neither COCO ('images' + 'annotations') "
            "nor Karpathy ('images[].sentences')"
        )
    text = read_utf8_text(path)
    header = next((line for line in _lines(text) if line.strip()), "")
    if tuple(c.strip() for c in header.split("|")) == FLICKR_HEADER:
        return "flickr30k", None
    if [c.strip().lower() for c in header.split(",")] == ["image", "caption"]:
        return "flickr30k", None
    return "instagram", None


def _lines(text: str) -> list[str]:
    """Split on \\n only (so line numbers match the file's), dropping a trailing \\r."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _short(text: str, limit: int = 80) -> str:
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return repr(text)
