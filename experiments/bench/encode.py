"""Image encoding speed: lensjax's ConvNeXt-Tiny + multi-scale head against the original's
PyTorch modules (timm `convnext_tiny(features_only=True, out_indices=(1, 2, 3))` + the head),
same random weights, same machine, one process each side in turn.

What it times is what `python -m lensjax.extract` and captioning image files spend per image
besides decoding: (B, 224, 224, 3) normalised images -> (B, 64, 768) features, float32, after
one untimed warm-up call. Also a training step of the encoder (forward and backward through
the ConvNeXt and the head) at the batch given, on both sides.

    .venv/bin/python experiments/bench/encode.py [--batch 8] [--rounds 3]

Prints a human line per figure and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from machine import cpu_model, timed  # noqa: E402


def _best(function, rounds: int) -> float:
    function()  # warm-up (compiles on the JAX side)
    return min(timed(function) for _ in range(rounds))


class _Encoder:
    """The v3b encoder and head, random weights: a module with `encode`, and its params."""

    def __init__(self):
        from flax import nnx

        from lensjax.models.convnext import ConvNeXt, MultiScaleHead
        from lensjax.models.v3b.captioner import CaptionerConfig
        from lensjax.params import flat_params

        cfg = CaptionerConfig.from_preset("v3b")

        class Encoder(nnx.Module):
            def __init__(self, rngs: nnx.Rngs):
                self.encoder = ConvNeXt(cfg.encoder, rngs=rngs)
                self.encoder_head = MultiScaleHead(cfg.head, rngs=rngs)

            def __call__(self, images):
                return self.encoder_head(self.encoder(images))

        self.module = Encoder(nnx.Rngs(0))
        self.params = {k: np.asarray(v) for k, v in flat_params(self.module).items()}


def lensjax_side(encoder: _Encoder, images: np.ndarray, rounds: int) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) of the lensjax encoder and head."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    x = jnp.asarray(images)
    encode = nnx.jit(lambda m, x: m(x))
    grad = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))
    model = encoder.module
    forward = _best(lambda: jax.block_until_ready(encode(model, x)), rounds)
    backward = _best(lambda: jax.block_until_ready(grad(model, x)), rounds)
    return forward, backward


def torch_side(encoder: _Encoder, images: np.ndarray, rounds: int
               ) -> tuple[float, float, np.ndarray]:
    """(forward seconds, forward+backward seconds, features) of timm's ConvNeXt-Tiny and the
    original's head, holding the same weights (through the bridge's export tables)."""
    import timm
    import torch

    from bridge.convert import flax_to_torch
    from bridge.tables import CONVNEXT_TIMM, HEAD_LENSJAX
    from lensjax.models.v3b.captioner import CaptionerConfig
    from torch_reference import Head

    backbone = timm.create_model("convnext_tiny", pretrained=False, features_only=True,
                                 out_indices=(1, 2, 3)).eval()
    head = Head(CaptionerConfig.from_preset("v3b")).eval()
    for module, table in ((backbone, CONVNEXT_TIMM), (head, HEAD_LENSJAX)):
        state = flax_to_torch(table, encoder.params)
        module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():  # the two sides hold the same weights: same features
        expected = head(backbone(x)).numpy()

    def forward():
        with torch.no_grad():
            head(backbone(x))

    def backward():
        backbone.zero_grad()
        head.zero_grad()
        (head(backbone(x)) ** 2).sum().backward()

    return _best(forward, rounds), _best(backward, rounds), expected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    images = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3),
                                                      dtype=np.float32)
    encoder = _Encoder()
    torch_fwd, torch_bwd, expected = torch_side(encoder, images, args.rounds)
    jax_fwd, jax_bwd = lensjax_side(encoder, images, args.rounds)
    import jax
    from flax import nnx

    with jax.default_matmul_precision("highest"):
        features = np.asarray(nnx.jit(lambda m, x: m(x))(encoder.module, images))
    report = {
        "cpu": cpu_model(), "batch": args.batch,
        "lensjax_encode_images_per_s": args.batch / jax_fwd,
        "torch_encode_images_per_s": args.batch / torch_fwd,
        "encode_vs_torch": torch_fwd / jax_fwd,
        "lensjax_train_images_per_s": args.batch / jax_bwd,
        "torch_train_images_per_s": args.batch / torch_bwd,
        "train_vs_torch": torch_bwd / jax_bwd,
        "max_abs_difference": float(np.abs(features - expected).max()),
    }
    print(f"{report['cpu']}, batch {args.batch}, 224x224, ConvNeXt-Tiny + head, float32")
    print(f"encode:  lensjax {report['lensjax_encode_images_per_s']:.1f} images/s, "
          f"PyTorch {report['torch_encode_images_per_s']:.1f} "
          f"({report['encode_vs_torch']:.2f}x)")
    print(f"forward+backward: lensjax {report['lensjax_train_images_per_s']:.1f} images/s, "
          f"PyTorch {report['torch_train_images_per_s']:.1f} ({report['train_vs_torch']:.2f}x)")
    print(f"largest difference of the features: {report['max_abs_difference']:.2e}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
