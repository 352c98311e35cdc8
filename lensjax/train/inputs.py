"""What a phase reads: caption sources split as LensToWords split them, and their image
features (a FeatureCache) or, for a phase that trains the encoder, decoded images."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lensjax.phases import DATASETS, Phase
from lensjax.train.messages import TrainError, say
from lensjax.train.settings import Settings

# Default data locations per data set: (caption sources, validation source, feature caches,
# image folder).
DEFAULT_DATA: Mapping[str, tuple[list[str], str | None, list[str], str | None]] = {
    "flickr30k": (["data/flickr30k/captions.txt"], None, ["features/flickr30k"],
                  "data/flickr30k/images"),
    "coco-50k": (["data/coco/annotations/captions_train2017.json"],
                 "data/coco/annotations/captions_val2017.json", ["features/coco"], None),
    "coco": (["data/coco/annotations/captions_train2017.json"],
             "data/coco/annotations/captions_val2017.json", ["features/coco"], None),
    "synthetic": (["demo_out/shapes/captions.txt"], None, ["demo_out/features"],
                  "demo_out/shapes/images"),
}


_SOURCE_NAME = re.compile(r"^[A-Za-z][\w-]*$")


def split_source(text: str) -> tuple[str | None, str]:
    """'coco=path/x.json' -> ('coco', 'path/x.json'); a plain path (or an existing file whose
    name holds '=') -> (None, text)."""
    name, sep, path = text.partition("=")
    if sep and _SOURCE_NAME.match(name) and path and not Path(text).exists():
        return name, path
    return None, text


@dataclasses.dataclass(frozen=True)
class DataPaths:
    """Where a run's captions and features (or images) are: the flags, else the phase's
    defaults. `images` is set exactly when the run reads pixels. `names` holds each --data
    source's name (None when unnamed), `named_val` the named sources' --val-data,
    `ewc_data` the previous domain's sources (--ewc-data)."""

    data: list[str]
    val_data: list[str]
    features: list[str]
    images: str | None = None
    names: list[str | None] = dataclasses.field(default_factory=list)
    named_val: dict[str, str] = dataclasses.field(default_factory=dict)
    ewc_data: list[str] = dataclasses.field(default_factory=list)


def data_paths(args: argparse.Namespace, phase: Phase, from_pixels: bool,
               mix: Mapping[str, float] | None = None) -> DataPaths:
    """The caption files and the feature caches (or, `from_pixels`, the image folder) `phase`
    reads, each checked to exist; with `mix`, every mixed source must be a named --data
    source."""
    data, val_data, features, images = DEFAULT_DATA.get(phase.dataset, ([], None, [], None))
    named = [split_source(text) for text in args.data or data]
    val = [split_source(text) for text in args.val_data or []]
    if args.data and args.val_data is None:
        val_data = None
    paths = DataPaths([p for _, p in named],
                      [p for n, p in val if n is None] or ([val_data] if val_data else []),
                      [] if from_pixels else args.features or features,
                      str(args.images or images) if from_pixels else None,
                      names=[n for n, _ in named],
                      named_val={n: p for n, p in val if n is not None},
                      ewc_data=list(args.ewc_data or []))
    names = [n for n in paths.names if n is not None]
    if len(set(names)) != len(names):
        raise TrainError(f"--data: a source name is given twice ({', '.join(names)})")
    if paths.named_val and mix is None:
        raise TrainError("--val-data NAME=SOURCE names a mixed source: it needs --mix")
    unknown = set(paths.named_val) - set(names)
    if unknown:
        raise TrainError(f"--val-data: no --data source is named {', '.join(sorted(unknown))}")
    if mix is not None:
        if paths.val_data and args.val_data:
            raise TrainError("--mix: give each source's validation set as --val-data "
                             "NAME=SOURCE (the others are split 90/10)")
        missing = [n for n in mix if n not in names]
        if missing:
            raise TrainError(f"--mix: no --data source is named {', '.join(missing)}; name "
                             "them as NAME=PATH (named: "
                             f"{', '.join(names) or 'none'})")
        unused = [n for n in names if n not in mix]
        if unused or None in paths.names:
            raise TrainError("--mix: every --data source needs a share; none for "
                             + ", ".join(unused or ["the unnamed source(s)"]))
    # Captions given by --data need their images named too: the phase's default folder
    # belongs to its default captions.
    if from_pixels and (not paths.images or args.data and not args.images):
        raise TrainError("this phase trains the image encoder, so it reads images, not "
                         "features: give the folder that holds the captions' image files "
                         "with --images")
    if not paths.data or not (paths.features or paths.images):
        raise TrainError(f"phase {phase.name} trains on {DATASETS[phase.dataset]}: give the "
                         "caption source(s) with --data and the feature cache with --features")
    if paths.images is not None and not Path(paths.images).is_dir():
        raise TrainError(f"--images: {paths.images} "
                         + ("is a file, not a folder of images" if Path(paths.images).exists()
                            else "does not exist"))
    for flag, path in [*(("--data", p) for p in paths.data),
                       *(("--val-data", p) for p in paths.val_data),
                       *(("--val-data", p) for p in paths.named_val.values()),
                       *(("--ewc-data", p) for p in paths.ewc_data)]:
        if not Path(path).is_file():
            raise TrainError(f"{flag}: caption source {path} "
                             + ("is a folder; give a caption file" if Path(path).is_dir()
                                else "does not exist"))
    for folder in paths.features:
        if not Path(folder).is_dir():
            raise TrainError(f"--features: feature cache {folder} "
                             + ("is a file, not a cache folder" if Path(folder).exists() else
                                "does not exist; make it with `python -m lensjax.extract "
                                f"IMAGES --weights W --out {folder}`"))
    return paths


