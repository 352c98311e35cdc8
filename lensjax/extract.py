"""python -m lensjax.extract: encode images once into an LMDB feature cache.

The cache has LensToWords' format (key = image file name, value = float16 (64, 768) bytes), so
the original's training code can read it too; v1/v2's InceptionV3 features are (2048,) and
(64, 2048) per image. Extraction is resumable: keys already in the
cache are skipped, and writes are committed in chunks, so a killed run loses at most the last
chunk and a rerun of the same command completes it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lensjax.api import CaptionModel
from lensjax.caption import load_encoding_model
from lensjax.checkpoint import CheckpointError
from lensjax.cli import (
    EXIT_BAD_INPUT,
    EXIT_DONE,
    EXIT_INTERRUPTED,
    EXIT_PARTIAL,
    CliParser,
    int_in,
)
from lensjax.data.cache import FeatureCache
from lensjax.data.images import (
    ImageError,
    display_name,
    find_images,
    load_images_in_background,
)
from lensjax.files import check_output
from lensjax.generate import pad_rows

EPILOG = """\
examples:
  python -m lensjax.extract data/flickr30k/images --weights weights/v3b --out features/flickr
  python -m lensjax.extract 'photos/**/*.jpg' --recursive --weights weights/v3b \\
      --out features/photos --shards 2
  python -m lensjax.extract data/instagram/images --family v2 \\
      --inception inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5 --out features/v2

The cache is keyed by file name, as LensToWords' caches are: two inputs with the same file
name are an error (the same file reached twice, through a link or two arguments, is encoded
once). Rerunning a command resumes it. Only regular files are read: a FIFO, socket, device or
folder named like an image is skipped without being opened. Unreadable images are reported
by name and skipped.

