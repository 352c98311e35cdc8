"""python -m bridge: convert LensToWords' PyTorch weights to a lensjax checkpoint and back."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bridge.io import BridgeError
from lensjax.checkpoint import CheckpointError
from lensjax.params import ParamMismatchError

EPILOG = """\
examples:
  python -m bridge import --perceiver weights/best_perciever.pth \\
      --gpt2-blocks weights/best_gpt2.pth --cross-attention weights/best_cross_attention.pth \\
      --gpt2 weights/gpt2 --out weights/v3b
  python -m bridge import --family v3a --projection-head weights/best_projection_head.pth \
      --decoder weights/best_decoder.pth --out weights/v3a
  python -m bridge import --family v2 --keras best_model.keras --vocab vocab.txt \
      --inception inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5 --out weights/v2
  python -m bridge export weights/v3b --out exported/
  python -m bridge export weights/v2 --out exported/   # best_model.keras + vocab.txt
  python -m bridge inspect weights/best_perciever.pth

Families: v3b (--perceiver, --gpt2-blocks, --cross-attention, --gpt2; the default) and v3a
(--projection-head, --decoder: the v3a notebook's files); both take --encoder and
--encoder-head. v1 and v2 (--keras, --vocab, optionally --inception) read the notebooks'
best_model.keras with h5py alone (no TensorFlow) and keep the vocabulary in the checkpoint;
export writes them back (keras.models.load_model opens the file where the notebook's
TemporalImageAttention is registered).
v3b's layouts (notebook = the released files, src = LensToWords' src/model.py) are
detected from the keys. .pth files are read with torch.load(weights_only=True) only:
pickled code is refused.
import refuses NaN or infinite weights; export checks every array of the checkpoint against
the checksum saved with it. --out must not be, contain or lie inside an input.

exit status: 0 done; 2 bad arguments or input (one `error:` line says which file and why);
nothing is written then.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bridge",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    imp = commands.add_parser(
        "import",
        help="released .pth files -> lensjax checkpoint directory",
        description="Convert LensToWords' released files into a lensjax checkpoint directory. "
        "Every problem (missing, unexpected or mis-shaped keys, NaN or infinite weights) of "
        "every file is listed in one error.",
    )
    imp.add_argument("--family", choices=("v3b", "v3a", "v2", "v1", "clip"), default="v3b",
                     help="which generation the files are, or clip for the CLIP scorer of "
                     "v3d's filter (default: v3b)")
    v3b = imp.add_argument_group("v3b files (all four needed)")
    v3b.add_argument("--perceiver", type=Path, help="best_perciever.pth (notebook or src layout)")
    v3b.add_argument("--gpt2-blocks", type=Path,
                     help="best_gpt2.pth: the fine-tuned GPT-2 blocks")
    v3b.add_argument("--cross-attention", type=Path, help="best_cross_attention.pth")
    v3b.add_argument("--gpt2", type=Path,
                     help="public HF gpt2 folder, or its model.safetensors / pytorch_model.bin "
                     "(supplies wte, wpe, ln_f)")
    v3a = imp.add_argument_group("v3a files (both needed)")
    v3a.add_argument("--projection-head", type=Path, help="best_projection_head.pth")
    v3a.add_argument("--decoder", type=Path,
                     help="best_decoder.pth (the Transformer, with its positional_encoding)")
    words = imp.add_argument_group("v1/v2 files (--keras and --vocab needed)")
    words.add_argument("--keras", type=Path,
                       help="the notebook's best_model.keras (its ModelCheckpoint file), or "
                       "a whole model saved as legacy HDF5 (model.save('x.h5'), Keras 3)")
    words.add_argument("--vocab", type=Path,
                       help="its vocabulary: vectorizer.get_vocabulary() one word per line, "
                       "the first line empty (padding)")
    words.add_argument("--inception", type=Path,
                       help="InceptionV3 weights: keras.applications' "
                       "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5, or a "
                       "torchvision inception_v3 state dict (.pth); without it the "
                       "checkpoint captions pre-computed features only")
    clip = imp.add_argument_group("clip weights (one of)").add_mutually_exclusive_group()
    clip.add_argument("--hf", type=Path, help="an HF CLIPModel folder (or model.safetensors)")
    clip.add_argument("--openai", type=Path,
                      help="OpenAI's ViT-B-32.pt (a TorchScript archive: its tensors are read, "
                      "its code never runs)")
    clip.add_argument("--open-clip", type=Path, help="an open_clip state dict (.pth/.bin)")
    imp.add_argument("--encoder", type=Path,
                     help="timm ConvNeXt-Tiny weights (.pth or .safetensors); without it the "
                     "checkpoint captions pre-computed features only")
    imp.add_argument("--encoder-head",
                     help="encoder head file (projections.{0,1,2}/norm or proj1..3/norm), or "
                     "'random' for a fresh head initialised from --seed")
    imp.add_argument("--preset",
                     help="model shape to convert into (default: the family's full size, v3b "
                     "or v3a; 'tiny' / 'v3a-tiny' for test files)")
    imp.add_argument("--seed", type=int, default=0,
                     help="seed of a random encoder head (default: 0)")
    imp.add_argument("--out", required=True, type=Path,
                     help="checkpoint directory to write (not an input, nor a folder that "
                     "holds or is inside one)")
    imp.add_argument("--force", action="store_true", help="replace --out if it exists")

    exp = commands.add_parser(
        "export",
        help="lensjax checkpoint directory -> LensToWords .pth files (v1/v2: .keras)",
        description="Write a lensjax checkpoint as files the original code loads: .pth files "
        "for load_state_dict(strict=True), or for v1/v2 the notebook's best_model.keras and "
        "vocab.txt. The checkpoint's arrays are checked against the checksums saved with "
        "them first.",
    )
    exp.add_argument("checkpoint", type=Path, help="lensjax checkpoint directory")
    exp.add_argument("--out", required=True, type=Path,
                     help="directory to write (not the checkpoint, nor a folder that holds or "
                     "is inside it)")
    exp.add_argument("--layout", choices=("notebook", "src", "v3a"),
                     help="check the model is in this layout (default: the model's own)")
    exp.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                     help="cast every tensor (default: each file's dtype at import)")
    exp.add_argument("--merge-lora", action="store_true",
                     help="a LoRA-trained checkpoint (python -m lensjax.train --lora): write "
                     "its weights with the adapters merged, W + alpha/rank * A @ B")
    exp.add_argument("--force", action="store_true", help="replace --out if it exists")

    ins = commands.add_parser(
        "inspect", help="show which layout a weights file has",
        description="Print the detected layout, tensor count and dtypes of weights files.",
    )
    ins.add_argument("files", nargs="+", type=Path)
    return parser