@dataclasses.dataclass
class Data:
    """Training and validation captions ({image key: [captions]}) and their inputs: a
    FeatureCache, or an ImageCache for a phase that reads pixels (`from_pixels`). With --mix,
    `parts` holds each named source's (train, val) and `train`/`val` are the target's (the
    first source's); `ewc` the previous domain's captions for the Fisher (--ewc-data)."""

    train: dict[str, list[str]]
    val: dict[str, list[str]]
    cache: Any  # lensjax.data.cache.FeatureCache | lensjax.data.image_cache.ImageCache
    sources: list[str]
    from_pixels: bool = False
    parts: dict[str, tuple[dict[str, list[str]], dict[str, list[str]]]] = dataclasses.field(
        default_factory=dict)
    ewc: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def missing(self) -> str:
        """What an image without inputs lacks, for messages."""
        return ("no readable image file in --images" if self.from_pixels
                else "no features in the cache")


def _captions(paths: Sequence[str], generation: str | None = None) -> dict[str, list[str]]:
    """The sources' captions merged by image key; with `generation` (v1, v2) cleaned and
    filtered as that generation's notebook did (`lensjax.data.word_vocab.clean_captions`)."""
    from lensjax.data.captions import caption_source
    from lensjax.data.word_vocab import clean_captions

    merged: dict[str, list[str]] = {}
    for path in paths:
        for key, caps in caption_source(path).captions.items():
            merged.setdefault(key, []).extend(caps)
    return merged if generation is None else clean_captions(merged, generation)


def _feature_cache(folders: Sequence[str]):
    from lensjax.data.cache import SHARD_PREFIX, FeatureCache

    if len(folders) == 1:
        return FeatureCache(folders[0])
    return FeatureCache([s for f in folders for s in sorted(Path(f).glob(SHARD_PREFIX + "*"))])


def _split(captions: dict[str, list[str]], val_paths: Sequence[str], split: str = "lenstowords",
           generation: str | None = None
           ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train, val): `val_paths`' captions, else a 90/10 split of the images: LensToWords'
    (`split` "lenstowords": random.seed(42)) or v1/v2's ("sklearn": train_test_split,
    random_state=42)."""
    from lensjax.data.captions import seed_split, sklearn_split

    if val_paths:
        return captions, _captions(val_paths, generation)
    if split == "sklearn":
        train_keys, val_keys = sklearn_split(list(captions), test_size=0.1, random_state=42)
    else:
        train_keys, val_keys = seed_split(list(captions), seed=42, train_frac=0.9)
    return {k: captions[k] for k in train_keys}, {k: captions[k] for k in val_keys}


def load_data(paths: DataPaths, settings: Settings, generation: str | None = None) -> Data:
    """Captions and features (or decoded images), split as the phase splits them
    (`settings.split`); with --mix, each named source on its own. `generation` (v1, v2):
    the captions cleaned and filtered as that generation did."""
    from lensjax.data.captions import coco_subset

    def split(sources: Sequence[str], val_sources: Sequence[str]):
        return _split(_captions(sources, generation), val_sources, settings.split, generation)

    parts = {}
    if settings.mix is not None:
        for name, path in zip(paths.names, paths.data, strict=True):
            named_val = paths.named_val.get(name)
            parts[name] = split([path], [named_val] if named_val else [])
        train, val = parts[next(iter(settings.mix))]
    else:
        train, val = split(paths.data, paths.val_data)
    if settings.subset is not None and settings.subset < len(train):
        train = {k: train[k] for k in coco_subset(list(train), settings.subset,
                                                    seed=settings.seed)}
        if parts:
            target = next(iter(settings.mix))
            parts[target] = (train, parts[target][1])
    ewc = _captions(paths.ewc_data, generation) if paths.ewc_data else {}
    sources = [*paths.data, *paths.val_data, *paths.named_val.values(), *paths.ewc_data]
    if paths.images is None:
        return Data(train, val, _feature_cache(paths.features), sources, parts=parts, ewc=ewc)
    from lensjax.data.image_cache import ImageCache

    every = dict.fromkeys(k for part in (train, val, ewc, *(c for p in parts.values() for c in p))
                          for k in part)
    cache = ImageCache(paths.images, list(every), settings.image_size)
    for problem in cache.problems[:3]:
        say(f"skipped: {problem}")
    say(f"{len(cache)} images decoded and kept in memory: {cache.nbytes / 2**20:.0f} MB")
    return Data(train, val, cache, [*sources, paths.images], from_pixels=True, parts=parts,
                ewc=ewc)


def usable(captions: Mapping[str, list[str]], data: Data, strict: bool, what: str, say
           ) -> list[tuple[str, str]]:
    """(key, caption) pairs with inputs; missing images are counted and skipped (or an error
    with `strict`)."""
    from lensjax.data.batching import available_pairs

    pairs, missing = available_pairs(captions, data.cache)
    if missing and strict:
        raise TrainError(f"{what}: {len(missing)} of {len(captions)} images have "
                         f"{data.missing} (first: {', '.join(missing[:5])}) (--strict)")
    if missing:
        say(f"{what}: {len(missing)} of {len(captions)} images have {data.missing} and are "
            f"skipped (first: {', '.join(missing[:3])}); --strict makes this an error")
    if not pairs:
        raise TrainError(f"{what}: no image has inputs ({data.missing} for any)")
    return pairs
