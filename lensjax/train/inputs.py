"""What a phase reads: caption sources split as LensToWords split them, and their image
features (a FeatureCache) or, for a phase that trains the encoder, decoded images."""

from __future__ import annotations

import argparse
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class DataPaths:
    """Where a run's captions and features (or images) are: the flags, else the phase's
    defaults. `images` is set exactly when the run reads pixels."""

    data: list[str]
    val_data: str | None
    features: list[str]
    images: str | None = None


def data_paths(args: argparse.Namespace, phase: Phase, from_pixels: bool) -> DataPaths:
    """The caption files and the feature caches (or, `from_pixels`, the image folder) `phase`
    reads, each checked to exist."""
    data, val_data, features, images = DEFAULT_DATA.get(phase.dataset, ([], None, [], None))
    paths = DataPaths(args.data or data, args.val_data or (None if args.data else val_data),
                      [] if from_pixels else args.features or features,
                      str(args.images or images) if from_pixels else None)
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
                       *([("--val-data", paths.val_data)] if paths.val_data else [])]:
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
    FeatureCache, or an ImageCache for a phase that reads pixels (`from_pixels`)."""

    train: dict[str, list[str]]
    val: dict[str, list[str]]
    cache: Any  # lensjax.data.cache.FeatureCache | lensjax.data.image_cache.ImageCache
    sources: list[str]
    from_pixels: bool = False

    @property
    def missing(self) -> str:
        """What an image without inputs lacks, for messages."""
        return ("no readable image file in --images" if self.from_pixels
                else "no features in the cache")


def _captions(paths: Sequence[str]) -> dict[str, list[str]]:
    from lensjax.data.captions import caption_source

    merged: dict[str, list[str]] = {}
    for path in paths:
        for key, caps in caption_source(path).captions.items():
            merged.setdefault(key, []).extend(caps)
    return merged


def _feature_cache(folders: Sequence[str]):
    from lensjax.data.cache import SHARD_PREFIX, FeatureCache

    if len(folders) == 1:
        return FeatureCache(folders[0])
    return FeatureCache([s for f in folders for s in sorted(Path(f).glob(SHARD_PREFIX + "*"))])


def load_data(paths: DataPaths, settings: Settings) -> Data:
    """Captions and features (or decoded images), split as LensToWords split them."""
    from lensjax.data.captions import coco_subset, seed_split

    captions = _captions(paths.data)
    if paths.val_data is not None:
        train, val = captions, _captions([paths.val_data])
    else:
        train_keys, val_keys = seed_split(list(captions), seed=42, train_frac=0.9)
        train = {k: captions[k] for k in train_keys}
        val = {k: captions[k] for k in val_keys}
    if settings.subset is not None and settings.subset < len(train):
        train = {k: train[k] for k in coco_subset(list(train), settings.subset,
                                                    seed=settings.seed)}
    sources = [*paths.data, *([paths.val_data] if paths.val_data else [])]
    if paths.images is None:
        return Data(train, val, _feature_cache(paths.features), sources)
    from lensjax.data.image_cache import ImageCache

    cache = ImageCache(paths.images, [*train, *val], settings.image_size)
    for problem in cache.problems[:3]:
        say(f"skipped: {problem}")
    say(f"{len(cache)} images decoded and kept in memory: {cache.nbytes / 2**20:.0f} MB")
    return Data(train, val, cache, [*sources, paths.images], from_pixels=True)


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
