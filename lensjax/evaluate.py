"""python -m lensjax.evaluate: LensToWords' BLEU-4 and the COCO-standard caption metrics.

Two protocols, always reported side by side and labelled:

- `seed_bleu4` is exactly the number LensToWords reported: text lower-cased, `[^\\w\\s]`
  removed, split on whitespace; nltk `sentence_bleu(refs, hyp, weights=(0.25,)*4,
  smoothing_function=SmoothingFunction().method4)` per image; the mean over images.
- `coco_metrics` is the standard COCO caption evaluation (pycocoevalcap: PTB tokenizer,
  corpus BLEU-1..4, METEOR, ROUGE-L, CIDEr, and SPICE where its Stanford models are
  installed). Its BLEU-4 is a corpus BLEU and differs from the per-image mean above.

For the built-in synthetic set, `--scenes scenes.jsonl` adds what the captions get right
against each image's scene (`lensjax.scene_scores`): (size, colour, kind) triple F1, exact
triple sets, shape count and background.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensjax.cli import (
    EXIT_BAD_INPUT,
    EXIT_DONE,
    EXIT_INTERRUPTED,
    SEED_MAX,
    CliParser,
    describe_os_error,
)
from lensjax.data.captions import read_utf8_text
from lensjax.files import write_text_atomic

_PUNCTUATION = re.compile(r"[^\w\s]")
SPLITS = ("all", "train", "val")  # of the flickr, coco and instagram formats


class EvaluationError(ValueError):
    """Predictions or references cannot be scored as given."""


def seed_tokens(text: str) -> list[str]:
    """LensToWords' text normalisation: lower-case, drop `[^\\w\\s]`, split on whitespace."""
    return _PUNCTUATION.sub("", text.lower()).split()


