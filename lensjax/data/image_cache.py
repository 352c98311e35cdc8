"""Decoded, resized training images held in memory, for phases that train the image encoder.

A phase that trains the encoder reads pixels, not the LMDB features. Every image is decoded
and resized once, on background threads (PIL releases the GIL while it decodes and resizes, so
the threads keep every core busy), into one uint8 array; a batch is then a gather and a
normalisation, far cheaper than the training step it feeds. `ImageCache` answers the same
`in` / `get_batch` calls as `FeatureCache`, so batching and validation do not care which of
the two they read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lensjax.data.images import ImageError, load_images_in_background, load_pixels, normalise


class ImageCache:
    """Images `folder/<key>` resized to (size, size), kept as uint8 (N, size, size, 3).

    Keys whose file is missing or cannot be decoded are left out (`problems` says why), as a
    feature cache leaves out images it has no features for.
    """

    def __init__(self, folder: str | os.PathLike, keys: Iterable[str], size: int, *,
                 threads: int | None = None, progress: bool = True):
        folder = Path(folder)
        wanted = list(dict.fromkeys(keys))
        threads = threads or min(8, max(2, os.cpu_count() or 1))
        self.problems: list[ImageError] = []
        index: dict[str, int] = {}
        pixels = np.empty((len(wanted), size, size, 3), np.uint8)
        paths = [folder / key for key in wanted]
        loaded = load_images_in_background(paths, size, threads, prefetch=4 * threads,
                                           loader=load_pixels)
        with tqdm(total=len(paths), desc=f"decoding images ({size}x{size})", unit="img",
                  disable=not progress) as bar:
            for key, (_, image) in zip(wanted, loaded, strict=True):
                bar.update()
                if isinstance(image, ImageError):
                    self.problems.append(image)
                    continue
                pixels[len(index)] = image
                index[key] = len(index)
        self._index = index
        self._pixels = pixels[: len(index)]

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def nbytes(self) -> int:
        return self._pixels.nbytes

    @property
    def pixels(self) -> np.ndarray:
        """Every image, uint8 (len(self), size, size, 3), in the order of `keys` (the
        unreadable ones left out)."""
        return self._pixels

    def get_batch(self, keys: Sequence[str]) -> np.ndarray:
        """Normalised float32 model inputs (len(keys), size, size, 3)."""
        return normalise(self._pixels[[self._index[k] for k in keys]])
