"""Training-step speed and memory: lensjax's phase-2d step vs a PyTorch eager reference step.

Full-size model (v3b shapes, no image encoder), batch 8, sequence 63, random weights, Adam,
the same loss (cross-entropy ignoring 50256 targets), dropout on. Each side runs in its own
subprocess so that its peak RSS is its own; steady-state steps are timed after warm-up. Also
times a phase-2c step (only the cross-attention trains) against the 2d step.

Also runs lensjax's 2d step with gradient checkpointing of the GPT-2 blocks (`remat`, the
training CLI's default at full size) in a third process.

Prints one JSON line: {"lensjax_samples_per_s", "torch_samples_per_s", "ratio",
"lensjax_peak_rss_gb", "torch_peak_rss_gb", "lensjax_2c_over_2d",
"lensjax_remat_samples_per_s", "lensjax_remat_peak_rss_gb"}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

BATCH, LENGTH, EOS = 8, 63, 50256


def _batch(numpy_module):
    rng = numpy_module.random.default_rng(0)
    features = rng.standard_normal((BATCH, 64, 768)).astype("float32")
    sequences = rng.integers(0, 50000, (BATCH, LENGTH + 1)).astype("int32")
    sequences[:, 0] = EOS
    sequences[:, 40:] = EOS
    return features, sequences[:, :-1], sequences[:, 1:], numpy_module.full(BATCH, 39, "int32")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_lensjax(steps: int, remat: bool = False) -> dict:
    import numpy as np
    from flax import nnx

    from lensjax import Captioner, CaptionerConfig
    from lensjax.params import flat_params
    from lensjax.training import Batch, Trainer

    cfg = CaptionerConfig.from_preset("v3b", encoder=None, head=None)
    params = {k: np.asarray(v) for k, v in flat_params(Captioner(cfg, rngs=nnx.Rngs(0))).items()}
    batch = Batch(*_batch(np))

    def seconds_per_step(rates: dict, params: dict) -> tuple[float, dict]:
        trainer = Trainer(cfg, rates, loss="seed", remat=remat)
        state = trainer.init(params)
        params.clear()  # a training run holds only its state, as the torch side its model
        for _ in range(2):  # compile + warm-up
            state, _ = trainer.step(state, batch)
        start = time.perf_counter()
        for _ in range(steps):
            state, _ = trainer.step(state, batch)
        return (time.perf_counter() - start) / steps, trainer.params(state)

    result = {}
    result["2d"], params = seconds_per_step(
        {k: 1e-5 for k in ("perceiver", "gpt2", "xattn", "lm")}, params)
    if not remat:
        result["2c"], _ = seconds_per_step({"xattn": 1e-4}, params)
    return {"samples_per_s": BATCH / result["2d"], "peak_rss_gb": _peak_rss_gb(),
            "step_2c_over_2d": result["2c"] / result["2d"] if "2c" in result else None}


def run_torch(steps: int) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from lensjax import CaptionerConfig
    from torch_reference import Captioner as Reference

    torch.manual_seed(0)
    model = Reference(CaptionerConfig.from_preset("v3b", encoder=None, head=None))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=EOS)
    features, inputs, targets, _ = (torch.from_numpy(x) for x in _batch(np))

    def step() -> None:
        optimizer.zero_grad()
        logits = model(features, inputs.long())
        loss_fn(logits.reshape(-1, logits.shape[-1]), targets.long().reshape(-1)).backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"samples_per_s": BATCH * steps / (time.perf_counter() - start),
            "peak_rss_gb": _peak_rss_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--side", choices=("lensjax", "lensjax-remat", "torch"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = (run_torch(args.steps) if args.side == "torch"
                  else run_lensjax(args.steps, remat=args.side == "lensjax-remat"))
        print(json.dumps(result))
        return
    sides = {}
    for side in ("lensjax", "lensjax-remat", "torch"):
        output = subprocess.run([sys.executable, __file__, "--side", side, "--steps",
                                 str(args.steps)], capture_output=True, text=True, check=True)
        sides[side] = json.loads(output.stdout.strip().splitlines()[-1])
    print(json.dumps({
        "lensjax_samples_per_s": round(sides["lensjax"]["samples_per_s"], 3),
        "torch_samples_per_s": round(sides["torch"]["samples_per_s"], 3),
        "ratio": round(sides["lensjax"]["samples_per_s"] / sides["torch"]["samples_per_s"], 2),
        "lensjax_peak_rss_gb": round(sides["lensjax"]["peak_rss_gb"], 2),
        "torch_peak_rss_gb": round(sides["torch"]["peak_rss_gb"], 2),
        "lensjax_2c_over_2d": round(sides["lensjax"]["step_2c_over_2d"], 2),
        "lensjax_remat_samples_per_s": round(sides["lensjax-remat"]["samples_per_s"], 3),
        "lensjax_remat_peak_rss_gb": round(sides["lensjax-remat"]["peak_rss_gb"], 2),
    }))


if __name__ == "__main__":
    main()
