"""`make demo`: a random-weight tiny model through the bridge and back.

Builds a tiny LensToWords model with random weights, saves it as a lensjax checkpoint,
exports it as the original's PyTorch files, imports those again, and checks that the
re-imported model gives the same logits. (The phase-training demo replaces this later.)
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
from flax import nnx

from bridge import export_files, import_model
from lensjax import Captioner, CaptionerConfig, CaptionModel, load_pretrained

OUT = Path("demo_out")


def main() -> int:
    start = time.time()
    shutil.rmtree(OUT, ignore_errors=True)
    cfg = CaptionerConfig.from_preset("tiny")
    model = CaptionModel(Captioner(cfg, rngs=nnx.Rngs(0)), {"provenance": {"created_by": "demo"}})
    n_params = sum(int(np.prod(v.shape)) for v in model.params.values())
    print(f"1. built a random tiny captioner: {n_params:,} parameters (preset {cfg.preset!r})")

    model.save(OUT / "checkpoint")
    print(f"2. saved it as a lensjax checkpoint: {OUT / 'checkpoint'}")

    written = export_files(OUT / "checkpoint", OUT / "pytorch")
    print("3. exported the original's PyTorch files:")
    for component, path in written.items():
        print(f"     {component:16s} {path}")

    reimported = import_model(
        perceiver=written["perceiver"],
        gpt2_blocks=written["gpt2_blocks"],
        cross_attention=written["cross_attention"],
        gpt2=written["gpt2"].parent,
        encoder=written["encoder"],
        encoder_head=written["encoder_head"],
        preset="tiny",
    )
    print("4. imported those files back through the bridge")

    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 224, 224, 3), dtype=np.float32)
    ids = rng.integers(0, cfg.gpt2.vocab_size, (2, 12))
    features = model.encode(images)
    before = np.asarray(model.logits(features, ids))
    after = np.asarray(reimported.logits(reimported.encode(images), ids))
    reloaded = np.asarray(load_pretrained(OUT / "checkpoint").logits(features, ids))
    diff = float(np.abs(before - after).max())
    print(f"5. features {tuple(features.shape)}, logits {tuple(before.shape)}; "
          f"max |original - round trip| = {diff:.3g}")
    ok = diff == 0.0 and np.array_equal(before, reloaded)
    print(f"demo {'passed' if ok else 'FAILED'} in {time.time() - start:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
