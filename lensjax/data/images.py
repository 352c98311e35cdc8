"""Image files -> the model's input, exactly as LensToWords' torchvision pipeline makes it.

`Resize((224, 224))` on a PIL image is PIL's antialiased bilinear resize; `ToTensor` scales to
[0, 1]; `Normalize` uses the ImageNet mean and std. Output is NHWC float32.

Also: finding image files (files, folders, globs) and decoding them on background threads.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Images above this many pixels are refused as decompression bombs (PIL warns at half).
MAX_PIXELS = 178_956_970


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


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode (first frame) and convert an image file to RGB; ImageError if not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageError(
                        f"{path}: {image.width}x{image.height} pixels is over the "
                        f"{MAX_PIXELS:,}-pixel limit (decompression bomb?)"
                    )
                image.seek(0)
                image.load()
                return to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{path}: refused as a decompression bomb ({error})") from error
    except UnidentifiedImageError as error:
        raise ImageError(f"{path}: not an image file (or an empty one)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: cannot be decoded ({error})") from error


def preprocess(image: Image.Image, size: int = 224) -> np.ndarray:
    """RGB PIL image -> float32 (size, size, 3), resized and ImageNet-normalised."""
    resized = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return (array - IMAGENET_MEAN) / IMAGENET_STD


def load_image(path: str | os.PathLike, size: int = 224) -> np.ndarray:
    """Image file -> float32 (size, size, 3) model input; ImageError for unusable files."""
    return preprocess(open_rgb(path), size)


def find_images(inputs: Iterable[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Files, folders (their image files, sorted) and glob patterns -> image paths.

    Explicitly named files are kept whatever their suffix (so a bad file is reported, not
    silently dropped); a pattern or folder that matches nothing raises FileNotFoundError.
    """
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.iterdir()
            found += sorted(  # broken links are kept, to be reported as unreadable
                p for p in walker if not p.is_dir() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.exists() or not glob.has_magic(text):
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(text, recursive=recursive))
            if not matches:
                raise FileNotFoundError(f"{text}: no file matches this pattern")
            found += [p for p in matches if p.is_file()]
    return found


def load_images_in_background(
    paths: Sequence[Path], size: int = 224, threads: int = 4, prefetch: int = 64
) -> Iterator[tuple[Path, np.ndarray | ImageError]]:
    """Yield (path, image array or ImageError) in input order, decoding on `threads` threads.

    At most `prefetch` images are decoded ahead of the consumer, so memory stays bounded.
    """

    def load(path: Path) -> np.ndarray | ImageError:
        try:
            return load_image(path, size)
        except ImageError as error:
            return error
        except OSError as error:  # unreadable path, permissions, vanished file
            return ImageError(f"{path}: cannot be read ({error})")

    with ThreadPoolExecutor(threads) as pool:
        pending: deque[tuple[Path, Future]] = deque()
        items = iter(paths)
        for path in items:
            pending.append((path, pool.submit(load, path)))
            if len(pending) >= prefetch:
                break
        while pending:
            path, future = pending.popleft()
            next_path = next(items, None)
            if next_path is not None:
                pending.append((next_path, pool.submit(load, next_path)))
            yield path, future.result()
