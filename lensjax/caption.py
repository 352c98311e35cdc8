"""python -m lensjax.caption: caption image files, folders and globs with a lensjax checkpoint.

Images are decoded on background threads while the model runs, captions are streamed to the
output as each batch finishes (memory stays bounded for any number of files), and the output
file appears atomically when the run ends. Unreadable images are reported by name and skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from lensjax.api import CaptionModel, load_pretrained
from lensjax.checkpoint import CheckpointError
from lensjax.data.images import ImageError, find_images, load_images_in_background
from lensjax.files import temporary_sibling
from lensjax.models.captioner import MissingComponentError

DEFAULT_WEIGHTS = Path("weights/v3b")
CACHE_ENV = "LENSJAX_CACHE_DIR"

EPILOG = """\
examples:
  python -m lensjax.caption photos/ --weights weights/v3c
  python -m lensjax.caption 'shots/**/*.jpg' --recursive --beam --out captions.jsonl
  python -m lensjax.caption --image path/to/image.jpg --top-k 30 --temp 0.8
      (LensToWords' demo flags --image, --beam, --beam-width, --top-k, --temp work too)

Decoding follows LensToWords: top-k 20 at temperature 0.7 with its retry rule by default,
--beam for beam search (width 5, alpha 0.7). Exit status: 0 all captioned, 1 some files
skipped, 2 nothing could be done (bad arguments, checkpoint, ...). Compiled programs are
cached on disk (in $LENSJAX_CACHE_DIR, default ~/.cache/lensjax/jax), so later runs start fast.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lensjax.caption", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="*", help="image files, folders or glob patterns")
    parser.add_argument("--image", action="append", default=[],
                        help="an image file (LensToWords' demo flag; may repeat)")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help=f"lensjax checkpoint directory (default: {DEFAULT_WEIGHTS})")
    method = parser.add_mutually_exclusive_group()
    method.add_argument("--beam", action="store_true", help="beam search instead of top-k")
    method.add_argument("--greedy", action="store_true", help="greedy decoding")
    parser.add_argument("--beam-width", type=int, default=5, help="beams per image (default 5)")
    parser.add_argument("--alpha", type=float, default=0.7,
                        help="beam length normalisation: score / len ** alpha (default 0.7)")
    parser.add_argument("--top-k", type=int, default=20, help="top-k sampling k (default 20)")
    parser.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.7,
                        help="sampling temperature (default 0.7)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="default 50")
    parser.add_argument("--min-new-tokens", type=int, default=0,
                        help="no stop rule ends a caption before this many tokens (default 0)")
    parser.add_argument("--no-retry", action="store_true",
                        help="do not resample degenerate top-k captions (LensToWords does)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--threads", type=int, default=4, help="image decoding threads")
    parser.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    parser.add_argument("--out", type=Path,
                        help="write captions to a .jsonl or .csv file (default: print them)")
    return parser


def enable_compilation_cache() -> Path:
    """Persist compiled programs across runs (JAX's on-disk compilation cache)."""
    import jax

    directory = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "lensjax" / "jax"))
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


class CaptionWriter:
    """Streams (image, caption) rows to stdout, or to a .jsonl/.csv file renamed into place
    only when complete."""

    def __init__(self, out: Path | None):
        self.out = out
        if out is not None and out.suffix.lower() not in (".jsonl", ".csv"):
            raise ValueError(f"{out}: the output must end in .jsonl or .csv")
        self.tmp = None if out is None else temporary_sibling(out)
        self.handle: TextIO = sys.stdout if out is None else open(  # noqa: SIM115
            self.tmp, "w", encoding="utf-8", newline="")
        self.csv = csv.writer(self.handle) if out is not None and out.suffix == ".csv" else None
        if self.csv is not None:
            self.csv.writerow(["image", "caption"])

    def write(self, image: Path, caption: str) -> None:
        if self.out is None:
            tqdm.write(f"{image}\t{caption}", file=self.handle)
        elif self.csv is not None:
            self.csv.writerow([str(image), caption])
        else:
            self.handle.write(json.dumps({"image": str(image), "caption": caption}) + "\n")
        self.handle.flush()

    def close(self, complete: bool) -> None:
        if self.out is None:
            return
        self.handle.close()
        if complete:
            os.replace(self.tmp, self.out)
        else:
            self.tmp.unlink(missing_ok=True)


def _batches(
    model: CaptionModel, paths: list[Path], batch_size: int, threads: int,
    failures: list[ImageError],
) -> Iterator[tuple[list[Path], np.ndarray]]:
    """Groups of up to `batch_size` decoded images; bad files go to `failures`."""
    batch_paths: list[Path] = []
    batch_images: list[np.ndarray] = []
    loader = load_images_in_background(paths, model.config.image_size, threads,
                                       prefetch=2 * batch_size)
    for path, image in loader:
        if isinstance(image, ImageError):
            failures.append(image)
            continue
        batch_paths.append(path)
        batch_images.append(image)
        if len(batch_paths) == batch_size:
            yield batch_paths, np.stack(batch_images)
            batch_paths, batch_images = [], []
    if batch_paths:
        yield batch_paths, np.stack(batch_images)


def run(args: argparse.Namespace) -> int:
    paths = find_images([*args.paths, *args.image], recursive=args.recursive)
    if not paths:
        raise ValueError("no images given: pass files, folders or glob patterns")
    enable_compilation_cache()
    model = load_pretrained(args.weights)
    model.module.check_can_encode()
    method = "beam" if args.beam else "greedy" if args.greedy else "topk"
    options = dict(
        method=method, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        top_k=args.top_k, temperature=args.temperature, beam_width=args.beam_width,
        alpha=args.alpha, seed=args.seed, retry=not args.no_retry, batch_size=args.batch_size,
    )
    writer = CaptionWriter(args.out)
    failures: list[ImageError] = []
    done = 0
    start = time.time()
    complete = False
    try:
        with tqdm(total=len(paths), unit="img", desc="caption", file=sys.stderr) as bar:
            for batch_paths, images in _batches(model, paths, args.batch_size, args.threads,
                                                failures):
                features = model.encode_padded(images, args.batch_size)
                tokens = model.generate(features, **options)
                for path, row in zip(batch_paths, tokens, strict=True):
                    writer.write(path, model.tokenizer.decode_caption(row))
                done += len(batch_paths)
                bar.n = done + len(failures)
                bar.refresh()
        complete = True
    finally:
        writer.close(complete)
    for failure in failures:
        print(f"skipped: {failure}", file=sys.stderr)
    elapsed = time.time() - start
    summary = f"captioned {done} image(s) in {elapsed:.1f}s ({done / elapsed:.2f} images/s)"
    if failures:
        summary += f"; {len(failures)} skipped"
    if args.out:
        summary += f"; wrote {args.out}"
    print(summary, file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, MissingComponentError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
