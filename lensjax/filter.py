"""python -m lensjax.filter: LensToWords v3d's CLIP filter of Instagram image-caption pairs.

Every (image, caption) pair of the CSVs is scored with CLIP (the cosine similarity of the
normalised image and text embeddings, OpenAI's preprocessing and tokenizer with
truncate=True), in jitted batches while the next images decode on background threads. Pairs
scoring at least --threshold (the original's 0.27) are kept.

Written next to --out (all but scores.csv replaced only when complete):
  FILTERED.csv   the kept pairs, header `image_name,caption`: what `python -m lensjax.train
                 --data` reads (3b, recovery, 3c), split 90/10 after random.seed(42)
  scores.csv     every pair: index, image_name, caption, score (empty for a missing or
                 unreadable image), written batch by batch: a killed run resumes where it
                 stopped and recomputes nothing already scored
  filter.json    the model and its weights hash, threshold, counts kept/dropped/missing, the
                 missing images, and the rows skipped for an empty caption
  scores.png     the score histogram with the threshold marked
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensjax.cli import (
    EXIT_BAD_INPUT,
    EXIT_DONE,
    EXIT_INTERRUPTED,
    CliParser,
    finite_float,
    int_in,
)
from lensjax.files import OutputError, check_output, write_text_atomic

THRESHOLD = 0.27
DEFAULT_WEIGHTS = Path("weights/clip-vit-b-32")
SCORES_HEADER = ["index", "image_name", "caption", "score"]


class FilterError(RuntimeError):
    """A problem with the command's input, explained for the user."""


def read_pairs(paths: Sequence[str | os.PathLike], empty: list[str] | None = None
               ) -> list[tuple[str, str]]:
    """(image file, caption) of every row with a caption in the Instagram CSVs, in file order
    (both of the original's layouts: `lensjax.data.captions.load_instagram`); rows with an
    empty caption are skipped, as the original skipped them, and named (`file:line`) in
    `empty`."""
    from lensjax.data.captions import instagram_rows

    pairs: list[tuple[str, str]] = []
    for path in paths:
        lines: list[int] = []
        pairs.extend(instagram_rows(Path(path), lines))
        if empty is not None:
            empty.extend(f"{path}:{line}" for line in lines)
    return pairs


