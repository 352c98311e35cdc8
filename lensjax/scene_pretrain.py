"""Pretrain a captioner's image encoder on the synthetic set's scene labels: `make demo`'s
ImageNet.

LensToWords' encoder is a ConvNeXt pretrained on ImageNet's labels. Offline there are no such
weights, and a random encoder does not see the synthetic shapes' kinds (BENCHMARKS.md, "make
demo"); learned from the captions alone, the kind comes too late for a demo's minutes. This
trains the encoder and its multi-scale head on what `scenes.jsonl` says each image shows:
each of the head's (pool x pool) tokens predicts the kind, colour and size of the shape whose
box covers its cell (or "none") and that shape's place from the left (first, second, third),
and the mean token predicts the background and the number of shapes. The loss averages over
shapes (each shape's cells together weigh one, so a small shape on one cell counts as much as
a large one on six) and, separately, over the empty cells, so the few cells that hold a shape
are not drowned by the many that do not.

A preset with a Perceiver (v3b's) has its Perceiver pretrained too, on top of the tokens
(through a stop-gradient, at `--perceiver-lr`): its first latents each read one shape from
the left (kind, colour, size and its place, or none), the next the background and the
count. The Perceiver reads the 64 tokens as a set (it has no positional embedding), and a
decoder trained from scratch on the captions does not learn within a demo's minutes to tell
which colour and size go with which kind; with the latents already one per shape, each
saying which it is, it does far more often (BENCHMARKS.md, "make demo").

    python -m lensjax.scene_pretrain demo_out/shapes --preset demo --image-size 128 \\
        --steps 1500 --out demo_out/encoder

The checkpoint is a whole captioner of the preset whose encoder, head and Perceiver are
trained (its language model and cross-attention random), so `python -m lensjax.extract
--weights`, `--init encoder=` and `--init perceiver=` read it as any other. Only the set's
training images are seen: the split is the training CLI's (`seed_split`, seed 42, 90%), and
the held-out accuracies are measured on the rest.

Each batch is split over this host's devices when they divide it. On a CPU, give XLA the
cores as devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`, as `make demo` does):
the small encoder's convolutions leave a core idle otherwise (~10% faster on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image
from tqdm import tqdm

from lensjax.api import CaptionModel
from lensjax.cli import (
    EXIT_BAD_INPUT,
    EXIT_DONE,
    EXIT_INTERRUPTED,
    EXIT_NON_FINITE,
    CliParser,
    describe_os_error,
    finite_float,
    int_in,
)
from lensjax.data.captions import load_flickr30k, seed_split
from lensjax.data.image_cache import ImageCache
from lensjax.data.images import normalise
from lensjax.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    MAX_SHAPES,
    SHAPES,
    SIZES,
    Scene,
    read_scenes,
)
from lensjax.models.families import family_of, preset_config
from lensjax.models.layers import Linear
from lensjax.params import new_module

_KINDS, _COLOURS, _SIZES, _BACKGROUNDS = (tuple(SHAPES), tuple(COLOURS), tuple(SIZES),
                                          tuple(BACKGROUNDS))


class SceneTargets(NamedTuple):
    """Per-image labels: `kind`, `colour`, `size` int32 (N, grid*grid), 0 = no shape in the
    cell, else 1 + the index in the synthetic set's list; `place` int32 (N, grid*grid), 0 = no
    shape, else the shape's place from the left (1, 2, 3); `weight` float32 (N, grid*grid),
    1 / the number of cells of the cell's shape (0 for empty cells), so that every shape
    counts the same in the loss, small or large; `centre` bool (N, grid*grid), the cell
    holding each shape's box centre; `background` int32 (N,); `count` int32 (N,), the number
    of shapes; `slot_kind`, `slot_colour`, `slot_size`, `slot_place` int32 (N, MAX_SHAPES),
    the shapes from the left and their places (0 where the scene has fewer), for the
    Perceiver's first latents."""

    kind: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    place: np.ndarray
    weight: np.ndarray
    centre: np.ndarray
    background: np.ndarray
    count: np.ndarray
    slot_kind: np.ndarray
    slot_colour: np.ndarray
    slot_size: np.ndarray
    slot_place: np.ndarray

    @property
    def token_labels(self) -> tuple[np.ndarray, ...]:
        """What `SceneReadouts` reads from the tokens, in its order."""
        return (self.kind, self.colour, self.size, self.place, self.background, self.count)

    @property
    def latent_labels(self) -> tuple[np.ndarray, ...]:
        """What `SceneReadouts` reads from the Perceiver's latents, in its order."""
        return (self.slot_kind, self.slot_colour, self.slot_size, self.slot_place,
                self.background, self.count)

    def rows(self, index: np.ndarray) -> SceneTargets:
        return SceneTargets(*(field[index] for field in self))


