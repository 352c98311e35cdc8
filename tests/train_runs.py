"""What the training CLI tests share: a small synthetic run folder's data and the flags and
metrics of a run."""

import json
import os
from pathlib import Path

import numpy as np

from lensjax import CaptionerConfig
from lensjax.data.cache import FeatureCache
from lensjax.data.synthetic import generate

DEMO = CaptionerConfig.from_preset("demo")


def run_data(root: Path) -> dict:
    """40 synthetic images' captions under `root` with random (64, 48) features in a cache."""
    captions = generate(root / "shapes", images=40, seed=0, progress=False)
    rng = np.random.default_rng(0)
    with FeatureCache.create(root / "features", 2, shape=(64, DEMO.feature_dim)) as writer:
        for name in sorted(os.listdir(root / "shapes" / "images")):
            writer.put(name, rng.standard_normal((64, DEMO.feature_dim)).astype(np.float16))
    return {"captions": captions, "features": root / "features", "root": root}


def args(data: dict, phase: str, out: Path, *extra: str) -> list[str]:
    """A phase on `data`'s features at batch 8, captions up to 16 tokens, no progress bar."""
    return ["--phase", phase, "--data", str(data["captions"]), "--features",
            str(data["features"]), "--out", str(out), "--batch-size", "8", "--max-len", "16",
            "--quiet", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    """{step: training loss} of a run folder's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r}
