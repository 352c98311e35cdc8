"""A built-in synthetic captioning set: coloured shapes on plain backgrounds, offline.

    python -m lensjax.data.synthetic --out data/shapes --images 5000 --seed 0

writes `images/000000.png ...`, `captions.txt` in Flickr30k's format (header
`image_name| comment_number| comment`, five captions per image, so `load_flickr30k` reads it)
and `scenes.jsonl` (what each image shows: background, then each shape's kind, colour, size
and box, left to right).

Each image has a background (white, gray or black, with a faint vertical gradient) and one to
three shapes (circle, square, triangle, star) in five colours and two clearly different sizes,
each in its own vertical band so "left of" is never ambiguous. The captions are five fixed
templates over the shapes in left-to-right order, for example

    a large red circle to the left of a small blue square .
    there is a large red circle and a small blue square on a white background .
    a small blue square to the right of a large red circle .
    two shapes on a white background , a large red circle and a small blue square .
    a white background with a large red circle and a small blue square .

so every word is predictable from the image. Like Flickr30k's captions they end in " ." (the
token LensToWords' generation stops after). Everything is a function of (seed, image index):
the same seed gives byte-identical files, with any number of worker threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
}
BACKGROUNDS = {"white": (242, 242, 242), "gray": (140, 140, 140), "black": (25, 25, 25)}
# Shape side as a fraction of the image side: far enough apart to be told apart at a glance.
SIZES = {"small": (0.12, 0.16), "large": (0.24, 0.28)}
NUMBERS = ("one", "two", "three")
MAX_SHAPES = 3
CAPTIONS_PER_IMAGE = 5
# Below this many images, extra threads save nothing worth having.
_PARALLEL_FROM = 256


@dataclasses.dataclass(frozen=True)
class Shape:
    """One drawn shape; `box` = (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

    kind: str
    colour: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """One image: its file name, background and shapes (left to right)."""

    name: str
    background: str
    shapes: tuple[Shape, ...]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Scene:
        data = json.loads(line)
        shapes = tuple(Shape(**{**s, "box": tuple(s["box"])}) for s in data["shapes"])
        return cls(data["name"], data["background"], shapes)


def image_name(index: int, images: int) -> str:
    """`000042.png`: zero-padded to six digits (more when the set is larger)."""
    return f"{index:0{max(6, len(str(images - 1)))}d}.png"


def make_scene(seed: int, index: int, name: str, size: int = 224) -> Scene:
    """The scene of image `index` of the set with `seed`; depends on nothing else."""
    rng = random.Random(f"lensjax-synthetic/{seed}/{index}")
    background = rng.choice(tuple(BACKGROUNDS))
    count = rng.randint(1, MAX_SHAPES)
    band = size / count
    shapes = []
    for i in range(count):
        label = rng.choice(tuple(SIZES))
        low, high = SIZES[label]
        side = max(4, round(rng.uniform(low, high) * size))
        margin = max(1, size // 56)
        x_lo = round(i * band) + margin
        x_hi = round((i + 1) * band) - margin - side
        x0 = rng.randint(x_lo, max(x_lo, x_hi))
        y0 = rng.randint(margin, size - margin - side)
        shapes.append(
            Shape(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), label,
                  (x0, y0, x0 + side, y0 + side))
        )
    return Scene(name, background, tuple(shapes))


def describe(scene: Scene) -> list[str]:
    """The five captions of a scene (templates over the shapes, left to right)."""
    shapes = scene.shapes
    phrases = [s.phrase for s in shapes]
    background = f"a {scene.background} background"
    listed = _list(phrases)
    if len(shapes) == 1:
        first = f"{phrases[0]} on {background}"
        mirrored = f"a single {shapes[0].size} {shapes[0].colour} {shapes[0].kind}"
    elif len(shapes) == 2:
        first = f"{phrases[0]} to the left of {phrases[1]}"
        mirrored = f"{phrases[1]} to the right of {phrases[0]}"
    else:
        first = f"{listed} from left to right"
        mirrored = f"{_list(phrases[::-1])} from right to left"
    noun = "shape" if len(shapes) == 1 else "shapes"
    captions = [
        first,
        f"there is {listed} on {background}",
        mirrored,
        f"{NUMBERS[len(shapes) - 1]} {noun} on {background} , {listed}",
        f"{background} with {listed}",
    ]
    return [c + " ." for c in captions]


def _list(phrases: Sequence[str]) -> str:
    """"a", "a and b", "a , b and c"."""
    if len(phrases) == 1:
        return phrases[0]
    return " , ".join(phrases[:-1]) + " and " + phrases[-1]


def draw(scene: Scene, size: int = 224, seed: int = 0, index: int = 0) -> Image.Image:
    """Render a scene: background with a faint gradient, shapes in slightly varied colours."""
    rng = random.Random(f"lensjax-synthetic-pixels/{seed}/{index}")
    base = np.array(BACKGROUNDS[scene.background], np.float32) + rng.uniform(-10, 10)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32) * rng.uniform(-12, 12)
    rows = np.clip(base[None, :] + ramp[:, None], 0, 255).round().astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(np.broadcast_to(rows[:, None], (size, size, 3))))
    pen = ImageDraw.Draw(image)
    for shape in scene.shapes:
        colour = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[shape.colour])
        _draw_shape(pen, shape, colour)
    return image


