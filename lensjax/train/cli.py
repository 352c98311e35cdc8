"""python -m lensjax.train: LensToWords' phase curriculum, data-parallel over every device.

Each phase (see the table below) trains some components of the captioner on pre-extracted
image features (`python -m lensjax.extract`), from initial weights that earlier phases wrote.
A phase that trains the image encoder (`--lr encoder=...,encoder_head=...`) reads the images
themselves instead (--images): each is decoded and resized once, to the model's image size,
and kept in memory as uint8 for the whole run.
A run folder (--out, default RUNS_DIR/PHASE) holds:

  run.json        the phase's resolved settings, initial-weight sources, status
  metrics.jsonl   one JSON object per log line: step, train loss, samples/s, learning rates;
                  per epoch the validation loss; at the end the evaluation
  latest/         checkpoint every --save-every steps and at each epoch end, with the
                  optimizer state, RNG and data position (--resume continues from it)
  best/           the lowest-validation-loss weights: what the next phase starts from
  eval.json       end-of-phase sample captions and validation BLEU-4 (both protocols)
  loss.png        train and validation loss curves (--plot)

`latest/` and `best/` are lensjax checkpoints: `lensjax.load_pretrained(DIR)` loads them and
`python -m bridge export DIR --out ...` turns them into the original's PyTorch files.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensjax.checkpoint import CheckpointError
from lensjax.cli import (
    EXIT_BAD_INPUT,
    EXIT_DONE,
    EXIT_INTERRUPTED,
    EXIT_NON_FINITE,
    SEED_MAX,
    CliParser,
    describe_os_error,
    enable_compilation_cache,
)
from lensjax.models.families import all_presets
from lensjax.phases import FRESH, PHASES, phase_table
from lensjax.train.inputs import data_paths, load_data
from lensjax.train.loop import InterruptGuard, PhaseRun, run_phase
from lensjax.train.messages import Interrupted, NonFiniteLoss, TrainError, say
from lensjax.train.run_folder import LATEST, Resumed, RunFolder, Start, read_latest
from lensjax.train.settings import check_flags, fit_model, parse_assignments, resolve_settings
from lensjax.train.sources import (
    Checkpoints,
    initial_params,
    model_config,
    resolve_sources,
    resumed_config,
)
from lensjax.train.words import generation_of, loss_weights, sized_to, word_vocabulary

EPILOG = f"""\
phases (defaults; every one can be overridden by the flags above):
{phase_table()}

initial weights (--init KEY=SOURCE, comma-separated or repeated):
  a phase name      where that phase's output is: 2b=runs/2b (a run folder: its best/;
                    default RUNS_DIR/NAME/best), or any lensjax checkpoint, e.g. a bridged
                    release: 2d=weights/v3b
  gpt2=PATH         the pretrained GPT-2 for 2a/2c: an HF gpt2 folder (read through the
                    bridge) or a lensjax checkpoint; also overrides where any
                    phase's GPT-2 comes from
  perceiver=, xattn=, encoder=PATH (v3b), projection_head=, decoder=PATH (v3a),
  decoder=, encoder=PATH (v1/v2: a word decoder brings its vocabulary, an encoder its
                    InceptionV3)
                    take that component from PATH instead; SOURCE `fresh` re-initialises it.
                    Unless a phase trains it, the encoder is carried from the first
                    checkpoint that has one, so the result can caption image files

v1 and v2 (the first generations, word models over InceptionV3 features):
  --data takes the original's Instagram CSVs; captions are cleaned (and, v2, filtered) as the
  notebooks did, split 90/10 as sklearn's train_test_split(random_state=42), and the word
  vocabulary is built from them (unless the decoder comes from a checkpoint) and saved in
  latest/ and best/. --features: python -m lensjax.extract IMAGES --family v1|v2 --inception
  WEIGHTS --out DIR. Keras' Adam, ReduceLROnPlateau on the validation loss (its state resumes
  with --resume) and early stopping as in the notebooks; see the table above.