Exit status: 0 every image encoded (or already in the cache); 1 some files skipped (named on
stderr), the others encoded; 2 nothing could be encoded, or a bad argument, checkpoint or
output folder (one `error:` line; a cache this run created is removed again when it stays
empty); 130 interrupted (Ctrl-C: what was committed stays, and rerunning resumes).
"""


def _parser() -> CliParser:
    parser = CliParser(
        prog="python -m lensjax.extract", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    encoder = parser.add_mutually_exclusive_group(required=True)
    encoder.add_argument("--weights", type=Path,
                         help="lensjax checkpoint directory with an image encoder (its family "
                         "says which features)")
    encoder.add_argument("--inception", type=Path,
                         help="InceptionV3 weights for v1/v2 features without a checkpoint "
                         "(keras.applications' .h5, or a torchvision state dict); needs "
                         "--family")
    parser.add_argument("--family", choices=("v1", "v2"),
                        help="with --inception: v1's pooled (2048,) or v2's (64, 2048) "
                        "features")
    parser.add_argument("--out", required=True, type=Path,
                        help="feature cache folder (created, or resumed if it exists)")
    parser.add_argument("--shards", type=int_in(1), default=6,
                        help="number of LMDB shards of a new cache, >= 1 (default: 6, as "
                        "Flickr30k's)")
    parser.add_argument("--batch-size", type=int_in(1), default=32,
                        help="images per forward pass, >= 1 (default 32)")
    parser.add_argument("--threads", type=int_in(1), default=4,
                        help="image decoding threads, >= 1 (default 4)")
    parser.add_argument("--commit-every", type=int_in(1), default=512,
                        help="images between commits, >= 1; a kill loses at most this many "
                        "(default 512)")
    parser.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    return parser


class ExtractionInterrupted(KeyboardInterrupt):
    """Ctrl-C during `extract`: the `committed` images of this run are durably in the cache
    (a rerun resumes after them); the rest of the run was dropped."""

    def __init__(self, committed: int):
        super().__init__(committed)
        self.committed = committed


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends, then deliver it to the handler that was
    installed (KeyboardInterrupt by default), so that a commit and the count of committed
    images change together. Outside the main thread, where no KeyboardInterrupt arrives, a
    no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


def _discard(out: Path, existed: bool) -> None:
    """Remove what a run that committed nothing created at `out`: the folder, or the contents
    of a folder that existed empty."""
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


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
    out: str | os.PathLike,
    *,
    shards: int = 6,
    batch_size: int = 32,
    threads: int = 4,
    commit_every: int = 512,
    progress: bool = True,
) -> tuple[int, list[ImageError]]:
    """Encode `paths` into the cache at `out` -> (images written, errors of skipped images).

    Every batch has `batch_size` rows (the last one padded), so one program is compiled. When
    `out` is new (missing, or an empty folder) and nothing gets committed to it, what this call
    created there is removed again. Ctrl-C raises ExtractionInterrupted (a KeyboardInterrupt)
    saying how many images were committed.
    """
    _check_unique_names(paths)
    model.module.check_can_encode()
    for name, value in (("batch_size", batch_size), ("threads", threads),
                        ("commit_every", commit_every)):
        if value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value}")
    shape = model.feature_shape
    out = Path(out)
    existed = out.exists()
    fresh = not existed or (out.is_dir() and not any(out.iterdir()))
    errors: list[ImageError] = []
    written = committed = 0
    try:
        with FeatureCache.create(out, shards=shards, shape=shape) as writer:
            todo = [p for p in paths if p.name not in writer]
            if len(todo) < len(paths):
                print(f"{len(paths) - len(todo)} of {len(paths)} images already in {out}: "
                      "resuming")
            batch_keys: list[str] = []
            batch_images: list[np.ndarray] = []
            bar = tqdm(total=len(todo), unit="img", disable=not progress, desc="extract")

            def flush() -> None:
                nonlocal written, committed
                padded = pad_rows(np.stack(batch_images), batch_size)
                features = np.asarray(model.encode(padded)).astype(np.float16)
                for row, key in enumerate(batch_keys):
                    writer.put(key, features[row])
                written += len(batch_keys)
                if written - committed >= commit_every:
                    with _interrupts_deferred():
                        writer.commit()
                        committed = written
                bar.update(len(batch_keys))
                batch_keys.clear()
                batch_images.clear()

            with bar:  # closed, its line ended, before any message that follows
                for path, image in load_images_in_background(todo, model.config.image_size,
                                                             threads):
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
            with _interrupts_deferred():
                writer.commit()
                committed = written
    except BaseException as error:
        if fresh and not committed:
            _discard(out, existed)
        if isinstance(error, KeyboardInterrupt):
            raise ExtractionInterrupted(committed) from None
        raise
    if fresh and not written:
        _discard(out, existed)
    return written, errors


def _nothing_encoded(errors: list[ImageError], out: Path, existed: bool) -> int:
    """Report a run in which no image could be encoded -> exit status 2."""
    for error in errors:
        print(f"skipped: {error}", file=sys.stderr)
    more = f" (and {len(errors) - 1} more skipped file(s), listed above)" if errors[1:] else ""
    kept = f"{out} unchanged" if existed else f"nothing was written to {out}"
    print(f"error: no image could be encoded: {errors[0]}{more}; {kept}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _inception_model(family: str, weights: Path) -> CaptionModel:
    """`bridge.keras_models.inception_model` (the bridge is imported only here); its
    BridgeError as a ValueError."""
    from bridge.io import BridgeError
    from bridge.keras_models import inception_model

    try:
        return inception_model(family, weights)
    except BridgeError as error:
        raise ValueError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    """Extract the images `args` name -> exit status (0 all, 1 some skipped, 2 none)."""
    check_output(args.out, directory=True)
    existed = args.out.exists()
    found = find_images(args.images, recursive=args.recursive)
    if not found.paths and not found.skipped:
        raise ValueError(f"no image files in {', '.join(map(display_name, args.images))}")
    if not found.paths:
        return _nothing_encoded(found.skipped, args.out, existed)
    for skipped in found.skipped:
        print(f"skipped: {skipped}", file=sys.stderr)
    _check_unique_names(found.paths)
    if args.inception is not None:
        model = _inception_model(args.family, args.inception)
    else:
        model = load_encoding_model(args.weights)
    start = time.time()
    written, errors = extract(
        model, found.paths, args.out, shards=args.shards, batch_size=args.batch_size,
        threads=args.threads, commit_every=args.commit_every,
    )
    already = len(found.paths) - written - len(errors)
    if not written and not already:
        return _nothing_encoded(errors, args.out, existed)
    skipped = len(found.skipped) + len(errors)
    print(f"wrote {written} feature arrays to {args.out} in {time.time() - start:.1f}s"
          + (f"; {skipped} image(s) skipped" if skipped else ""))
    return EXIT_PARTIAL if skipped else EXIT_DONE


def main(argv: Sequence[str] | None = None) -> int:
    """The command line -> exit status (0 all encoded, 1 some skipped, 2 nothing encoded or
    an error, 130 interrupted)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.inception is None) != (args.family is None):
        parser.error("--family and --inception go together (v1/v2 features without a "
                     "checkpoint); with --weights the checkpoint's family decides")
    try:
        return run(args)
    except KeyboardInterrupt as interrupt:
        committed = interrupt.committed if isinstance(interrupt, ExtractionInterrupted) else 0
        if args.out.exists():
            kept = (f"{committed} image(s) of this run committed to {args.out}; rerun the same "
                    "command to resume")
        else:
            kept = f"no image was committed; {args.out} was not created"
        print(f"interrupted: {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CheckpointError, OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