def _draw_shape(pen: ImageDraw.ImageDraw, shape: Shape, fill: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = shape.box
    last = (x1 - 1, y1 - 1)
    if shape.kind == "circle":
        pen.ellipse((x0, y0, *last), fill=fill)
    elif shape.kind == "square":
        pen.rectangle((x0, y0, *last), fill=fill)
    elif shape.kind == "triangle":
        pen.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    elif shape.kind == "star":
        cx, cy, r = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0 - 1) / 2
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = np.pi * k / 5 - np.pi / 2
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        pen.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape.kind!r}; expected one of {SHAPES}")


def _render(job: tuple[Path, int, int, int, int]) -> tuple[str, str]:
    """Draw and save image `index`; -> (scene as JSON, its caption rows)."""
    image_dir, seed, index, images, size = job
    scene = make_scene(seed, index, image_name(index, images), size)
    path = image_dir / scene.name
    tmp = path.with_name(f".{scene.name}.tmp")
    draw(scene, size, seed, index).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)
    rows = "".join(f"{scene.name}| {i}| {c}\n" for i, c in enumerate(describe(scene)))
    return scene.to_json(), rows


def generate(
    out_dir: str | os.PathLike,
    images: int = 5000,
    seed: int = 0,
    size: int = 224,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write a synthetic set to `out_dir`; returns the path of its `captions.txt`.

    Overwrites the files it owns (`images/NNNNNN.png`, `captions.txt`, `scenes.jsonl`) and
    removes older `images/NNNNNN.png` that the new set does not have; `captions.txt` is
    written last (via a temporary file), so a set with one is complete. `workers`: threads
    to draw with (None: one per CPU up to 4; one for small sets).
    """
    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: exists and is not a folder")
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(image_dir, {image_name(i, images) for i in range(images)})

    if workers is None:
        workers = min(os.cpu_count() or 1, 4) if images >= _PARALLEL_FROM else 1
    jobs = [(image_dir, seed, i, images, size) for i in range(images)]
    scenes, rows = [], []
    # Threads, not processes: PIL's PNG encoder releases the GIL, and threads are safe to
    # start from a process that already runs JAX (forking one is not).
    with (
        ThreadPoolExecutor(max(1, workers)) as pool,
        tqdm(total=images, desc="synthetic images", unit="img", disable=not progress) as bar,
    ):
        for scene, row in pool.map(_render, jobs):
            scenes.append(scene)
            rows.append(row)
            bar.update()

    _write_atomic(out_dir / "scenes.jsonl", "".join(s + "\n" for s in scenes))
    captions = out_dir / "captions.txt"
    _write_atomic(captions, "image_name| comment_number| comment\n" + "".join(rows))
    return captions


def read_scenes(path: str | os.PathLike) -> list[Scene]:
    """The scenes of a set written by `generate`, in image order, from its `scenes.jsonl` or
    the set's folder. A line that is not a scene is a ValueError naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / "scenes.jsonl"
    scenes = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                scenes.append(Scene.from_json(line))
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{path}, line {number}: not a scene of the synthetic set "
                                 f"({type(error).__name__}: {error})") from None
    return scenes


def _remove_stale(image_dir: Path, keep: set[str]) -> None:
    for entry in os.listdir(image_dir):
        if re.fullmatch(r"\d{6,}\.png|\.\d{6,}\.png\.tmp", entry) and entry not in keep:
            (image_dir / entry).unlink()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lensjax.data.synthetic",
        description=(
            "Write the built-in synthetic captioning set (coloured shapes, five template "
            "captions each): OUT/images/NNNNNN.png, OUT/captions.txt in Flickr30k's "
            "'image_name| comment_number| comment' format, and OUT/scenes.jsonl. "
            "The same seed gives byte-identical files."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--images", type=int, default=5000, help="number of images (5000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (224)")
    parser.add_argument(
        "--workers", type=int, default=None, help="drawing threads (default: one per CPU, <= 4)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        captions = generate(
            args.out, args.images, args.seed, args.size, args.workers, progress=not args.quiet
        )
    except (ValueError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    print(
        f"wrote {args.images} images and {captions} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