def clip_scores(images: np.ndarray | Sequence[str | os.PathLike], texts: Sequence[str],
                weights: Any = DEFAULT_WEIGHTS, batch_size: int = 64) -> np.ndarray:
    """Cosine similarity of each (image, text) pair -> float32 (B,). `images`: preprocessed
    pixels (B, 224, 224, 3) or image files; `weights`: a CLIP checkpoint directory or a
    loaded `lensjax.clip.ClipModel`."""
    model = _model(weights)
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    out = [model.similarity(images[i : i + batch_size], texts[i : i + batch_size])
           for i in range(0, len(texts), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _model(weights: Any):
    from lensjax.api import load_pretrained
    from lensjax.clip import ClipModel

    if isinstance(weights, ClipModel):
        return weights
    model = load_pretrained(weights)
    if not isinstance(model, ClipModel):
        raise FilterError(f"{weights} is a {model.family.name} captioner, not a CLIP "
                          "checkpoint (python -m bridge import --family clip ...)")
    return model


def _read_scores(path: Path, pairs: list[tuple[str, str]]) -> dict[int, float | None]:
    """Scores a previous run wrote; rows that do not match this run's pairs are an error."""
    if not path.is_file():
        return {}
    done: dict[int, float | None] = {}
    text = path.read_text(encoding="utf-8")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header != SCORES_HEADER:
        raise FilterError(f"{path} is not a scores file of this command (header {header}); "
                          "move it away or pass --force")
    rows = list(reader)
    if rows and not text.endswith("\n"):
        rows = rows[:-1]  # the line a kill cut short: cut it from the file too
        with open(path, "r+b") as handle:
            handle.truncate(text.encode("utf-8").rindex(b"\n") + 1)
    for row in rows:
        index = int(row[0])
        if index >= len(pairs) or (row[1], row[2]) != pairs[index]:
            raise FilterError(f"{path} holds scores of other data (row {index}); pass --force "
                              "to start over")
        done[index] = float(row[3]) if row[3] else None
    return done


def _batches(pairs, todo: list[int], folder: Path, batch_size: int, threads: int, size: int
             ) -> Iterator[tuple[list[int], list[np.ndarray | Exception]]]:
    """Batches of (pair indices, their preprocessed images or ImageErrors), decoded ahead on
    background threads."""
    from lensjax.clip import load_image
    from lensjax.data.images import load_images_in_background

    loaded = load_images_in_background([folder / pairs[i][0] for i in todo], size, threads,
                                       prefetch=2 * batch_size, loader=load_image)
    indices, images = [], []
    for index, (_, image) in zip(todo, loaded, strict=True):
        indices.append(index)
        images.append(image)
        if len(indices) == batch_size:
            yield indices, images
            indices, images = [], []
    if indices:
        yield indices, images


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score, filter and write; -> filter.json's document."""
    from tqdm import tqdm

    from lensjax.data.images import ImageError

    out: Path = args.out
    try:
        check_output(out)
    except OutputError as error:
        raise FilterError(f"--out: {error}") from None
    if not args.images.is_dir():
        raise FilterError(f"--images: {args.images} is not a folder")
    empty: list[str] = []
    pairs = read_pairs(args.data, empty)
    if not pairs:
        raise FilterError("the CSVs hold no (image, caption) pairs")
    model = _model(args.weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    scores_file = out.parent / "scores.csv"
    if args.force:
        scores_file.unlink(missing_ok=True)
    done = _read_scores(scores_file, pairs)
    todo = [i for i in range(len(pairs)) if i not in done]
    if done:
        print(f"resuming: {len(done)} of {len(pairs)} pairs already scored", file=sys.stderr)
    new_file = not scores_file.is_file()
    with open(scores_file, "a", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        if new_file:
            writer.writerow(SCORES_HEADER)
        for indices, images in tqdm(_batches(pairs, todo, args.images, args.batch_size,
                                             args.threads, model.config.vision.image_size),
                                    total=-(-len(todo) // args.batch_size), unit="batch",
                                    desc="clip scores", disable=args.quiet):
            good = [k for k, image in enumerate(images) if not isinstance(image, ImageError)]
            scores = _score(model, [images[k] for k in good],
                            [pairs[indices[k]][1] for k in good], args.batch_size)
            by_row = dict(zip(good, map(float, scores), strict=True))
            for k, index in enumerate(indices):
                score = by_row.get(k)
                if score is None and args.strict:
                    raise FilterError(f"{images[k]} (--strict)")
                done[index] = score
                writer.writerow([index, *pairs[index], "" if score is None else repr(score)])
            handle.flush()
    return _finish(args, pairs, done, model, empty)


def _score(model, images: list[np.ndarray], texts: list[str], batch_size: int) -> np.ndarray:
    """Similarities of a batch padded to `batch_size` rows (one compiled shape for all)."""
    if not images:
        return np.zeros(0, np.float32)
    pad = batch_size - len(images)
    scores = model.similarity(np.stack(images + images[:1] * pad), texts + texts[:1] * pad)
    return scores[: len(images)]


def _finish(args, pairs, done: dict[int, float | None], model, empty: list[str]
            ) -> dict[str, Any]:
    kept = [pairs[i] for i in range(len(pairs)) if done[i] is not None
            and done[i] >= args.threshold]
    missing = sorted({pairs[i][0] for i in range(len(pairs)) if done[i] is None})
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([("image_name", "caption"), *kept])
    write_text_atomic(args.out, buffer.getvalue())
    scored = np.array([s for s in done.values() if s is not None], np.float32)
    document = {
        "model": model.config.to_dict(),
        "weights": str(args.weights),
        "weights_sha256": _weights_hash(Path(args.weights)),
        "threshold": args.threshold,
        "pairs": len(pairs),
        "kept": len(kept),
        "dropped": int(np.sum(scored < args.threshold)),
        "missing": len([s for s in done.values() if s is None]),
        "missing_images": missing,
        "empty_captions": len(empty),
        "empty_caption_rows": empty[:100],
        "data": [str(p) for p in args.data],
        "images": str(args.images),
    }
    write_text_atomic(args.out.parent / "filter.json", json.dumps(document, indent=2))
    _histogram(scored, args.threshold, args.out.parent / "scores.png")
    return document


def _weights_hash(folder: Path) -> str:
    """sha256 of the checkpoint's lensjax.json (which holds a checksum of every array)."""
    return hashlib.sha256((folder / "lensjax.json").read_bytes()).hexdigest()


def _histogram(scores: np.ndarray, threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lensjax.files import save_figure

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(scores, bins=50, color="tab:blue")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
    ax.set(xlabel="CLIP cosine similarity", ylabel="pairs",
           title=f"{int(np.sum(scores >= threshold))} of {len(scores)} scored pairs kept")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m lensjax.filter", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, type=Path, metavar="CSV",
                        help="Instagram CSV(s): header 'Image File,Caption' or "
                        "'image_name,caption', optionally an index column first, or no "
                        "header and (index, image file, caption)")
    parser.add_argument("--images", required=True, type=Path, help="folder of the image files")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help=f"CLIP checkpoint (python -m bridge import --family clip) "
                        f"(default: {DEFAULT_WEIGHTS})")
    parser.add_argument("--threshold", type=finite_float(), default=THRESHOLD,
                        help=f"keep pairs scoring at least this (default: {THRESHOLD})")
    parser.add_argument("--out", type=Path, default=Path("filtered.csv"),
                        help="the kept pairs' CSV; scores.csv, filter.json and scores.png go "
                        "beside it (default: filtered.csv)")
    parser.add_argument("--batch-size", type=int_in(1), default=64,
                        help="pairs per batch, >= 1 (default: 64)")
    parser.add_argument("--threads", type=int_in(1), default=4,
                        help="image decoding threads, >= 1 (default: 4)")
    parser.add_argument("--strict", action="store_true",
                        help="a missing or unreadable image is an error, not a counted skip")
    parser.add_argument("--force", action="store_true",
                        help="score everything again (ignore an earlier scores.csv)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; -> 0 done, 2 bad input, 130 interrupted."""
    args = _parser().parse_args(argv)
    started = time.time()
    try:
        document = run(args)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); scores.csv keeps what was scored: run the same "
              "command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (FilterError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"kept {document['kept']} of {document['pairs']} pairs (threshold "
          f"{document['threshold']:g}; {document['missing']} missing or unreadable) -> "
          f"{args.out} in {time.time() - started:.0f} s")
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