training the image encoder:
  --lr encoder=1e-4,encoder_head=1e-3 trains the ConvNeXt and its multi-scale head (0 freezes
  them, as every phase of the original does). Such a phase reads --images (a folder holding
  the captions' image files) instead of a feature cache: decoded once on every core, resized
  to --image-size (default: the model's, 224 for the original's), kept in memory as uint8
  (N x size x size x 3 bytes: 4,000 images at 64 px take 49 MB, Flickr30k at 224 px 4.7 GB).
  --remat also checkpoints the encoder stages. A later phase that freezes the encoder reads
  features again: extract them with the trained checkpoint (python -m lensjax.extract).

examples:
  python -m lensjax.train --phase 2a --init gpt2=weights/gpt2 --data data/flickr30k/captions.txt \\
      --features features/flickr30k
  python -m lensjax.train --phase 2c --notebook-lr       # 2c at the notebook's 1e-5
  python -m lensjax.train --phase 2d --lr perceiver=2e-5,gpt2=5e-6 --epochs 10
  python -m lensjax.train --phase 3a --init 2d=weights/v3b --batch-size 64 --plot
  python -m lensjax.train --phase 2d --resume            # continue a killed run
  python -m lensjax.train --phase v2 --data data/instagram.csv --features features/v2
  python -m lensjax.train --phase 2d --lr encoder=1e-4,encoder_head=1e-3 \\
      --images data/flickr30k/images                     # fine-tune the encoder too

fine-tuning without forgetting (LensToWords' 3b lost COCO's descriptive style; its notebook
names EWC, LoRA and mixed batches as the remedies):
  --lora                     adapters only; base weights frozen, no optimizer state for them;
                             latest/ and best/ keep the adapters in their lora/ tree (loading
                             merges them; bridge export --merge-lora writes merged .pth files)
  --data instagram=filtered.csv coco=captions_train2017.json --mix instagram=0.5,coco=0.5
                             half of every batch from each; an epoch = one pass of instagram
  --ewc 100 --ewc-data captions_train2017.json --ewc-batches 50
                             the Fisher is estimated once at the start into ewc/ (resume
                             reads it back)
  e.g. 3b with a remedy: python -m lensjax.train --phase 3b --init 3a-ext=runs/3a-ext \\
      --data instagram=data/filtered.csv coco=data/coco/annotations/captions_train2017.json \\
      --mix instagram=0.5,coco=0.5 --lora rank=8,alpha=16

run.json's status: running, then done, failed (with the step and the reason) or
interrupted (with the step and the last saved step).

Ctrl-C stops the run at the next step (a checkpoint being written is finished first) and
says which step latest/ holds; the same command with --resume continues from there.

Compiled steps are kept in $LENSJAX_CACHE_DIR (default ~/.cache/lensjax/jax), so a resumed
or repeated run of the same model skips compiling.

exit status: 0 done, 2 bad input, 3 stopped on a non-finite loss, 130 interrupted (Ctrl-C).
"""


def _parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="python -m lensjax.train", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", required=True, choices=list(PHASES), metavar="PHASE",
                        help=f"one of: {', '.join(PHASES)}")
    where = parser.add_argument_group("data and weights")
    where.add_argument("--data", nargs="+", metavar="[NAME=]SOURCE",
                       help="caption source(s): Flickr30k captions.txt, COCO/Karpathy JSON, "
                       "Instagram CSV; several are concatenated, or mixed per batch by --mix "
                       "when named (coco=PATH) (default: per phase, e.g. "
                       "data/flickr30k/captions.txt)")
    where.add_argument("--val-data", nargs="+", metavar="[NAME=]SOURCE",
                       help="validation captions (default: LensToWords' 90/10 split of --data, "
                       "random.seed(42); COCO phases: captions_val2017.json); with --mix, "
                       "NAME=SOURCE for a named source's (the others are split 90/10)")
    where.add_argument("--features", nargs="+", metavar="CACHE",
                       help="feature cache folder(s) from python -m lensjax.extract")
    where.add_argument("--images", type=Path, metavar="DIR",
                       help="read the image files in DIR (named as in the captions) instead "
                       "of features: needed when the encoder trains (see below)")
    where.add_argument("--image-size", type=int, metavar="PX",
                       help="side the images are resized to, 32 to 4096 (default: the "
                       "model's, 224 for the original's); stored in the checkpoint's config")
    where.add_argument("--init", action="append", metavar="KEY=SOURCE",
                       help="initial weights (see below)")
    where.add_argument("--runs-dir", type=Path, default=Path("runs"),
                       help="where phases write and find each other's outputs (default: runs)")
    where.add_argument("--out", type=Path, help="run folder (default: RUNS_DIR/PHASE)")
    where.add_argument("--preset", help="model preset for fresh weights, of any family: "
                       f"{', '.join(all_presets())} (default: the init checkpoint's config, "
                       "else the phase's: v3b, demo for demo-*, v3a for v3a)")
    hyper = parser.add_argument_group("overrides of the phase's defaults")
    hyper.add_argument("--lr", action="append", metavar="COMPONENT=RATE,...",
                       help="learning rates: encoder, encoder_head (these read --images); "
                       "v3b: perceiver, gpt2 (blocks and embeddings; `lm` alone for "
                       "wte/wpe/ln_f), xattn; v3a: projection_head, decoder; v1/v2: "
                       "decoder; lora (the adapters of --lora); 0 freezes a component")
    hyper.add_argument("--notebook-lr", action="store_true",
                       help="2a/2c: the notebooks' learning rate (1e-5) instead of the README's")
    hyper.add_argument("--epochs", type=int, help="at most N >= 1 epochs (default: per phase)")
    hyper.add_argument("--max-steps", type=int,
                       help="end the phase after N >= 1 steps (validating and saving as at "
                       "an epoch end)")
    hyper.add_argument("--patience", type=int,
                       help="N >= 1 epochs without validation improvement before stopping")
    hyper.add_argument("--batch-size", type=int,
                       help="global batch, split over all devices (a multiple of their number)")
    hyper.add_argument("--max-len", type=int,
                       help="token sequence length, 3 to what the model's positions hold "
                       "(LensToWords: 64)")
    hyper.add_argument("--subset", type=int, help="train on a seeded subset of N >= 1 images")
    hyper.add_argument("--loss", choices=("eos", "seed", "words", "weighted-words"),
                       help="eos (the v3b phases' default): also learn the end-of-caption "
                       "token; seed (v3a's): LensToWords' loss, which ignores every 50256 "
                       "target; words (v1's): every non-padding word; weighted-words (v2's): "
                       "each word weighted by its rarity")
    hyper.add_argument("--seed", type=int, default=0,
                       help=f"data order, dropout, fresh weights: 0 to {SEED_MAX} (default: 0)")
    keep = parser.add_argument_group(
        "fine-tuning without forgetting (see below; each works on any phase)")
    keep.add_argument("--lora", nargs="?", const="", metavar="rank=R,alpha=A,targets=T,...",
                      help="train LoRA adapters (scale alpha/rank, as PEFT) on the decoder's "
                      "dense layers instead of its weights (default rank 8, alpha 16; targets: "
                      "v3b c_attn,c_proj,c_fc,xattn; v3a self_attn,multihead_attn); adapters "
                      "train at --lr lora= (default 10x the phase's largest rate)")
    keep.add_argument("--mix", metavar="NAME=SHARE,...",
                      help="draw each batch from the named --data sources at these shares; "
                      "the first is the target, whose size defines the epoch (smaller "
                      "sources repeat); validation is reported per source")
    keep.add_argument("--ewc", type=float, metavar="LAMBDA",
                      help="elastic weight consolidation: add LAMBDA/2 * sum F (w - w*)^2, "
                      "F the diagonal Fisher at the initial weights w* on --ewc-data")
    keep.add_argument("--ewc-data", nargs="+", metavar="SOURCE",
                      help="the previous domain's caption source(s) (features from "
                      "--features) the Fisher is estimated on")
    keep.add_argument("--ewc-batches", type=int, default=50, metavar="N",
                      help="batches of --ewc-data for the Fisher (default: 50)")
    running = parser.add_argument_group("running")
    start = running.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in --out from latest/ (removing what an "
                       "interrupted write left there)")
    start.add_argument("--force", action="store_true", help="clear --out and start over")
    running.add_argument("--strict", action="store_true",
                     help="images without features (or, with --images, without a readable "
                     "file) are an error, not skipped")
    running.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="compute dtype (default: float32); bfloat16 is mixed precision "
                     "for GPUs/TPUs (parameters and optimizer state stay float32)")
    running.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                     help="gradient checkpointing of the GPT-2 blocks and, when it trains, "
                     "the encoder's stages (default: on for full-size presets)")
    running.add_argument("--log-every", type=int, default=50,
                         help="steps per metrics.jsonl line, >= 1 (default: 50)")
    running.add_argument("--save-every", type=int, default=500,
                     help="steps between latest/ checkpoints, >= 1; also saved at every "
                         "epoch end (default: 500)")
    running.add_argument("--val-batches", type=int,
                         help="validate on at most N >= 1 batches (default: all)")
    running.add_argument("--eval-images", type=int, default=500,
                     help="validation images captioned at the end of the phase (default: "
                         "500; 0: none)")
    running.add_argument("--eval-method", choices=("greedy", "topk", "beam"),
                         help="decoding for the end-of-phase captions (default: topk, as "
                         "LensToWords evaluated; v1 greedy, v2 beam, as their notebooks)")
    running.add_argument("--plot", action="store_true", help="write loss.png")
    running.add_argument("--distributed", action="store_true",
                     help="multi-host: call jax.distributed.initialize() first (on TPU pods "
                     "and SLURM it finds its settings itself; else give the next three)")
    running.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    running.add_argument("--num-processes", type=int)
    running.add_argument("--process-id", type=int)
    running.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The whole phase; -> the final run.json document. `argv` is recorded in run.json.

    Flags and --out are checked before any work starts. Raises TrainError (bad input),
    NonFiniteLoss, Interrupted (Ctrl-C; the message says where the run stands).
    """
    from lensjax.files import OutputError, check_output

    check_flags(args)
    out = args.out or args.runs_dir / args.phase
    try:
        check_output(out, directory=True)
    except OutputError as error:
        raise TrainError(f"--out: {error}") from None
    try:  # a resumed phase, or the next one of the same model, skips compiling its step
        enable_compilation_cache()
    except OSError as error:
        say(f"note: compiled programs are not kept between runs ({describe_os_error(error)})")
    interrupts = InterruptGuard()
    with interrupts.installed():
        try:
            trainer_run, start = prepare_run(args, RunFolder(out), interrupts)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted (Ctrl-C) before training started; {out} was not "
                              "changed") from None
        return run_phase(trainer_run, start, ["python", "-m", "lensjax.train", *(argv or [])])


