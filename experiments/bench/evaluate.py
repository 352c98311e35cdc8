"""Scoring speed: LensToWords' BLEU-4 and the COCO metrics on 5,000 images x 5 references.

Captions come from the built-in synthetic data set's generator (real sentences, a small
vocabulary); the prediction of each image is one of its own captions with a word dropped.
Prints one JSON line with the wall time of each protocol.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from lensjax.data.captions import load_flickr30k
from lensjax.data.synthetic import generate
from lensjax.evaluate import coco_metrics, seed_bleu4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        references = load_flickr30k(generate(Path(folder), images=args.images, seed=0,
                                             size=32, progress=False))
    rng = random.Random(0)
    predictions = {}
    for key, captions in references.items():
        words = rng.choice(captions).split()
        del words[rng.randrange(len(words))]
        predictions[key] = " ".join(words)
    start = time.perf_counter()
    bleu = seed_bleu4(predictions, references)
    seed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    coco = coco_metrics(predictions, references)
    coco_seconds = time.perf_counter() - start
    print(json.dumps({"images": len(references), "references_per_image": 5,
                      "lenstowords_bleu4": round(bleu, 4), "lenstowords_seconds":
                      round(seed_seconds, 2), "coco_bleu4": round(coco["BLEU-4"], 4),
                      "coco_seconds": round(coco_seconds, 2), "coco_metrics": sorted(coco)}))


if __name__ == "__main__":
    main()
