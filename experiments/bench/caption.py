"""Caption decoding speed: LensToWords' loop vs HF `generate` vs lensjax, one run, one machine.

Full-size model (v3b shapes), random weights, every caption forced to exactly `--tokens` new
tokens (min = max), fp32. Reported per method: captions/s in steady state (compile and warm-up
excluded, compile time reported on its own) and, for lensjax, achieved GFLOP/s as a share of
this machine's measured fp32 matmul peak.

- seed: LensToWords' way: PyTorch, one image at a time, the whole prefix re-run each step,
  top-k 20 at temperature 0.7 (the reference model of the parity tests).
- hf: `GPT2LMHeadModel(GPT2Config(add_cross_attention=True)).generate(encoder_hidden_states=
  latents)`: top-k at batch 32, beam 5 at batch 8 (KV-cached, what a user would pick). The
  latents come from the same PyTorch Perceiver on the same features, timed with it, so every
  method does the same work: image features in, captions out.
- lensjax: `CaptionModel.generate` with the same settings.

Prints a table and one JSON line; `--skip-seed` / `--skip-hf` drop the slow references.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from lensjax import Captioner, CaptionerConfig, CaptionModel  # noqa: E402
from torch_reference import reference_model  # noqa: E402

EOS = 50256


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of an n^3 JAX matmul on this machine."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = min(_timed(lambda: matmul(a, a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def decode_flops(cfg: CaptionerConfig, rows: int, tokens: int) -> float:
    """Matmul FLOPs of decoding `tokens` tokens for `rows` rows with a KV cache (BOS step
    included), ignoring the small attention-score and Perceiver terms."""
    g = cfg.gpt2
    per_token = g.n_layer * (12 + 2) * g.n_embd**2 + g.n_embd * g.vocab_size
    return 2.0 * per_token * rows * (tokens + 1)


def bench_lensjax(model: CaptionModel, features: np.ndarray, tokens: int, method: str,
                  batch: int, width: int) -> dict:
    options = dict(method=method, max_new_tokens=tokens, min_new_tokens=tokens, top_k=20,
                   temperature=0.7, beam_width=width, retry=False, batch_size=batch)
    compile_s = _timed(lambda: model.generate(features[:batch], **options))
    runs = max(1, len(features) // batch)
    seconds = _timed(lambda: model.generate(features[: runs * batch], **options))
    return {"captions_per_s": runs * batch / seconds, "compile_s": compile_s - seconds / runs,
            "seconds": seconds, "captions": runs * batch}


def bench_hf(perceiver: torch.nn.Module, features: np.ndarray, tokens: int, method: str,
             batch: int, width: int) -> dict:
    config = GPT2Config(add_cross_attention=True)
    model = GPT2LMHeadModel(config).eval()
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=EOS)
    if method == "beam":
        kwargs.update(num_beams=width, do_sample=False, early_stopping=False)
    else:
        kwargs.update(do_sample=True, top_k=20, temperature=0.7)

    feats = torch.from_numpy(features)

    def run(rows: torch.Tensor) -> None:
        with torch.no_grad():
            model.generate(input_ids=torch.full((len(rows), 1), EOS),
                           encoder_hidden_states=perceiver(rows), **kwargs)

    run(feats[:batch])  # warm-up
    runs = max(1, len(feats) // batch)
    seconds = sum(_timed(lambda i=i: run(feats[i * batch : (i + 1) * batch]))
                  for i in range(runs))
    return {"captions_per_s": runs * batch / seconds, "seconds": seconds,
            "captions": runs * batch}


def bench_seed(model: torch.nn.Module, features: np.ndarray, tokens: int) -> dict:
    """LensToWords' generate_caption: one image, the whole prefix re-run per step, top-k 20."""
    feats = torch.from_numpy(features)

    def caption(row: torch.Tensor) -> None:
        ids = torch.tensor([[EOS]])
        with torch.no_grad():
            for _ in range(tokens):
                logits = model(row[None], ids)[0, -1]
                values, indices = torch.topk(logits, 20)
                probs = torch.softmax(values / 0.7, dim=-1)
                token = indices[torch.multinomial(probs, 1)]
                ids = torch.cat([ids, token[None]], dim=1)

    caption(feats[0])  # warm-up
    seconds = sum(_timed(lambda r=r: caption(r)) for r in feats)
    return {"captions_per_s": len(feats) / seconds, "seconds": seconds, "captions": len(feats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--images", type=int, default=64, help="images for batched methods")
    parser.add_argument("--seed-images", type=int, default=4, help="images for the seed's way")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = CaptionerConfig.from_preset("v3b", encoder=None, head=None)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((args.images, 64, 768)).astype(np.float32)
    peak = matmul_peak_gflops()
    model = CaptionModel(Captioner(cfg, rngs=nnx.Rngs(0)))
    reference = reference_model(CaptionerConfig.from_preset(cfg.preset))
    results: dict[str, dict] = {}
    for name, method, batch, width in (("topk_b32", "topk", 32, 5), ("beam5_b8", "beam", 8, 5)):
        result = bench_lensjax(model, features, args.tokens, method, batch, width)
        rows = batch * (width if method == "beam" else 1)
        flops = decode_flops(cfg, rows, args.tokens) * result["captions"] / batch
        result["gflops"] = flops / result["seconds"] / 1e9
        result["share_of_peak"] = result["gflops"] / peak
        results[f"lensjax_{name}"] = result
        if not args.skip_hf:
            results[f"hf_{name}"] = bench_hf(reference.perceiver, features, args.tokens, method,
                                             batch, width)
    if not args.skip_seed:
        results["seed_topk_b1"] = bench_seed(reference, features[: args.seed_images],
                                             args.tokens)

    summary = {"matmul_peak_gflops": round(peak, 1), "tokens": args.tokens,
               "device": jax.devices()[0].device_kind}
    for key, value in results.items():
        summary[f"{key}_captions_per_s"] = round(value["captions_per_s"], 3)
    if "hf_topk_b32" in results:
        summary["topk_vs_hf"] = round(results["lensjax_topk_b32"]["captions_per_s"]
                                      / results["hf_topk_b32"]["captions_per_s"], 2)
        summary["beam_vs_hf"] = round(results["lensjax_beam5_b8"]["captions_per_s"]
                                      / results["hf_beam5_b8"]["captions_per_s"], 2)
    if "seed_topk_b1" in results:
        summary["topk_vs_seed"] = round(results["lensjax_topk_b32"]["captions_per_s"]
                                        / results["seed_topk_b1"]["captions_per_s"], 1)
    for key in ("lensjax_topk_b32", "lensjax_beam5_b8"):
        summary[f"{key}_compile_s"] = round(results[key]["compile_s"], 1)
        summary[f"{key}_share_of_peak"] = round(results[key]["share_of_peak"], 3)
    for key, value in results.items():
        print(f"{key:22s} {value['captions_per_s']:8.2f} captions/s"
              + (f"  ({value['gflops']:.0f} GFLOP/s, {value['share_of_peak']:.0%} of the "
                 f"{peak:.0f} GFLOP/s matmul peak; compile {value['compile_s']:.1f}s)"
                 if "gflops" in value else ""))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