def prepare_run(args: argparse.Namespace, folder: RunFolder, interrupts: InterruptGuard
                ) -> tuple[PhaseRun, Start]:
    """Everything before the first step: settings, data, model and initial weights, each
    checked; nothing is written yet."""
    import jax

    if args.distributed:
        # CPU-only clusters need a collectives backend for cross-process all-reduces.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    phase = PHASES[args.phase]
    settings = resolve_settings(args, phase, jax.device_count())
    paths = data_paths(args, phase, settings.from_pixels, settings.mix)
    init: dict[str, str] = {}
    for text in args.init or []:
        init.update(parse_assignments(text, "--init"))
    store = Checkpoints()
    latest = folder.path / LATEST
    if args.resume and latest.is_dir():  # the model and its weights come from latest/
        cfg, sources = resumed_config(latest), {}
    else:
        sources = resolve_sources(phase, init, args.runs_dir)
        cfg = model_config(phase, sources, args.preset, store)
        if settings.image_size is not None:
            cfg = dataclasses.replace(cfg, image_size=settings.image_size)
    settings = fit_model(settings, cfg)
    if jax.process_index() == 0:
        start = folder.prepare(settings, args.resume, args.force, say)
    else:  # process 0 checks and clears the folder; the others only read it
        start = Start(resume=args.resume and latest.is_dir(), clear=False)
    generation = generation_of(cfg)
    data = load_data(paths, settings, generation)
    words: dict[str, Any] = {}
    if generation is not None:  # v1/v2: the word vocabulary sizes the model
        from lensjax.checkpoint import read_metadata

        decoder = sources.get("decoder", FRESH)
        metadata = (read_metadata(latest) if start.resume else
                    None if decoder == FRESH else store.lensjax(Path(decoder))[1])
        vocabulary = word_vocabulary(cfg, data, metadata, say)
        cfg = sized_to(cfg, vocabulary)
        words["tokenizer"] = vocabulary
        if settings.loss == "weighted-words":
            words["token_weights"] = loss_weights(vocabulary, data)
    params: dict[str, np.ndarray] | Resumed
    if start.resume:  # the weights come from latest/
        params, provenance = read_latest(latest), (folder.read_run() or {}).get("init", {})
    else:
        params, provenance = initial_params(cfg, sources, args.seed, store, say)
    trainer_run = PhaseRun(phase, settings, cfg, params, provenance, data, folder, interrupts,
                           strict=args.strict, progress_bar=not args.quiet, **words)
    return trainer_run, start


def _error(message: object, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """The command line; -> the exit status (0 done, 2 bad input, 3 non-finite loss, 130
    interrupted)."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        run(args, argv)
    except NonFiniteLoss as error:
        return _error(error, EXIT_NON_FINITE)
    except Interrupted as error:
        return _error(error, EXIT_INTERRUPTED)
    except KeyboardInterrupt:  # before the run's own handler was installed
        return _error("interrupted (Ctrl-C) before training started", EXIT_INTERRUPTED)
    except (TrainError, CheckpointError, ValueError) as error:
        return _error(error, EXIT_BAD_INPUT)
    except OSError as error:
        return _error(describe_os_error(error), EXIT_BAD_INPUT)
    return EXIT_DONE

