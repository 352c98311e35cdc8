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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from lensjax.api import CaptionModel, file_identity, load_captioner
from lensjax.checkpoint import CheckpointError
from lensjax.cli import (
    EXIT_BAD_INPUT,
    EXIT_DONE,
    EXIT_INTERRUPTED,
    EXIT_PARTIAL,
    SEED_MAX,
    CliParser,
    enable_compilation_cache,
    finite_float,
    int_in,
)
from lensjax.data.images import (
    ImageError,
    display_name,
    escape_text,
    find_images,
    load_images_in_background,
)
from lensjax.files import check_output, temporary_sibling
from lensjax.models.encoding import MissingComponentError
from lensjax.runtime import DTYPES

DEFAULT_WEIGHTS = Path("weights/v3b")
OUTPUT_SUFFIXES = (".jsonl", ".csv")

EPILOG = """\
examples:
  python -m lensjax.caption photos/ --weights weights/v3c
  python -m lensjax.caption 'shots/**/*.jpg' --recursive --beam --out captions.jsonl
  python -m lensjax.caption --image path/to/image.jpg --top-k 30 --temp 0.8
      (LensToWords' demo flags --image, --beam, --beam-width, --top-k, --temp work too)

Decoding follows LensToWords: by default the checkpoint's family's sampler (v3b: top-k 20 at
temperature 0.7 with its retry rule; v3a: top-k 50 at temperature 1.0), --beam for beam search
(width 5, alpha 0.7), --greedy (or --temp 0) for greedy decoding.

Inputs: only regular files are read; a FIFO, socket, device or folder named like an image is
skipped without being opened, and named. A file reached twice (a link, a repeated argument,
a pattern overlapping a folder) is captioned once, under the first path given. --recursive
(and ** in a pattern) follows linked folders, entering each real folder once.

Output: without --out, one line PATH<TAB>caption per image. In those lines a backslash, TAB,
newline and carriage return are written \\\\, \\t, \\n, \\r, other control characters \\xHH
or \\uHHHH, and a file-name byte that is not UTF-8 \\xHH, so one line is one image. --out
writes a .csv (image,caption) or .jsonl ({"image", "caption"}) file atomically, and only when
at least one image was captioned: otherwise an existing file is left unchanged. File names that
are not UTF-8 are written with surrogate escapes (os.fsencode of the name read back with
errors="surrogateescape", or from the JSON, gives the original bytes).

Exit status: 0 every image captioned; 1 some files skipped (named on stderr), the others
captioned; 2 nothing captioned, or a bad argument, checkpoint or output location (one
`error:` line; no output written); 130 interrupted (Ctrl-C: no output file written). Compiled
programs are cached on disk (in $LENSJAX_CACHE_DIR, default ~/.cache/lensjax/jax), so later
runs start fast.
"""


