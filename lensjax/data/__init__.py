"""Data: GPT-2 tokenizer, caption sources, the LMDB feature cache, images, batching.

    from lensjax.data import GPT2Tokenizer, FeatureCache, load_flickr30k, seed_split
    tok = GPT2Tokenizer()                         # offline: GPT-2's own BPE files
    cache = FeatureCache("features/flickr")       # LensToWords' LMDB shards, read as they are
    caps = load_flickr30k("captions.txt")         # {file name: [5 captions]}
    train, val = seed_split(list(caps), seed=42, train_frac=0.9)
"""

from lensjax.data.cache import FeatureCache
from lensjax.data.captions import (
    coco_subset,
    load_coco,
    load_flickr30k,
    load_instagram,
    load_karpathy,
    load_tfds_coco,
    seed_split,
)
from lensjax.data.tokenizer import GPT2Tokenizer

__all__ = [
    "FeatureCache",
    "GPT2Tokenizer",
    "coco_subset",
    "load_coco",
    "load_flickr30k",
    "load_instagram",
    "load_karpathy",
    "load_tfds_coco",
    "seed_split",
]