def seed_bleu4_per_image(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """{key: sentence BLEU-4 as LensToWords computed it} for keys in both mappings."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing = SmoothingFunction().method4
    return {
        key: float(sentence_bleu([seed_tokens(r) for r in references[key]],
                                 seed_tokens(prediction), weights=(0.25,) * 4,
                                 smoothing_function=smoothing))
        for key, prediction in predictions.items()
        if key in references
    }


def seed_bleu4(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> float:
    """LensToWords' BLEU-4: the mean of per-image smoothed sentence BLEU-4 (see module doc)."""
    scores = seed_bleu4_per_image(predictions, references)
    if not scores:
        raise EvaluationError("no prediction has references: nothing to score")
    return float(np.mean(list(scores.values())))


def spice_available() -> bool:
    """Whether SPICE's Stanford CoreNLP models are installed (pycocoevalcap downloads them)."""
    import pycocoevalcap.spice as spice

    return (Path(spice.__file__).parent / "lib" / "stanford-corenlp-3.6.0.jar").is_file()


def coco_metrics(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
    *, spice: bool | None = None,
) -> dict[str, float]:
    """The COCO caption metrics (pycocoevalcap) over keys in both mappings.

    -> {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr"[, "SPICE"]}. SPICE runs when its
    models are installed (`spice=None`) or when asked; Java is required (PTB tokenizer,
    METEOR, SPICE), and its absence raises EvaluationError.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if shutil.which("java") is None:
        raise EvaluationError("the COCO metrics need Java (`java` is not on PATH); "
                              "LensToWords' BLEU-4 does not")
    keys = [k for k in predictions if k in references]
    if not keys:
        raise EvaluationError("no prediction has references: nothing to score")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": r} for r in references[k]] for k in keys})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in keys})
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice or (spice is None and spice_available()):
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return scores


def corpus_bleu4(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
                 ) -> tuple[float, str]:
    """The COCO-standard corpus BLEU-4 (pycocoevalcap's scorer) -> (value, tokenizer used).

    With Java, text goes through the PTB tokenizer as in `coco_metrics` ("ptb"); without it,
    through LensToWords' tokenization (lower case, punctuation removed; "simple"), which the
    PTB tokenizer matches on plain captions.
    """
    from pycocoevalcap.bleu.bleu import Bleu

    keys = [k for k in predictions if k in references]
    if not keys:
        raise EvaluationError("no prediction has references: nothing to score")
    if shutil.which("java") is not None:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer, name = PTBTokenizer(), "ptb"
        gts = tokenizer.tokenize({k: [{"caption": r} for r in references[k]] for k in keys})
        res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in keys})
    else:
        name = "simple"
        gts = {k: [" ".join(seed_tokens(r)) for r in references[k]] for k in keys}
        res = {k: [" ".join(seed_tokens(predictions[k]))] for k in keys}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(bleu[3]), name


# --- reading predictions and references ----------------------------------------------------


def read_predictions(path: str | os.PathLike, *, strict: bool = False) -> dict[str, str]:
    """captions.jsonl (`{"image", "caption"}`) or .csv (`image,caption`) -> {file name: text}.

    Keys are file names, as in the references: `a/X.png` and `b/X.png` are both `X.png`, so
    of predictions that share a file name the first is kept and the others are reported (a
    warning; with `strict`, an error). An empty or null caption stays (scored as empty).
    Rows are checked: EvaluationError names the line of a bad one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions file")
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
    predictions: dict[str, str] = {}
    first: dict[str, tuple[int, str]] = {}
    repeated: list[str] = []
    for number, image, caption in rows:
        key = Path(image).name
        if not key:
            raise EvaluationError(f"{path}:{number}: image {image!r} has no file name")
        if key in first:
            repeated.append(f"line {number} {image!r} (line {first[key][0]} "
                            f"{first[key][1]!r} came first)")
            continue
        first[key] = number, image
        predictions[key] = caption
    if repeated:
        message = (f"{path}: {len(repeated)} predictions repeat an earlier one's file name, "
                   f"e.g. {repeated[0]}; references are keyed by file name, so only the first "
                   "of each is scored")
        if strict:
            raise EvaluationError(message + " (--strict)")
        print(f"warning: {message}", file=sys.stderr)
    return predictions


def _jsonl_rows(path: Path) -> list[tuple[int, str, str]]:
    """(line number, image, caption) of every non-blank line of a captions.jsonl."""
    rows = []
    for number, line in enumerate(read_utf8_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvaluationError(f"{path}:{number}: not JSON ({error.msg}); expected an "
                                  "object with 'image' and 'caption'") from None
        if not isinstance(row, dict) or not {"image", "caption"} <= set(row):
            raise EvaluationError(f"{path}:{number}: expected a JSON object with 'image' and "
                                  f"'caption', found {_short_json(row)}")
        rows.append((number, _image(path, number, row["image"]),
                     _caption(path, number, row["caption"])))
    return rows


def _csv_rows(path: Path) -> list[tuple[int, str, str]]:
    """(line number, image, caption) of every row of an `image,caption` CSV."""
    reader = csv.reader(io.StringIO(read_utf8_text(path), newline=""))
    header = next(reader, None)
    columns = [c.strip() for c in header or []]
    if not {"image", "caption"} <= set(columns):
        raise EvaluationError(f"{path}: expected the columns image,caption in the header, "
                              f"found {','.join(columns) or 'nothing'}")
    image, caption = columns.index("image"), columns.index("caption")
    rows = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            raise EvaluationError(f"{path}:{reader.line_num}: expected {len(columns)} CSV "
                                  f"fields ({','.join(columns)}), found {len(row)}")
        rows.append((reader.line_num, _image(path, reader.line_num, row[image]), row[caption]))
    return rows


def _image(path: Path, number: int, value: Any) -> str:
    """A row's image (a non-empty string, stripped); EvaluationError naming the line."""
    if not isinstance(value, str) or not value.strip():
        raise EvaluationError(f"{path}:{number}: 'image' must be a file name or path (a "
                              f"non-empty string), found {_short_json(value)}")
    return value.strip()


def _caption(path: Path, number: int, value: Any) -> str:
    """A row's caption: a string, or null for an empty one; EvaluationError naming the line."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EvaluationError(f"{path}:{number}: 'caption' must be a string (or null for "
                              f"an empty caption), found {_short_json(value)}")
    return value


def _short_json(value: Any, limit: int = 60) -> str:
    """`value` as JSON for a message, cut to `limit` characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


PRESETS = {
    "flickr30k-val": ("flickr", "val"),
    "coco-val2017": ("coco", None),
    "instagram-val": ("instagram", "val"),
}


def read_references(path: str | os.PathLike, fmt: str, split: str | None) -> dict[str, list[str]]:
    """References of one evaluation set: flickr/coco/instagram (`split` all, train or val:
    LensToWords' 90/10 split), karpathy (its own split field)."""
    from lensjax.data.captions import (
        load_coco,
        load_flickr30k,
        load_instagram,
        load_karpathy,
        seed_split,
    )

    if fmt == "karpathy":
        return load_karpathy(path, split=split)
    if split is not None and split not in SPLITS:
        raise EvaluationError(f"--split {split!r}: the {fmt} format splits into "
                              f"{', '.join(SPLITS)} (LensToWords' 90/10 split)")
    loaded = {"flickr": load_flickr30k, "coco": load_coco, "instagram": load_instagram}[fmt](path)
    if split in (None, "all"):
        return loaded
    train, val = seed_split(list(loaded), seed=42, train_frac=0.9)
    keep = set(val if split == "val" else train)
    return {k: v for k, v in loaded.items() if k in keep}


# --- reports ----------------------------------------------------------------------------


def write_per_image_csv(path: Path, predictions, references, scores) -> None:
    """key, prediction, references, LensToWords BLEU-4 per image, worst first (atomic)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["key", "prediction", "references", "seed_bleu4"])
    for key, score in sorted(scores.items(), key=lambda item: item[1]):
        writer.writerow([key, predictions[key], " | ".join(references[key]), f"{score:.6f}"])
    write_text_atomic(path, text.getvalue())


def write_gallery(path: Path, predictions, references, scores, image_dir: Path | None,
                  count: int = 50) -> None:
    """An HTML page (no server needed): the worst and the best `count` images by seed BLEU-4,
    each with its thumbnail, prediction, references and score."""
    ranked = sorted(scores, key=scores.get)
    sections = [("Worst", ranked[:count]), ("Best", ranked[::-1][:count])]

    def card(key: str) -> str:
        image = ""
        if image_dir is not None:
            src = Path(os.path.relpath(image_dir / key, path.parent)).as_posix()
            image = (f'<a href="{html.escape(src)}"><img src="{html.escape(src)}" '
                     f'alt="{html.escape(key)}" loading="lazy"></a>')
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in references[key])
        return (f'<div class="card">{image}<p class="key">{html.escape(key)} &middot; '
                f"BLEU-4 {scores[key]:.3f}</p><p class=\"pred\">{html.escape(predictions[key])}"
                f"</p><ul>{refs}</ul></div>")

    body = "".join(f"<h2>{title} {len(keys)}</h2><div class=\"grid\">"
                   + "".join(card(k) for k in keys) + "</div>" for title, keys in sections)
    write_text_atomic(
        path, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>lensjax evaluation</title><style>"
        "body{font-family:sans-serif;margin:1em}.grid{display:flex;flex-wrap:wrap;gap:1em}"
        ".card{width:240px}.card img{width:240px;height:240px;object-fit:cover}"
        ".pred{font-weight:bold}.key{color:#666;font-size:small}"
        f"</style></head><body><h1>lensjax evaluation ({len(scores)} images)</h1>{body}"
        "</body></html>\n")


def _generate_predictions(args, references: dict[str, list[str]]) -> dict[str, str]:
    from tqdm import tqdm

    from lensjax.api import load_captioner
    from lensjax.data.cache import FeatureCache

    model = load_captioner(args.weights)
    cache = FeatureCache(args.features)
    keys = [k for k in references if k in cache]
    if len(keys) < len(references):
        print(f"{len(references) - len(keys)} reference images have no features in "
              f"{args.features}: not scored", file=sys.stderr)
    predictions: dict[str, str] = {}
    for start in tqdm(range(0, len(keys), args.batch_size), desc="caption", unit="batch"):
        chunk = keys[start : start + args.batch_size]
        tokens = model.generate(cache.get_batch(chunk).astype(np.float32), args.method,
                                seed=args.seed, batch_size=args.batch_size)
        predictions.update(zip(chunk, (model.tokenizer.decode_caption(t) for t in tokens),
                               strict=True))
    return predictions


def _parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="python -m lensjax.evaluate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m lensjax.evaluate --predictions captions.jsonl --references captions.txt "
        "--preset flickr30k-val\n"
        "  python -m lensjax.evaluate --weights weights/v3c --features features/coco-val "
        "--references captions_val2017.json --format coco --method beam --html\n\n"
        "Predictions are matched to references by file name: of predictions that share one\n"
        "(a/X.png, b/X.png) the first is scored and the rest reported (--strict: an error).\n\n"
        "exit status: 0 scored, 2 bad input (also unmatched keys with --strict), 130\n"
        "interrupted (Ctrl-C).\n",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", type=Path,
                        help="captions.jsonl ({\"image\", \"caption\"} per line) or .csv "
                        "(image,caption) to score")
    source.add_argument("--weights", type=Path, help="checkpoint: generate, then score")
    parser.add_argument("--features", type=Path, help="feature cache (with --weights)")
    parser.add_argument("--references", required=True, type=Path, help="reference captions")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="LensToWords' evaluation sets: sets --format and --split")
    parser.add_argument("--format", choices=("flickr", "coco", "karpathy", "instagram"),
                        default="flickr", help="references format (default: flickr)")
    parser.add_argument("--split", default=None,
                        help="all/val/train (LensToWords' 90/10 split) or a Karpathy split "
                        "(default: all)")
    parser.add_argument("--method", choices=("greedy", "topk", "beam"), default="topk")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"sampling seed (topk), 0 to {SEED_MAX} (default: 0)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per generation batch, >= 1 (default: 32)")
    parser.add_argument("--strict", action="store_true",
                        help="unmatched predictions or references, and predictions sharing a "
                        "file name, are an error")
    parser.add_argument("--no-coco", action="store_true", help="only LensToWords' BLEU-4")
    parser.add_argument("--out", type=Path, default=Path("eval_out"),
                        help="folder for metrics.json, per_image.csv, gallery.html "
                        "(default: eval_out)")
    parser.add_argument("--scenes", type=Path,
                        help="the synthetic set's scenes.jsonl: also score what the captions "
                        "get right (triple F1, exact sets, shape count, background)")
    parser.add_argument("--html", action="store_true", help="also write gallery.html")
    parser.add_argument("--images", type=Path, help="image folder for the gallery thumbnails")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags, missing inputs and an unwritable --out before any work starts."""
    from lensjax.files import OutputError, check_output

    if args.batch_size < 1:
        raise EvaluationError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 0 <= args.seed <= SEED_MAX:
        raise EvaluationError(f"--seed must be between 0 and {SEED_MAX}, got {args.seed}")
    if args.weights is not None and args.features is None:
        raise EvaluationError("--weights needs --features (a feature cache)")
    for flag, path, folder in (("--predictions", args.predictions, False),
                               ("--references", args.references, False),
                               ("--weights", args.weights, True),
                               ("--features", args.features, True),
                               ("--scenes", args.scenes, False),
                               ("--images", args.images if args.html else None, True)):
        if path is None or (path.is_dir() if folder else path.is_file()):
            continue
        if not path.exists():
            raise EvaluationError(f"{flag} {path} does not exist")
        raise EvaluationError(f"{flag} {path} is a {'file' if folder else 'folder'}; "
                              f"expected a {'folder' if folder else 'file'}")
    try:
        check_output(args.out, directory=True)
    except OutputError as error:
        raise EvaluationError(f"--out: {error}") from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score the predictions (read, or generated with --weights) against the references;
    write the reports to --out; -> the metrics report."""
    check_args(args)
    fmt, split = PRESETS.get(args.preset, (args.format, args.split))
    references = read_references(args.references, fmt, split)
    if args.weights is not None:
        predictions = _generate_predictions(args, references)
    else:
        predictions = read_predictions(args.predictions, strict=args.strict)
    unmatched = [k for k in predictions if k not in references]
    unscored = [k for k in references if k not in predictions]
    for count, what in ((len(unmatched), "predictions have no references"),
                        (len(unscored), "reference images have no prediction")):
        if count:
            message = f"{count} {what}"
            if args.strict:
                raise EvaluationError(message + " (--strict)")
            print(f"warning: {message}; they are not scored", file=sys.stderr)
    predictions = {k: v for k, v in predictions.items() if k in references}
    references = {k: references[k] for k in predictions}

    started = time.time()
    per_image = seed_bleu4_per_image(predictions, references)
    if not per_image:
        raise EvaluationError("no prediction has references: nothing to score")
    report: dict[str, Any] = {
        "images": len(per_image),
        "lenstowords_bleu4": float(np.mean(list(per_image.values()))),
        "lenstowords_seconds": time.time() - started,
    }
    if not args.no_coco:
        started = time.time()
        try:
            report["coco"] = coco_metrics(predictions, references)
            report["coco_seconds"] = time.time() - started
            if "SPICE" not in report["coco"]:
                print("note: SPICE skipped: its Stanford models are not installed",
                      file=sys.stderr)
        except EvaluationError as error:
            print(f"warning: COCO metrics skipped: {error}", file=sys.stderr)
    if args.scenes is not None:
        from lensjax.data.synthetic import read_scenes
        from lensjax.scene_scores import score_scenes

        scenes = {scene.name: scene for scene in read_scenes(args.scenes)}
        report["scenes"] = score_scenes(predictions, scenes).as_dict()
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "metrics.json", json.dumps(report, indent=2))
    write_per_image_csv(args.out / "per_image.csv", predictions, references, per_image)
    if args.html:
        write_gallery(args.out / "gallery.html", predictions, references, per_image, args.images)
    print(format_table(report))
    return report


def format_table(report: Mapping[str, Any]) -> str:
    rows = [("LensToWords BLEU-4 (mean sentence BLEU, nltk method4)",
             report["lenstowords_bleu4"])]
    rows += [(f"COCO {name} (pycocoevalcap{', corpus' if name.startswith('BLEU') else ''})",
              value) for name, value in report.get("coco", {}).items()]
    scenes = report.get("scenes")
    if scenes:
        rows += [("scenes: (size, colour, kind) triple F1", scenes["triple_f1"]),
                 ("scenes: exact triple sets", scenes["exact_sets"]),
                 ("scenes: shape count right", scenes["count"]),
                 ("scenes: background right (where named)", scenes["background"]),
                 ("scenes: background named", scenes["background_named"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"{report['images']} images"] + [f"{n:<{width}}  {v:.4f}" for n, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command line; -> the exit status (0 scored, 2 bad input, 130 interrupted)."""
    from lensjax.checkpoint import CheckpointError

    args = _parser().parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        print(f"error: interrupted (Ctrl-C) before all reports were written to {args.out}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (EvaluationError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
