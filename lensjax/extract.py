"""python -m lensjax.extract: encode images once into an LMDB feature cache.

The cache has LensToWords' format (key = image file name, value = float16 (64, 768) bytes), so
the original's training code can read it too. Extraction is resumable: keys already in the
cache are skipped, and writes are committed in chunks, so a killed run loses at most the last
chunk and a rerun of the same command completes it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lensjax.api import CaptionModel, load_pretrained
from lensjax.checkpoint import CheckpointError
from lensjax.data.cache import FeatureCache
from lensjax.data.images import ImageError, find_images, load_images_in_background
from lensjax.generate import pad_rows

EPILOG = """\
examples:
  python -m lensjax.extract data/flickr30k/images --weights weights/v3b --out features/flickr
  python -m lensjax.extract 'photos/**/*.jpg' --recursive --weights weights/v3b \\
      --out features/photos --shards 2

The cache is keyed by file name, as LensToWords' caches are: two inputs with the same file
name are an error. Rerunning a command resumes it. Unreadable images are reported and
skipped; the exit status is 1 when any were skipped.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lensjax.extract", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--weights", required=True, type=Path,
                        help="lensjax checkpoint directory with an image encoder")
    parser.add_argument("--out", required=True, type=Path,
                        help="feature cache folder (created, or resumed if it exists)")
    parser.add_argument("--shards", type=int, default=6,
                        help="number of LMDB shards of a new cache (default: 6, as Flickr30k's)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--threads", type=int, default=4, help="image decoding threads")
    parser.add_argument("--commit-every", type=int, default=512,
                        help="images between commits; a kill loses at most this many")
    parser.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    return parser


def _check_unique_names(paths: Sequence[Path]) -> None:
    counts = Counter(p.name for p in paths)
    duplicated = [name for name, count in counts.items() if count > 1]
    if duplicated:
        examples = ", ".join(duplicated[:5])
        raise ValueError(
            f"{len(duplicated)} file name(s) occur more than once ({examples}); the cache is "
            "keyed by file name, so extract those folders into separate caches"
        )


def extract(
    model: CaptionModel,
    paths: Sequence[Path],
    out: Path,
    *,
    shards: int = 6,
    batch_size: int = 32,
    threads: int = 4,
    commit_every: int = 512,
    progress: bool = True,
) -> tuple[int, list[ImageError]]:
    """Encode `paths` into the cache at `out` -> (images written, errors of skipped images).

    Every batch has `batch_size` rows (the last one padded), so one program is compiled.
    """
    _check_unique_names(paths)
    model.module.check_can_encode()
    shape = (model.config.head.pool_size ** 2, model.config.feature_dim)
    errors: list[ImageError] = []
    written = 0
    with FeatureCache.create(out, shards=shards, shape=shape) as writer:
        todo = [p for p in paths if p.name not in writer]
        if len(todo) < len(paths):
            print(f"{len(paths) - len(todo)} of {len(paths)} images already in {out}: resuming")
        bar = tqdm(total=len(todo), unit="img", disable=not progress, desc="extract")
        batch_keys: list[str] = []
        batch_images: list[np.ndarray] = []
        since_commit = 0

        def flush() -> None:
            nonlocal written, since_commit
            padded = pad_rows(np.stack(batch_images), batch_size)
            features = np.asarray(model.encode(padded)).astype(np.float16)
            for row, key in enumerate(batch_keys):
                writer.put(key, features[row])
            written += len(batch_keys)
            since_commit += len(batch_keys)
            if since_commit >= commit_every:
                writer.commit()
                since_commit = 0
            bar.update(len(batch_keys))
            batch_keys.clear()
            batch_images.clear()

        for path, image in load_images_in_background(todo, model.config.image_size, threads):
            if isinstance(image, ImageError):
                errors.append(image)
                tqdm.write(f"skipped: {image}", file=sys.stderr)
                bar.update(1)
                continue
            batch_keys.append(path.name)
            batch_images.append(image)
            if len(batch_keys) == batch_size:
                flush()
        if batch_keys:
            flush()
        writer.commit()
        bar.close()
    return written, errors


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        paths = find_images(args.images, recursive=args.recursive)
        if not paths:
            raise ValueError("no image files found in the given inputs")
        model = load_pretrained(args.weights)
        start = time.time()
        written, errors = extract(
            model, paths, args.out, shards=args.shards, batch_size=args.batch_size,
            threads=args.threads, commit_every=args.commit_every,
        )
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    elapsed = time.time() - start
    print(f"wrote {written} feature arrays to {args.out} in {elapsed:.1f}s"
          + (f"; {len(errors)} image(s) skipped" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
