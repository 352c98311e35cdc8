"""Training-step speed and memory: lensjax's phase-2d step vs a PyTorch eager reference step.

Full-size model (v3b shapes, no image encoder; `--preset tiny` for a smoke run), batch 8,
sequence 63 (LensToWords pads every caption to 64 tokens) holding 39-token captions, random
weights, Adam, the same loss (cross-entropy ignoring 50256 targets), dropout on. Each side runs
in its own subprocess so that its peak RSS is its own; steady-state steps are timed after
warm-up. A side that runs past `--side-timeout` is reported as slower than the bound that
implies (`<key>_samples_per_s_below`).

Sides:
- `lensjax`: the 2d step `python -m lensjax.train` runs (float32), and the phase-2c step (only
  the cross-attention trains) in the same process, for the 2c/2d ratio. Its steps cut the
  padding no loss term reads (`lensjax.train.step.trim_padding`: 40 of the 63 positions here);
- `lensjax-untrimmed`: the same step on captions that fill all 63 positions, so that nothing
  can be cut: the same work as the torch side (`untrimmed_ratio`);
- `lensjax-remat`: the 2d step with gradient checkpointing of the GPT-2 blocks;
- `lensjax-bf16`: the 2d step with `--dtype bfloat16` (bfloat16 compute, float32 masters);
- `torch`: PyTorch eager (transformers GPT-2 blocks + `nn.MultiheadAttention`), float32;
- `torch-bf16`: the same under `torch.autocast("cpu", dtype=torch.bfloat16)`;
- `torch-compile`: the float32 step with `torch.compile` (a stronger peer, for the record; it
  needs a C++ compiler and is reported as an error where it does not run).

Prints one JSON line with `ratio` (lensjax / torch, float32), `bf16_ratio` (lensjax bf16 / torch
bf16), `untrimmed_ratio`, samples/s and peak RSS of every side, `lensjax_2c_over_2d` and
`cpu`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model  # noqa: E402

BATCH, LENGTH, EOS = 8, 63, 50256
SIDES = ("lensjax", "lensjax-untrimmed", "lensjax-remat", "lensjax-bf16", "torch", "torch-bf16",
         "torch-compile")
WARM_UP = 2


def _config(preset: str):
    from lensjax import CaptionerConfig

    return CaptionerConfig.from_preset(preset, encoder=None, head=None)


def _batch(numpy_module, batch: int, feature_dim: int, caption: int = 39):
    """features (B, 64, D), inputs and targets (B, 63): BOS, `caption` tokens, EOS padding."""
    rng = numpy_module.random.default_rng(0)
    features = rng.standard_normal((batch, 64, feature_dim)).astype("float32")
    sequences = rng.integers(0, 50000, (batch, LENGTH + 1)).astype("int32")
    sequences[:, 0] = EOS
    sequences[:, 1 + caption:] = EOS
    return (features, sequences[:, :-1], sequences[:, 1:],
            numpy_module.full(batch, caption, "int32"))


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_lensjax(steps: int, batch_size: int, preset: str, remat: bool = False,
                dtype: str = "float32", caption: int = 39) -> dict:
    import numpy as np

    from lensjax.params import abstract_params
    from lensjax.train.step import Batch, Trainer

    cfg = _config(preset)
    rng = np.random.default_rng(0)
    params = {p: rng.standard_normal(s.shape, np.float32) * 0.02
              for p, s in abstract_params(cfg).items()}
    batch = Batch(*_batch(np, batch_size, cfg.feature_dim, caption))

    def seconds_per_step(rates: dict, params: dict) -> tuple[float, dict]:
        trainer = Trainer(cfg, rates, loss="seed", remat=remat, dtype=dtype)
        state = trainer.init(params)
        params.clear()  # a training run holds only its state, as the torch side its model
        for _ in range(WARM_UP):  # compile + warm-up
            state, _ = trainer.step(state, batch)
        start = time.perf_counter()
        for _ in range(steps):
            state, _ = trainer.step(state, batch)
        return (time.perf_counter() - start) / steps, trainer.params(state)

    result = {}
    result["2d"], params = seconds_per_step(
        {k: 1e-5 for k in ("perceiver", "gpt2", "xattn", "lm")}, params)
    if not remat and dtype == "float32" and caption < LENGTH:
        result["2c"], _ = seconds_per_step({"xattn": 1e-4}, params)
    return {"samples_per_s": batch_size / result["2d"], "peak_rss_gb": _peak_rss_gb(),
            "step_2c_over_2d": result["2c"] / result["2d"] if "2c" in result else None}


def run_torch(steps: int, batch_size: int, preset: str, mode: str = "eager",
              device: str = "cpu") -> dict:
    import contextlib

    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from torch_reference import Captioner as Reference

    torch.manual_seed(0)
    cfg = _config(preset)
    model = Reference(cfg).to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=EOS)
    features, inputs, targets, _ = (torch.from_numpy(x).to(device)
                                    for x in _batch(np, batch_size, cfg.feature_dim))
    forward = torch.compile(model) if mode == "compile" else model
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if mode == "bf16"
                else contextlib.nullcontext())

    def step() -> None:
        optimizer.zero_grad()
        with autocast:
            logits = forward(features, inputs.long())
            loss = loss_fn(logits.float().reshape(-1, logits.shape[-1]),
                           targets.long().reshape(-1))
        loss.backward()
        optimizer.step()

    def synchronize() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    for _ in range(WARM_UP):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return {"samples_per_s": batch_size * steps / (time.perf_counter() - start),
            "peak_rss_gb": _peak_rss_gb()}


def run_side(side: str, args: argparse.Namespace) -> dict:
    if side.startswith("torch"):
        mode = {"torch": "eager", "torch-bf16": "bf16", "torch-compile": "compile"}[side]
        return run_torch(args.steps, args.batch_size, args.preset, mode, args.torch_device)
    return run_lensjax(args.steps, args.batch_size, args.preset,
                       remat=side == "lensjax-remat",
                       dtype="bfloat16" if side == "lensjax-bf16" else "float32",
                       caption=LENGTH if side == "lensjax-untrimmed" else 39)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--sides", nargs="*", choices=SIDES, default=list(SIDES))
    parser.add_argument("--preset", default="v3b", help="model shape (tiny for a smoke run)")
    parser.add_argument("--torch-device", default="cpu", help="cpu or cuda (the torch sides)")
    parser.add_argument("--side-timeout", type=float, default=900,
                        help="seconds one side may run (torch's bfloat16 autocast takes many "
                        "minutes a step on a CPU without bfloat16 units; default 900)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return
    sides = {}
    for side in args.sides:
        try:
            output = subprocess.run([sys.executable, __file__, "--side", side, "--steps",
                                     str(args.steps), "--batch-size", str(args.batch_size),
                                     "--preset", args.preset, "--torch-device",
                                     args.torch_device],
                                    capture_output=True, text=True, timeout=args.side_timeout)
        except subprocess.TimeoutExpired:
            # Fewer than WARM_UP + steps steps ran in side_timeout seconds.
            bound = args.batch_size * (WARM_UP + args.steps) / args.side_timeout
            sides[side] = {"samples_per_s_below": bound}
            print(f"{side}: stopped after {args.side_timeout:g} s: below {bound:.3f} samples/s",
                  file=sys.stderr, flush=True)
            continue
        if output.returncode:
            error = (output.stderr.strip().splitlines() or ["failed"])[-1]
            sides[side] = {"error": error[:300]}
            print(f"{side}: failed: {error[:300]}", file=sys.stderr)
            continue
        sides[side] = json.loads(output.stdout.strip().splitlines()[-1])
        print(f"{side:18s} {sides[side]['samples_per_s']:7.3f} samples/s  "
              f"peak RSS {sides[side]['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
    summary: dict = {"cpu": cpu_model(), "batch": args.batch_size, "preset": args.preset,
                     "torch_device": args.torch_device}
    for side, result in sides.items():
        key = side.replace("-", "_")
        if "error" in result:
            summary[f"{key}_error"] = result["error"]
            continue
        if "samples_per_s_below" in result:
            summary[f"{key}_samples_per_s_below"] = round(result["samples_per_s_below"], 4)
            continue
        summary[f"{key}_samples_per_s"] = round(result["samples_per_s"], 3)
        summary[f"{key}_peak_rss_gb"] = round(result["peak_rss_gb"], 2)

    def ratio(a: str, b: str) -> float | None:
        if f"{a}_samples_per_s" in summary and f"{b}_samples_per_s" in summary:
            return round(summary[f"{a}_samples_per_s"] / summary[f"{b}_samples_per_s"], 2)
        return None

    summary["ratio"] = ratio("lensjax", "torch")
    summary["untrimmed_ratio"] = ratio("lensjax_untrimmed", "torch")
    summary["bf16_ratio"] = ratio("lensjax_bf16", "torch_bf16")
    if "torch_bf16_samples_per_s_below" in summary and "lensjax_bf16_samples_per_s" in summary:
        summary["bf16_ratio_above"] = round(summary["lensjax_bf16_samples_per_s"]
                                            / summary["torch_bf16_samples_per_s_below"], 1)
    summary["compile_ratio"] = ratio("lensjax", "torch_compile")
    if "lensjax" in sides and sides["lensjax"].get("step_2c_over_2d"):
        summary["lensjax_2c_over_2d"] = round(sides["lensjax"]["step_2c_over_2d"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