def _parser() -> CliParser:
    parser = CliParser(
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
    parser.add_argument("--beam-width", type=int_in(1), default=5,
                        help="beams per image, >= 1 (default 5)")
    parser.add_argument("--alpha", type=finite_float(), default=0.7,
                        help="beam length normalisation: score / len ** alpha (default 0.7)")
    parser.add_argument("--top-k", type=int_in(1),
                        help="top-k sampling k, >= 1 (default: the model family's sampler, "
                        "20 for v3b, 50 for v3a)")
    parser.add_argument("--temp", "--temperature", dest="temperature", type=finite_float(0),
                        help="sampling temperature, >= 0; 0 decodes greedily (default: the "
                        "family's, 0.7 for v3b, 1.0 for v3a)")
    parser.add_argument("--seed", type=int_in(0, SEED_MAX), default=0,
                        help="sampling seed, 0..2**63-1 (default 0)")
    parser.add_argument("--max-new-tokens", type=int_in(1),
                        help=">= 1 (default 50, or the model's longest caption where that is "
                        "shorter: 40 words for v1/v2)")
    parser.add_argument("--min-new-tokens", type=int_in(0), default=0,
                        help="no stop rule ends a caption before this many tokens; 0.."
                        "--max-new-tokens (default 0)")
    parser.add_argument("--argsort-quirk", action="store_true",
                        help="v1/v2 beam search: propose what the v2 notebook's np.argsort "
                        "slip proposed (it drops the best word unless [UNK] is among the "
                        "beam width + 1 most likely), to reproduce its captions exactly")
    parser.add_argument("--no-retry", action="store_true",
                        help="do not resample degenerate top-k captions (LensToWords' v3b "
                        "does; v3a never did)")
    parser.add_argument("--batch-size", type=int_in(1), default=32,
                        help="images per batch, >= 1 (default 32)")
    parser.add_argument("--threads", type=int_in(1), default=4,
                        help="image decoding threads, >= 1 (default 4)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="storage of the decoder's weights: bfloat16 halves the bytes each "
                        "step reads (products accumulate in float32; captions can differ "
                        "slightly); it pays where the processor has bfloat16 units "
                        "(default float32)")
    parser.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    parser.add_argument("--out", type=Path,
                        help="write captions to a .jsonl or .csv file (default: print them)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check every argument; a bad one exits 2 with one `error:` line naming it."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens is not None and args.min_new_tokens > args.max_new_tokens:
        parser.error(f"argument --min-new-tokens: must be in 0..--max-new-tokens "
                     f"({args.max_new_tokens}), got {args.min_new_tokens}")
    if not (args.paths or args.image):
        parser.error("no images given: pass files, folders or glob patterns")
    return args


def decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    """`CaptionModel.generate`'s keyword arguments for parsed arguments: --beam is beam
    search, --greedy or --temp 0 (without --beam) greedy decoding, otherwise top-k."""
    greedy = args.greedy or (not args.beam and args.temperature == 0)
    return dict(
        method="beam" if args.beam else "greedy" if greedy else "topk",
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        top_k=args.top_k, temperature=args.temperature, beam_width=args.beam_width,
        alpha=args.alpha, seed=args.seed, retry=False if args.no_retry else None,
        batch_size=args.batch_size, argsort_quirk=args.argsort_quirk,
    )


def load_encoding_model(weights: Path, dtype: str = "float32") -> CaptionModel:
    """`load_captioner(weights, dtype=dtype)`, checked to have an image encoder; errors name
    `weights`."""
    model = load_captioner(weights, dtype=dtype)
    try:
        model.module.check_can_encode()
    except MissingComponentError as error:
        raise MissingComponentError(f"{weights}: {error}") from error
    return model


def check_caption_output(out: Path) -> None:
    """ValueError (naming `out`) unless `out` is a writable .jsonl/.csv file location."""
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"{out}: the output must end in .jsonl or .csv")
    check_output(out)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class CaptionWriter:
    """Streams (image, caption) rows to stdout as escaped `PATH<TAB>caption` lines, or to a
    .jsonl/.csv file through a temporary sibling that `close(commit=True)` renames into place.

    File names that are not UTF-8 are written with surrogate escapes and counted in
    `not_utf8` (the first few kept in `not_utf8_examples`).
    """

    def __init__(self, out: Path | None):
        self.out = out
        self.tmp: Path | None = None
        self.not_utf8 = 0
        self.not_utf8_examples: list[str] = []
        self.csv = None
        self.handle: TextIO = sys.stdout
        if out is None:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_sibling(out)
        self.handle = open(  # noqa: SIM115 - closed by close()
            self.tmp, "w", encoding="utf-8", errors="surrogateescape", newline="")
        if out.suffix.lower() == ".csv":
            self.csv = csv.writer(self.handle)
            self.csv.writerow(["image", "caption"])

    def write(self, image: Path, caption: str) -> None:
        name = os.fspath(image)
        if self.out is None:
            tqdm.write(f"{escape_text(name)}\t{escape_text(caption)}", file=self.handle)
        else:
            if not _is_utf8(name):
                self.not_utf8 += 1
                if len(self.not_utf8_examples) < 3:
                    self.not_utf8_examples.append(display_name(name))
            if self.csv is not None:
                self.csv.writerow([name, caption])
            else:
                self.handle.write(json.dumps({"image": name, "caption": caption}) + "\n")
        self.handle.flush()

    def close(self, commit: bool) -> None:
        """Finish: with `commit` the file replaces `out`; without, it is removed, and an
        existing `out` stays as it was. No temporary file is left either way."""
        if self.tmp is None:
            return
        try:
            self.handle.close()
            if commit:
                os.replace(self.tmp, self.out)
        finally:
            self.tmp.unlink(missing_ok=True)


def _batches(
    model: CaptionModel, paths: list[Path], batch_size: int, threads: int,
    failures: list[ImageError],
) -> Iterator[tuple[list[Path], np.ndarray, list[int]]]:
    """Groups of up to `batch_size` (paths, decoded images (B, H, W, 3), identities): an
    identity is `file_identity` (of the file's bytes), as `CaptionModel.caption` derives its
    sampling keys. Bad files go to `failures`."""
    batch_paths: list[Path] = []
    batch_images: list[np.ndarray] = []
    batch_identities: list[int] = []
    loader = load_images_in_background(paths, model.config.image_size, threads,
                                       prefetch=2 * batch_size)
    for path, image in loader:
        if not isinstance(image, ImageError):
            try:
                identity = file_identity(path)
            except ImageError as error:  # gone or replaced since it was decoded
                image = error
        if isinstance(image, ImageError):
            failures.append(image)
            continue
        batch_paths.append(path)
        batch_images.append(image)
        batch_identities.append(identity)
        if len(batch_paths) == batch_size:
            yield batch_paths, np.stack(batch_images), batch_identities
            batch_paths, batch_images, batch_identities = [], [], []
    if batch_paths:
        yield batch_paths, np.stack(batch_images), batch_identities


def _output_state(out: Path | None, existed: bool) -> str:
    """What became of --out in a run that wrote nothing."""
    if out is None:
        return ""
    return f"{out} left unchanged" if existed else f"{out} not written"


def _nothing_captioned(failures: list[ImageError], out: Path | None, existed: bool) -> int:
    """Report a run in which no image could be captioned -> exit status 2."""
    for failure in failures:
        print(f"skipped: {failure}", file=sys.stderr)
    message = f"no image could be captioned: {failures[0]}"
    if len(failures) > 1:
        message += f" (and {len(failures) - 1} more skipped file(s), listed above)"
    if out is not None:
        message += f"; {_output_state(out, existed)}"
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run(args: argparse.Namespace) -> int:
    """Caption the images `args` name -> exit status (0 all, 1 some skipped, 2 none)."""
    existed = args.out is not None and args.out.exists()
    if args.out is not None:
        check_caption_output(args.out)
    inputs = [*args.paths, *args.image]
    found = find_images(inputs, recursive=args.recursive)
    if not found.paths and not found.skipped:
        raise ValueError(f"no image files in {', '.join(map(display_name, inputs))}")
    if not found.paths:
        return _nothing_captioned(found.skipped, args.out, existed)
    enable_compilation_cache()
    model = load_encoding_model(args.weights, args.dtype)
    options = decoding_options(args)
    failures = list(found.skipped)
    writer = CaptionWriter(args.out)
    done = 0
    start = time.time()
    finished = False
    try:
        with tqdm(total=len(found.paths) + len(failures), unit="img", desc="caption",
                  file=sys.stderr) as bar:
            for batch_paths, images, identities in _batches(
                    model, found.paths, args.batch_size, args.threads, failures):
                features = model.encode_padded(images, args.batch_size)
                tokens = model.generate(features, identities=identities, **options)
                for path, row in zip(batch_paths, tokens, strict=True):
                    writer.write(path, model.tokenizer.decode_caption(row))
                done += len(batch_paths)
                bar.n = done + len(failures)
                bar.refresh()
        finished = True
    finally:
        writer.close(commit=finished and done > 0)
    if not done:
        return _nothing_captioned(failures, args.out, existed)
    for failure in failures:
        print(f"skipped: {failure}", file=sys.stderr)
    if writer.not_utf8:
        print(f"note: {writer.not_utf8} file name(s) are not UTF-8 "
              f"({', '.join(writer.not_utf8_examples)}); {args.out} holds them with surrogate "
              "escapes (os.fsencode of the name read back gives its bytes)", file=sys.stderr)
    elapsed = time.time() - start
    summary = f"captioned {done} image(s) in {elapsed:.1f}s ({done / elapsed:.2f} images/s)"
    if failures:
        summary += f"; {len(failures)} skipped"
    if args.out:
        summary += f"; wrote {args.out}"
    print(summary, file=sys.stderr)
    return EXIT_PARTIAL if failures else EXIT_DONE


def main(argv: Sequence[str] | None = None) -> int:
    """The command line -> exit status (0 all captioned, 1 some skipped, 2 nothing captioned
    or an error, 130 interrupted)."""
    args = parse_args(argv)
    existed = args.out is not None and args.out.exists()
    try:
        return run(args)
    except KeyboardInterrupt:
        kept = _output_state(args.out, existed) or "the captions printed so far are complete"
        print(f"interrupted: {kept}; the run did not finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CheckpointError, MissingComponentError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
