"""CLIP image embeddings: lensjax's ViT-B/32 against HF transformers' `CLIPModel` with the
same random weights, float32, on this machine: (B, 224, 224, 3) preprocessed images ->
(B, 512) embeddings, what `python -m lensjax.filter` spends per image besides decoding. Each
side runs in its own process (torch's and XLA's thread pools slow each other in one), best
of the rounds after one untimed warm-up call.

    .venv/bin/python experiments/bench/clip.py [--batch 64] [--rounds 3]

Prints a human line per side and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model, timed  # noqa: E402


def _hf_model():
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"hidden_act": "quick_gelu"},
                        vision_config={"hidden_act": "quick_gelu", "patch_size": 32})
    return CLIPModel(config).eval()


def side(which: str, folder: Path, batch: int, rounds: int) -> float:
    """Best seconds per batch of image embeddings on one side."""
    images = np.random.default_rng(0).standard_normal((batch, 224, 224, 3), np.float32)
    if which == "torch":
        import torch

        model = _hf_model()
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

        def run():
            with torch.no_grad():
                model.get_image_features(pixel_values=pixels)
    else:
        from bridge.convert import import_clip_model

        model = import_clip_model(folder, preset="clip-vit-b-32")

        def run():
            model.encode_image(images).block_until_ready()
    run()
    return min(timed(run) for _ in range(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--side", choices=("torch", "lensjax"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps({"seconds": side(args.side, args.folder, args.batch, args.rounds)}))
        return
    with tempfile.TemporaryDirectory() as folder:
        _hf_model().save_pretrained(folder)  # the same weights on both sides
        results = {}
        for which in ("torch", "lensjax"):
            output = subprocess.run(
                [sys.executable, __file__, "--side", which, "--folder", folder, "--batch",
                 str(args.batch), "--rounds", str(args.rounds)],
                check=True, capture_output=True, text=True).stdout
            seconds = json.loads(output.strip().splitlines()[-1])["seconds"]
            results[which] = args.batch / seconds
            print(f"{which:8} {results[which]:7.1f} images/s (batch {args.batch})")
    ratio = results["lensjax"] / results["torch"]
    print(f"lensjax / HF CLIPModel: {ratio:.2f}x")
    print(json.dumps({"cpu": cpu_model(), "batch": args.batch,
                      "lensjax_images_per_s": results["lensjax"],
                      "torch_images_per_s": results["torch"], "ratio": ratio}))


if __name__ == "__main__":
    main()
