"""What a caption of the synthetic set gets right, scored against the scene it describes.

BLEU is lenient on five templated references: a caption that names the wrong shape in the
right template still shares most n-grams. These scores read the caption back into a scene and
compare it with `scenes.jsonl` (written by `lensjax.data.synthetic`):

- **triple F1**: the (size, colour, kind) triples the caption names, as a multiset, against
  the scene's; F1 of that image (0 when it names none), mean over images;
- **exact sets**: the share of images whose named triples equal the scene's exactly;
- **count**: the share of images whose number of named shapes is the scene's;
- **background**: of the images whose caption names a background colour, the share that names
  the right one (`background_named` says how many name one).

A shape phrase is an optional article or number word, then a size, a colour and a kind in any
order among the synthetic set's words ("a small red circle", "two large blue stars"); a plural
kind with a number word counts that many shapes. A phrase missing its size or colour still
counts as a shape but matches no triple. "N shapes" alone gives the count when no shape is
named.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Mapping

from lensjax.data.synthetic import BACKGROUNDS, COLOURS, NUMBERS, SHAPES, SIZES, Scene

Triple = tuple[str, str, str]  # (size, colour, kind)

_NUMBER = {"a": 1, "an": 1, "one": 1, "single": 1, **{w: i + 1 for i, w in enumerate(NUMBERS)}}
_KINDS = {**{k: k for k in SHAPES}, **{k + "s": k for k in SHAPES}}
_BACKGROUND_NAMES = {**{b: b for b in BACKGROUNDS}, "grey": "gray"}
_WORD = re.compile(r"[a-z]+")


@dataclasses.dataclass(frozen=True)
class NamedScene:
    """What one caption says: the triples it names (sizes or colours it leaves out are None),
    how many shapes, and the background colour (None when it names none)."""

    triples: tuple[tuple[str | None, str | None, str], ...]
    count: int
    background: str | None


def read_caption(caption: str) -> NamedScene:
    """Parse a caption in the synthetic set's vocabulary (any word order of the attributes,
    plurals, "grey" for gray); words it does not know are skipped."""
    words = _WORD.findall(caption.lower())
    triples: list[tuple[str | None, str | None, str]] = []
    background = None
    stated_count = None
    number, size, colour = 1, None, None
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        if word in _BACKGROUND_NAMES and following in ("background", "backgrounds"):
            background = _BACKGROUND_NAMES[word]
            number, size, colour = 1, None, None
        elif word in _NUMBER and following in ("shape", "shapes"):
            stated_count = _NUMBER[word]
        elif word in _NUMBER:
            number, size, colour = _NUMBER[word], None, None
        elif word in SIZES:
            size = word
        elif word in COLOURS:
            colour = word
        elif word in _KINDS:
            plural = word.endswith("s") and word not in SHAPES
            triples += [(size, colour, _KINDS[word])] * (number if plural else 1)
            number, size, colour = 1, None, None
    count = len(triples) if triples or stated_count is None else stated_count
    return NamedScene(tuple(triples), count, background)


def scene_triples(scene: Scene) -> Counter[Triple]:
    return Counter((s.size, s.colour, s.kind) for s in scene.shapes)


def triple_f1(named: Iterable[tuple[str | None, str | None, str]],
              truth: Mapping[Triple, int]) -> float:
    """F1 of the named triples (a multiset) against the true ones ({triple: how many});
    0 when none is named."""
    named, truth = Counter(named), Counter(truth)
    hits = sum((named & truth).values())
    if not hits:
        return 0.0
    precision, recall = hits / sum(named.values()), hits / sum(truth.values())
    return 2 * precision * recall / (precision + recall)


@dataclasses.dataclass(frozen=True)
class SceneScores:
    """Means over `images` captions (see the module docstring)."""

    images: int
    triple_f1: float
    exact_sets: float
    count: float
    background: float
    background_named: float

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def score_scenes(predictions: Mapping[str, str], scenes: Mapping[str, Scene]) -> SceneScores:
    """Score {image name: caption} against {image name: Scene}; images without a scene are
    an error (a caption of another set would score as wrong, silently)."""
    missing = [k for k in predictions if k not in scenes]
    if missing:
        raise ValueError(f"{len(missing)} captioned images have no scene (first: "
                         f"{missing[0]!r}): is this the scenes.jsonl of the captioned set?")
    if not predictions:
        raise ValueError("no captions to score")
    f1s, exact, count, named, right = [], 0, 0, 0, 0
    for key, caption in predictions.items():
        said, scene = read_caption(caption), scenes[key]
        truth = scene_triples(scene)
        f1s.append(triple_f1(said.triples, truth))
        exact += Counter(said.triples) == truth
        count += said.count == len(scene.shapes)
        if said.background is not None:
            named += 1
            right += said.background == scene.background
    n = len(predictions)
    return SceneScores(n, sum(f1s) / n, exact / n, count / n, right / named if named else 0.0,
                       named / n)
