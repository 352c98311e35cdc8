"""Image files -> the model's input, exactly as LensToWords' torchvision pipeline makes it.

`Resize((224, 224))` on a PIL image is PIL's antialiased bilinear resize; `ToTensor` scales to
[0, 1]; `Normalize` uses the ImageNet mean and std. Output is NHWC float32.

Also: finding image files (files, folders, globs) and decoding them on background threads.
Only regular files are opened: a FIFO, socket, device or folder given as an image is reported
(ImageError) without being opened, so it can never block a run.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import queue
import stat
import threading
import unicodedata
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Images above this many pixels are refused as decompression bombs (PIL warns at half).
MAX_PIXELS = 178_956_970
_WARNING_FILTERS = threading.Lock()


class ImageError(ValueError):
    """An image file cannot be used; the message names the file and the reason."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, CMYK, I;16, ...) -> 8-bit RGB, after EXIF orientation.

    Alpha is dropped as LensToWords' `.convert("RGB")` drops it; 16-bit and float images
    are scaled to 8 bits first (PIL's own conversion of those would clip).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def escape_text(text: str) -> str:
    r"""`text` on one printable line: a backslash, TAB, CR and LF become \\, \t, \r, \n;
    other control characters and line separators \xHH or \uHHHH; a byte that is not UTF-8
    (os.fsdecode's surrogate escape) \xHH. Other characters are unchanged."""
    return "".join(_escape_char(char) for char in text)


_SHORT_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_char(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's surrogate escape of the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    if unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp"):
        return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"
    return char


def display_name(path: str | os.PathLike) -> str:
    """A path as messages print it: `escape_text` of its text, so it stays on one line."""
    return escape_text(os.fsdecode(path))


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def _not_regular(path: str | os.PathLike, mode: int) -> ImageError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return ImageError(f"{display_name(path)}: {kind}, not an image file; skipped without "
                      "opening it")


def check_regular_file(path: str | os.PathLike) -> None:
    """ImageError unless `path` (links followed) is a regular file; nothing is opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise _unreadable(path, error) from error
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)


def _unreadable(path: str | os.PathLike, error: OSError) -> ImageError:
    reason = error.strerror or str(error)
    if isinstance(error, FileNotFoundError) and os.path.islink(path):
        reason = "a broken symbolic link"
    return ImageError(f"{display_name(path)}: cannot be read ({reason})")


def _open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file for reading -> binary file object; ImageError for anything else.

    The type is checked with os.stat before opening, and again on the open descriptor, which
    is opened non-blocking: a file replaced by a FIFO in between cannot block the caller.
    """
    check_regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise _unreadable(path, error) from error
    handle = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        handle.close()
        raise _not_regular(path, mode)
    return handle


def read_file_bytes(path: str | os.PathLike) -> bytes:
    """The contents of a regular file; ImageError naming it for anything else (a FIFO, device
    or folder is never opened) or when it cannot be read."""
    with _open_regular(path) as handle:
        try:
            return handle.read()
        except OSError as error:
            raise _unreadable(path, error) from error


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode (first frame) and convert an image file to RGB; ImageError if not.

    Only a regular file is opened (see `check_regular_file`).
    """
    name = display_name(path)
    try:
        with _open_regular(path) as handle:
            # catch_warnings swaps the process-wide filter list: decoding threads that entered
            # and left it interleaved could leave the "error" filter installed for good. Only
            # the header read (where PIL warns) runs under it, one thread at a time.
            with _WARNING_FILTERS, warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                opened = Image.open(handle)
            with opened as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageError(
                        f"{name}: {image.width}x{image.height} pixels is over the "
                        f"{MAX_PIXELS:,}-pixel limit (decompression bomb?)"
                    )
                image.seek(0)
                image.load()
                return to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{name}: refused as a decompression bomb ({error})") from error
    except UnidentifiedImageError as error:
        raise ImageError(f"{name}: not an image file (or an empty one)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{name}: cannot be decoded ({error})") from error


def resize(image: Image.Image, size: int = 224) -> np.ndarray:
    """RGB PIL image -> uint8 (size, size, 3), resized as `preprocess` resizes it."""
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB pixels (..., 3) -> float32, scaled to [0, 1] and ImageNet-normalised. A jax
    array gives a jax array, so a jitted step can take uint8 batches and normalise them on the
    device."""
    return (pixels.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def preprocess(image: Image.Image, size: int = 224) -> np.ndarray:
    """RGB PIL image -> float32 (size, size, 3), resized and ImageNet-normalised."""
    return normalise(resize(image, size))


def load_image(path: str | os.PathLike, size: int = 224) -> np.ndarray:
    """Image file -> float32 (size, size, 3) model input; ImageError for unusable files."""
    return preprocess(open_rgb(path), size)


def load_pixels(path: str | os.PathLike, size: int = 224) -> np.ndarray:
    """Image file -> uint8 (size, size, 3), resized but not normalised (4x smaller to keep
    than `load_image`'s floats); ImageError for unusable files."""
    return resize(open_rgb(path), size)


class FoundImages(NamedTuple):
    """What `find_images` found: regular files to decode, and inputs skipped unopened."""

    paths: list[Path]
    skipped: list[ImageError]


def find_images(inputs: Iterable[str | os.PathLike], recursive: bool = False) -> FoundImages:
    """Files, folders (their image files, sorted) and glob patterns -> image paths + skips.

    Only regular files are returned. Anything else an input names or a folder holds under an
    image suffix (a FIFO, socket, device, a folder named x.jpg outside `recursive`, a missing
    or broken path) goes to `skipped`, named, without being opened. Explicitly named files are
    kept whatever their suffix (so a bad file is reported, not silently dropped). Inputs are
    deduplicated by real path, keeping the first path given. `recursive` descends into
    sub-folders (and `**` in a pattern spans them), following symlinked folders but entering
    each real folder once, so a link loop ends. A pattern that matches nothing raises
    FileNotFoundError.
    """
    found = FoundImages([], [])
    seen: set[str] = set()
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            candidates = sorted(p for p in _tree(path, recursive, found.skipped)
                                if p.suffix.lower() in IMAGE_SUFFIXES)
        elif glob.has_magic(text) and not os.path.lexists(text):
            candidates = _glob(text, recursive, found.skipped)
        else:
            candidates = [path]
        for candidate in candidates:
            real = os.path.realpath(candidate)
            if real not in seen:
                seen.add(real)
                _classify(candidate, found)
    return found


def _classify(path: Path, found: FoundImages) -> None:
    """Add `path` to `found.paths` if it is a regular file, else its error to `found.skipped`."""
    try:
        check_regular_file(path)
    except ImageError as error:
        found.skipped.append(error)
    else:
        found.paths.append(path)


def _tree(folder: Path, recursive: bool, problems: list[ImageError]) -> Iterator[Path]:
    """Entries of `folder`; with `recursive`, those of its sub-folders instead of the folders.

    Symlinked sub-folders are followed, but each real folder is entered once (through the
    first of its paths in sorted order), so a link loop ends. A folder that cannot be listed
    goes to `problems`.
    """
    visited: set[tuple[int, int]] = set()
    pending = [folder]  # a stack: sub-folders are entered depth first, in name order
    while pending:
        current = pending.pop()
        try:
            info = current.stat()
            if (info.st_dev, info.st_ino) in visited:
                continue
            visited.add((info.st_dev, info.st_ino))
            with os.scandir(current) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            problems.append(ImageError(f"{display_name(current)}: folder cannot be read "
                                       f"({error.strerror or error})"))
            continue
        folders: list[Path] = []
        for entry in entries:
            if recursive and _is_folder(entry):
                folders.append(current / entry.name)
            else:
                yield current / entry.name
        pending += reversed(folders)


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _glob(pattern: str, recursive: bool, problems: list[ImageError]) -> list[Path]:
    """Sorted non-folder matches of a glob pattern; FileNotFoundError if there are none.

    Without `recursive`, `**` is `*` (glob.glob's rule). With it, `**` spans any number of
    sub-folders, walked by `_tree` (not glob.glob, which follows symlink loops up to the
    kernel's limit). As in glob.glob, a wildcard does not match a name starting with '.'.
    """
    parts = Path(pattern).parts
    if recursive and "**" in parts:
        literal = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        root = Path(*parts[:literal]) if literal else Path(".")
        walk = _tree(root, True, problems) if root.is_dir() else iter(())
        matches = [p for p in walk if _matches(p.relative_to(root).parts, parts[literal:])]
    else:
        matches = [Path(p) for p in glob.glob(pattern) if not os.path.isdir(p)]
    if not matches:
        raise FileNotFoundError(f"{display_name(pattern)}: no file matches this pattern")
    return sorted(matches)


def _matches(names: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether path components `names` match pattern components (`**`: zero or more)."""
    if not pattern:
        return not names
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_matches(names[skip:], rest) for skip in range(len(names) + 1)
                   if not any(name.startswith(".") for name in names[:skip]))
    return bool(names) and (not names[0].startswith(".") or head.startswith(".")) and (
        fnmatch.fnmatchcase(names[0], head) and _matches(names[1:], rest))


def load_images_in_background(
    paths: Sequence[Path], size: int = 224, threads: int = 4, prefetch: int = 64,
    loader: Callable[[Path, int], np.ndarray] = load_image,
) -> Iterator[tuple[Path, np.ndarray | ImageError]]:
    """Yield (path, `loader(path, size)`: by default the float32 (size, size, 3) model input,
    or an ImageError) in input order, decoding on `threads` daemon threads.

    At most `prefetch` images are decoded ahead of the consumer, so memory stays bounded.
    Closing the iterator (or an exception in the consumer, Ctrl-C included) cancels the rest;
    the threads are daemons, so a slow read never keeps the process alive.
    """
    if threads < 1 or prefetch < 1:
        raise ValueError(f"threads and prefetch must be >= 1, got {threads} and {prefetch}")
    work: queue.SimpleQueue[tuple[Path, Future] | None] = queue.SimpleQueue()

    def worker() -> None:
        while (item := work.get()) is not None:
            path, future = item
            if future.set_running_or_notify_cancel():
                future.set_result(_load_or_error(path, size, loader))

    for number in range(threads):
        threading.Thread(target=worker, name=f"image-loader-{number}", daemon=True).start()
    pending: deque[tuple[Path, Future]] = deque()

    def submit(path: Path) -> None:
        future: Future = Future()
        pending.append((path, future))
        work.put((path, future))

    try:
        items = iter(paths)
        for path in items:
            submit(path)
            if len(pending) >= prefetch:
                break
        while pending:
            path, future = pending.popleft()
            next_path = next(items, None)
            if next_path is not None:
                submit(next_path)
            yield path, future.result()
    finally:
        for _, future in pending:
            future.cancel()
        for _ in range(threads):
            work.put(None)


def _load_or_error(path: Path, size: int, loader: Callable[[Path, int], np.ndarray]
                   ) -> np.ndarray | ImageError:
    """`loader(path, size)`, with any failure returned as an ImageError naming the file (a
    decoder bug on a malformed file must not leave the consumer waiting for a result)."""
    try:
        return loader(path, size)
    except ImageError as error:
        return error
    except OSError as error:  # unreadable path, permissions, vanished file
        return _unreadable(path, error)
    except Exception as error:  # PIL raises IndexError, struct.error, ... on damaged headers
        return ImageError(f"{display_name(path)}: cannot be decoded "
                          f"({type(error).__name__}: {error})")