def scene_targets(scenes: Sequence[Scene], grid: int, image_side: int) -> SceneTargets:
    """The labels of `scenes` on a (grid x grid) raster, row-major as the encoder head
    flattens its pooled maps. A cell takes a shape's labels when its centre lies in the
    shape's box, and the cell holding the box centre always does (a small shape covers at
    least one cell). `image_side`: the side in pixels the scenes' boxes are given in."""
    images = len(scenes)
    kind, colour, size, places = (np.zeros((images, grid, grid), np.int32) for _ in range(4))
    weight = np.zeros((images, grid, grid), np.float32)
    centre = np.zeros((images, grid, grid), bool)
    slots = np.zeros((4, images, MAX_SHAPES), np.int32)  # kind, colour, size, place
    background = np.array([_BACKGROUNDS.index(s.background) for s in scenes], np.int32)
    shapes = np.array([len(s.shapes) for s in scenes], np.int32)
    cell = image_side / grid
    middles = (np.arange(grid) + 0.5) * cell
    for n, scene in enumerate(scenes):
        for place, shape in enumerate(scene.shapes, 1):
            x0, y0, x1, y1 = shape.box
            inside = (((middles >= y0) & (middles < y1))[:, None]
                      & ((middles >= x0) & (middles < x1))[None, :])
            row = min(grid - 1, int((y0 + y1) / 2 // cell))
            col = min(grid - 1, int((x0 + x1) / 2 // cell))
            inside[row, col] = True
            centre[n, row, col] = True
            kind[n][inside] = 1 + _KINDS.index(shape.kind)
            colour[n][inside] = 1 + _COLOURS.index(shape.colour)
            size[n][inside] = 1 + _SIZES.index(shape.size)
            places[n][inside] = place
            slots[:, n, place - 1] = (kind[n, row, col], colour[n, row, col],
                                      size[n, row, col], place)
            weight[n][inside] = 1.0 / inside.sum()
    flat = (images, grid * grid)
    return SceneTargets(kind.reshape(flat), colour.reshape(flat), size.reshape(flat),
                        places.reshape(flat), weight.reshape(flat), centre.reshape(flat),
                        background, shapes, *slots)


class SceneReadouts(nnx.Module):
    """Linear read-outs of a scene from `width`-wide vectors: per item (a token or a latent)
    the logits of kind (·, 5), colour (·, 6), size (·, 3) and place from the left (·, 4), 0
    meaning no shape; per image background (·, 3) and shape count (·, 4)."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.kind = Linear(width, 1 + len(_KINDS), rngs=rngs)
        self.colour = Linear(width, 1 + len(_COLOURS), rngs=rngs)
        self.size = Linear(width, 1 + len(_SIZES), rngs=rngs)
        self.place = Linear(width, 1 + MAX_SHAPES, rngs=rngs)
        self.background = Linear(width, len(_BACKGROUNDS), rngs=rngs)
        self.count = Linear(width, 1 + MAX_SHAPES, rngs=rngs)

    def __call__(self, items: jax.Array, image: jax.Array) -> tuple[jax.Array, ...]:
        """items (B, N, width), image (B, width) -> kind, colour, size, place (B, N, ·),
        background, count (B, ·)."""
        return (self.kind(items), self.colour(items), self.size(items), self.place(items),
                self.background(image), self.count(image))


class SceneProbe(nnx.Module):
    """A captioner's encoder, head and Perceiver (shared, not copied) with `SceneReadouts`:
    images (B, H, W, 3) -> 12 logits: those of the tokens (B, S, ·) with the mean token for
    the image, then (only when the captioner has a Perceiver; None otherwise) those of the
    first MAX_SHAPES latents, one shape each from the left, with the next latent for the
    image."""

    def __init__(self, captioner: nnx.Module, *, rngs: nnx.Rngs):
        captioner.check_can_encode()
        self.encoder = captioner.encoder
        self.encoder_head = captioner.encoder_head
        self.read_tokens = SceneReadouts(captioner.cfg.head.out_dim, rngs=rngs)
        self.perceiver = getattr(captioner, "perceiver", None)
        if self.perceiver is not None:
            if captioner.cfg.perceiver.num_latents <= MAX_SHAPES:
                raise ValueError(f"the Perceiver needs more than {MAX_SHAPES} latents to be "
                                 "pretrained on the scenes (one per shape and one for the "
                                 "background and count)")
            self.read_latents = SceneReadouts(captioner.cfg.perceiver.dim, rngs=rngs)

    def __call__(self, images: jax.Array) -> tuple[jax.Array | None, ...]:
        tokens = self.encoder_head(self.encoder(images))
        latents: tuple[jax.Array | None, ...] = (None,) * 6
        if self.perceiver is not None:
            # The Perceiver learns to read the tokens; it does not train the encoder.
            read = self.perceiver(jax.lax.stop_gradient(tokens))
            latents = self.read_latents(read[:, :MAX_SHAPES], read[:, MAX_SHAPES])
        return (*self.read_tokens(tokens, tokens.mean(axis=1)), *latents)


# The probe's parts that read the Perceiver's latents (optimizer label "latents").
_LATENT_PARTS = dict.fromkeys(("perceiver", "read_latents"), "latents")


def _balanced_cross_entropy(logits: jax.Array, labels: jax.Array, weight: jax.Array
                            ) -> jax.Array:
    """Cross-entropy averaged over the shapes (each shape's cells weighted to sum to 1) plus
    the mean over the empty cells."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    empty = (labels == 0).astype(jnp.float32)
    return ((losses * weight).sum() / jnp.maximum(weight.sum(), 1.0)
            + (losses * empty).sum() / jnp.maximum(empty.sum(), 1.0))


def scene_loss(outputs: Sequence[jax.Array | None], targets: SceneTargets) -> jax.Array:
    """The training objective: balanced cross-entropies of kind, colour, size and place per
    token, the cross-entropies of the background and the shape count, and (with a Perceiver)
    the mean cross-entropies of the same read from its latents: each shape's from its own,
    the background and count from the next."""
    per_item = optax.softmax_cross_entropy_with_integer_labels
    tokens, latents = outputs[:6], outputs[6:]
    labels = targets.token_labels
    loss = sum(_balanced_cross_entropy(logits, cells, targets.weight)
               for logits, cells in zip(tokens[:4], labels[:4], strict=True))
    loss += sum(per_item(logits, image).mean()
                for logits, image in zip(tokens[4:], labels[4:], strict=True))
    if latents[0] is not None:
        loss += sum(per_item(logits, slots).mean()
                    for logits, slots in zip(latents, targets.latent_labels, strict=True))
    return loss


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """Adam at `learning_rate` with a linear warm-up over `warmup` steps and a cosine decay to
    0 at `steps` (the Perceiver and its read-outs at `perceiver_learning_rate` on the same
    schedule: at the encoder's rate its attention does not learn to pick the shapes); batches
    of `batch_size` drawn without replacement within each epoch."""

    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 6e-3
    perceiver_learning_rate: float = 1e-3
    warmup: int = 50
    seed: int = 0


def pretrain(captioner: nnx.Module, pixels: np.ndarray, targets: SceneTargets,
             settings: PretrainSettings, *, progress: bool = True
             ) -> tuple[SceneProbe, list[float]]:
    """Train `captioner`'s encoder and head in place on uint8 images (N, H, W, 3) and their
    labels; -> the probe (the encoder with its trained read-outs) and the loss of every
    step."""
    probe = SceneProbe(captioner, rngs=nnx.Rngs(settings.seed))
    graphdef, params, rest = nnx.split(probe, nnx.Param, ...)
    warmup = min(settings.warmup, settings.steps // 2)

    def adam(peak: float) -> optax.GradientTransformation:
        return optax.adam(optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(settings.steps, warmup + 1)))

    optimizer = optax.partition(
        {"image": adam(settings.learning_rate),
         "latents": adam(settings.perceiver_learning_rate)},
        jax.tree_util.tree_map_with_path(
            lambda path, _: _LATENT_PARTS.get(path[0].key, "image"), params))
    opt_state = optimizer.init(params)
    # Data parallel over this host's devices when they divide the batch (on a CPU, with
    # XLA_FLAGS=--xla_force_host_platform_device_count=2, the two cores each take half: at
    # batch 16 on 2 cores the probe's gradient ~25% faster, the whole loop ~10%, where one
    # device leaves a core idle).
    devices = jax.local_devices()
    if settings.batch_size % len(devices):
        devices = devices[:1]
    mesh = Mesh(np.array(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec("data"))
    params, opt_state = jax.device_put((params, opt_state), replicated)

    @functools.partial(jax.jit, in_shardings=(replicated, replicated, rows, rows),
                       out_shardings=(replicated, replicated, replicated))
    def step(params, opt_state, images, batch_targets):
        def loss_of(params):
            module = nnx.merge(graphdef, params, rest)
            return scene_loss(module(normalise(images)), batch_targets)

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(settings.seed)
    order: list[int] = []
    losses = []
    with tqdm(total=settings.steps, desc="scene pretraining", unit="step",
              disable=not progress) as bar:
        for _ in range(settings.steps):
            if len(order) < settings.batch_size:
                order += rng.permutation(len(pixels)).tolist()
            index = np.array(order[: settings.batch_size])
            del order[: settings.batch_size]
            params, opt_state, loss = step(params, opt_state, pixels[index],
                                           targets.rows(index))
            losses.append(float(loss))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"the loss became {losses[-1]} at step {len(losses)}")
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
    nnx.update(probe, jax.device_put(params, devices[0]))
    return probe, losses


def held_out_accuracy(probe: SceneProbe, pixels: np.ndarray, targets: SceneTargets,
                      batch_size: int = 100) -> dict[str, float]:
    """Accuracy of a trained probe on uint8 images (N, H, W, 3) it did not train on: kind,
    colour, size and place at each shape's centre cell, background and count per image,
    "empty" (cells without a shape read as none), and with a Perceiver "latents": images
    whose shapes (and empty slots), background and count its latents all read exactly."""
    graphdef, state = nnx.split(probe)
    run = jax.jit(lambda state, x: nnx.merge(graphdef, state)(normalise(x)))
    outputs: list[list[np.ndarray]] = [[] for _ in range(12)]
    for start in range(0, len(pixels), batch_size):
        chunk = jnp.asarray(pixels[start : start + batch_size])
        for store, logits in zip(outputs, run(state, chunk), strict=True):
            if logits is not None:
                store.append(np.asarray(logits.argmax(-1)))
    kind, colour, size, place, background, count = (np.concatenate(o) for o in outputs[:6])
    centre, empty = targets.centre, targets.kind == 0
    accuracy = {"kind": float((kind == targets.kind)[centre].mean()),
                "colour": float((colour == targets.colour)[centre].mean()),
                "size": float((size == targets.size)[centre].mean()),
                "place": float((place == targets.place)[centre].mean()),
                "background": float((background == targets.background).mean()),
                "count": float((count == targets.count).mean()),
                "empty": float((kind == 0)[empty].mean())}
    if probe.perceiver is not None:
        read = [np.concatenate(o).reshape(len(pixels), -1) for o in outputs[6:]]
        accuracy["latents"] = float(np.logical_and.reduce(
            [(r == t.reshape(len(pixels), -1)).all(axis=1)
             for r, t in zip(read, targets.latent_labels, strict=True)]).mean())
    return accuracy


def _parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m lensjax.scene_pretrain", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", type=Path, help="a synthetic set's folder (images/, captions.txt, "
                        "scenes.jsonl), as `python -m lensjax.data.synthetic` writes it")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    parser.add_argument("--preset", default="demo", help="the captioner preset whose encoder, "
                        "head and Perceiver (v3b presets) are trained (default: demo)")
    parser.add_argument("--image-size", type=int_in(32), default=128,
                        help="side in pixels the images are resized to; recorded in the "
                        "checkpoint, so extraction and captioning use it (default: 128, "
                        "where the encoder's maps line up with the 8x8 token grid)")
    parser.add_argument("--steps", type=int_in(1), default=PretrainSettings.steps,
                        help=f"training steps (default: {PretrainSettings.steps})")
    parser.add_argument("--batch-size", type=int_in(1), default=PretrainSettings.batch_size,
                        help=f"images per step (default: {PretrainSettings.batch_size})")
    parser.add_argument("--lr", type=finite_float(0), default=PretrainSettings.learning_rate,
                        help="peak learning rate (Adam, warm-up then cosine decay; default: "
                        f"{PretrainSettings.learning_rate:g})")
    parser.add_argument("--perceiver-lr", type=finite_float(0),
                        default=PretrainSettings.perceiver_learning_rate,
                        help="peak learning rate of the Perceiver and its read-outs (same "
                        f"schedule; default: {PretrainSettings.perceiver_learning_rate:g})")
    parser.add_argument("--seed", type=int_in(0), default=0,
                        help="seed of the initial weights, the read-outs and the batch order")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Pretrain and save; -> the held-out accuracies (also in the checkpoint's provenance).
    ValueError (or OSError) for input it cannot use, before any training."""
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists; pass --overwrite to replace it")
    scenes = {scene.name: scene for scene in read_scenes(args.set)}
    names = list(load_flickr30k(args.set / "captions.txt"))
    missing = [name for name in names if name not in scenes]
    if missing:
        raise ValueError(f"{len(missing)} images of {args.set / 'captions.txt'} have no scene in "
                         f"scenes.jsonl (first: {missing[0]})")
    train_names, held_out = seed_split(names, seed=42, train_frac=0.9)
    with Image.open(args.set / "images" / names[0]) as first:
        side = first.size[0]
    cfg = preset_config(args.preset)
    if not family_of(cfg).captioner or cfg.encoder is None or cfg.head is None:
        raise ValueError(f"preset {args.preset!r} has no ConvNeXt encoder and head to train")
    cfg = dataclasses.replace(cfg, image_size=args.image_size)
    captioner = new_module(cfg, args.seed)
    grid = cfg.head.pool_size

    def load(keys: list[str]) -> tuple[np.ndarray, SceneTargets]:
        cache = ImageCache(args.set / "images", keys, args.image_size, progress=not args.quiet)
        if cache.problems:
            raise ValueError(f"{len(cache.problems)} images cannot be read: {cache.problems[0]}")
        return cache.pixels, scene_targets([scenes[k] for k in keys], grid, side)

    started = time.time()
    pixels, targets = load(train_names)
    settings = PretrainSettings(args.steps, args.batch_size, args.lr, args.perceiver_lr,
                                seed=args.seed)
    probe, losses = pretrain(captioner, pixels, targets, settings, progress=not args.quiet)
    accuracy = held_out_accuracy(probe, *load(held_out))
    provenance = {"created_by": "python -m lensjax.scene_pretrain",
                  "note": "encoder, head and Perceiver (where the preset has one) pretrained "
                          "on the synthetic set's scene labels; the other components are "
                          "random",
                  "set": str(args.set), "steps": args.steps, "image_size": args.image_size,
                  "final_loss": losses[-1], "held_out_accuracy": accuracy,
                  "seconds": round(time.time() - started)}
    CaptionModel(captioner, {"provenance": provenance}).save(args.out, overwrite=args.overwrite)
    return accuracy


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        accuracy = run(args)
    except OSError as error:
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FloatingPointError as error:
        print(f"error: {error}; try a lower --lr (nothing was written)", file=sys.stderr)
        return EXIT_NON_FINITE
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"held-out accuracy ({args.set}): " + ", ".join(
        f"{name} {value:.3f}" for name, value in accuracy.items()))
    print(f"wrote {args.out}")
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