def _inspect(files: list[Path]) -> None:
    from bridge.convert import detect_table
    from bridge.io import read_state_dict, resolve_weights_file
    from bridge.tables import TABLES

    for path in files:
        tensors = read_state_dict(resolve_weights_file(path))
        dtypes = sorted({str(v.dtype) for v in tensors.values()})
        layouts = []
        for component in TABLES:
            try:
                layouts.append(detect_table(component, path, tensors).name)
            except BridgeError:
                continue
        print(f"{path}: {len(tensors)} tensors, {'/'.join(dtypes)}, "
              f"layout: {', '.join(layouts) or 'unknown'}")


IMPORT_FILES = ("perceiver", "gpt2_blocks", "cross_attention", "gpt2", "projection_head",
                "decoder", "encoder", "encoder_head", "hf", "openai", "open_clip", "keras",
                "vocab", "inception")
KERAS_FILES = ("keras", "vocab", "inception")


def _import_files(args: argparse.Namespace) -> dict[str, Path | str]:
    """The files and folders that `import` was given, by component."""
    return {name: getattr(args, name) for name in IMPORT_FILES
            if getattr(args, name) is not None}


def _import_inputs(args: argparse.Namespace) -> list[str | Path]:
    """The files and folders that `import` reads."""
    from bridge.convert import RANDOM

    return [path for name, path in _import_files(args).items()
            if not (name == "encoder_head" and path == RANDOM)]


def main(argv: list[str] | None = None) -> int:
    """Run `python -m bridge` with `argv`; returns the exit status (0 done, 2 refused,
    130 interrupted)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "import":
            from bridge.convert import check_out, import_model

            check_out(args.out, _import_inputs(args), force=args.force)
            if args.family == "clip":
                from bridge.convert import import_clip_model

                files = _import_files(args)
                if len(files) != 1 or not set(files) <= {"hf", "openai", "open_clip"}:
                    raise BridgeError("a clip import reads one of --hf, --openai, --open-clip "
                                      f"(given: {', '.join(files) or 'none'})")
                clip_model = import_clip_model(next(iter(files.values())), log=print,
                                               preset=args.preset or "clip-vit-b-32")
                clip_model.save(args.out, overwrite=args.force)
                print(f"wrote {args.out} ({clip_model.config.describe()})")
                return 0
            files = _import_files(args)
            if args.family in ("v1", "v2"):
                from bridge.keras_models import import_keras

                other = sorted(set(files) - set(KERAS_FILES))
                missing = [name for name in ("keras", "vocab") if name not in files]
                if other or missing:
                    raise BridgeError(f"a {args.family} import reads --keras, --vocab and "
                                      "optionally --inception"
                                      + (f"; missing: --{', --'.join(missing)}" if missing
                                         else "")
                                      + (f"; not {args.family} files: --"
                                         + ", --".join(n.replace('_', '-') for n in other)
                                         if other else ""))
                model = import_keras(args.family, files["keras"], files["vocab"],
                                     files.get("inception"), log=print)
                model.save(args.out, overwrite=args.force)
                encoder = "" if "inception" in files else \
                    "; no InceptionV3: it captions pre-computed features only"
                print(f"wrote {args.out} ({model.config.describe()}{encoder})")
                return 0
            if set(files) & set(KERAS_FILES):
                raise BridgeError("--keras, --vocab and --inception are v1/v2 files: pass "
                                  "--family v1 or --family v2")
            model = import_model(family=args.family, preset=args.preset, seed=args.seed,
                                 log=print, **files)
            model.save(args.out, overwrite=args.force)
            missing = [c for c, r in model.metadata["components"].items()
                       if r.get("status") == "absent"]
            print(f"wrote {args.out} ({model.config.describe()}"
                  + (f"; no {' or '.join(missing)}: it captions pre-computed features only)"
                     if missing else ")"))
        elif args.command == "export":
            from bridge.convert import export_files

            export_files(args.checkpoint, args.out, layout=args.layout, dtype=args.dtype,
                         force=args.force, merge_lora=args.merge_lora, log=print)
            print(f"wrote {args.out}")
        else:
            _inspect(args.files)
    except (BridgeError, CheckpointError, ParamMismatchError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written to a temporary sibling, removed on the way
        where = f"; nothing was written to {args.out}" if args.command != "inspect" else ""
        print(f"error: interrupted (Ctrl-C){where}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
