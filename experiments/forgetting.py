"""`make forgetting`: LensToWords' v3d story at small scale, and the remedies it never tried.

The original fine-tuned its COCO model on Instagram captions and lost the descriptive style
(BLEU-4 on COCO 0.1341 before phase 3b, 0.0448 after); its notebook names EWC, LoRA and
mixed batches from the start as the untried remedies. Here, offline and in minutes:

- domain A ("COCO"): the synthetic shapes set's five descriptive captions per image;
- domain B ("Instagram"): the same scenes as social photos (a white frame, a warmer tint,
  as real Instagram pictures differ from COCO's in look) with five short first-person
  captions in other words, made from the scene ("loving these two shapes on black !").

A small captioner (preset `demo`, features of a random frozen encoder, as `make demo`) is
trained on A (`--phase demo-all`, fresh), then fine-tuned on B with `--phase 3b`, the same
number of steps for each remedy: plain (the original's 3b), mixed batches from the start
(`--mix b=0.5,a=0.5`), LoRA (`--lora`, plus the embeddings, PEFT's `modules_to_save`: B's
words are new to the model, and its tied output layer cannot say them otherwise), EWC
(`--ewc`, Fisher on A) and LoRA + mixed. Every model captions the held-out images of both
domains (greedy); the scores are BLEU-4 by LensToWords' protocol and the corpus BLEU-4 on
each domain, and the scene scores of the A captions (`lensjax.scene_scores`).

Writes forgetting_out/ (runs, results.json, forgetting.png: A's BLEU-4 against B's, one
point per method). Deterministic; the last line is one JSON object:
`{"before": {"bleu_a": ..}, "methods": {"plain": {"bleu_a": .., "bleu_b": ..}, ...}}`
(corpus BLEU-4 of the held-out images of each domain).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from flax import nnx
from PIL import Image

from lensjax import Captioner, CaptionerConfig, CaptionModel, load_pretrained
from lensjax.data.cache import SHARD_PREFIX, FeatureCache
from lensjax.data.captions import load_flickr30k
from lensjax.data.synthetic import NUMBERS, Scene, generate, read_scenes
from lensjax.evaluate import corpus_bleu4, seed_bleu4
from lensjax.files import save_figure, write_text_atomic
from lensjax.scene_scores import score_scenes
from steps import run_cli

OUT = Path("forgetting_out")
SOCIAL_PREFIX = "social-"
# Fine-tuning on B: every method takes the same number of steps at batch 32. LoRA also trains
# the embeddings (`lm`): with them frozen, adapters alone plateau far above plain's loss here.
FINE_TUNE_RATES = "perceiver=1e-3,gpt2=1e-3,xattn=1e-3"
METHODS: Mapping[str, list[str]] = {
    "plain": ["--lr", FINE_TUNE_RATES],
    "mixed": ["--lr", FINE_TUNE_RATES, "--mix", "MIX"],
    "lora": ["--lora", "rank=8,alpha=16", "--lr", "lora=2e-2,lm=1e-3"],
    "ewc": ["--lr", FINE_TUNE_RATES, "--ewc", "EWC_LAMBDA", "--ewc-batches", "8"],
    "lora_mixed": ["--lora", "rank=8,alpha=16", "--lr", "lora=2e-2,lm=1e-3", "--mix", "MIX"],
}


def social_captions(scene: Scene) -> list[str]:
    """Domain B: five short first-person captions of a scene, in words domain A never uses
    (besides the colours, kinds and backgrounds)."""
    shapes, bg = scene.shapes, scene.background
    first = shapes[0]
    count = NUMBERS[len(shapes) - 1]
    these = (f"this {first.colour} {first.kind}" if len(shapes) == 1
             else f"these {count} shapes")
    listing = " and ".join(f"{s.colour} {s.kind}" for s in shapes)
    return [
        f"loving {these} on {bg} !",
        f"obsessed with my {first.colour} {first.kind} today !",
        f"{bg} vibes and {count} {'shape' if len(shapes) == 1 else 'shapes'} #{first.kind}",
        f"just my {listing} , so cute !",
        f"best {bg} day ever with {these} !",
    ]


def social_photo(image: Image.Image) -> Image.Image:
    """Domain B's look: a warm tint and a white frame around the same scene."""
    pixels = np.asarray(image.convert("RGB"), np.float32)
    pixels = pixels * np.array([1.0, 0.93, 0.8], np.float32) + np.array([20, 10, 0],
                                                                         np.float32)
    border = max(2, image.width // 12)
    framed = np.full_like(pixels, 248.0)
    framed[border:-border, border:-border] = pixels[border:-border, border:-border]
    return Image.fromarray(np.clip(framed, 0, 255).round().astype(np.uint8))


def _write_captions(path: Path, captions: Mapping[str, Sequence[str]]) -> Path:
    """Flickr30k's format, which the training CLI reads."""
    write_text_atomic(path, "image_name| comment_number| comment\n" + "".join(
        f"{key}| {i}| {text}\n" for key, texts in captions.items()
        for i, text in enumerate(texts)))
    return path


def make_domains(images: int, held_out: int) -> None:
    """OUT/shapes (domain A's images, captions and scenes), OUT/social (domain B's photos)
    and the four caption files {a,b}_{train,val}.txt; the last `held_out` scenes are held
    out in both domains."""
    captions_a = load_flickr30k(generate(OUT / "shapes", images=images, seed=1,
                                         progress=False))
    scenes = {s.name: s for s in read_scenes(OUT / "shapes")}
    (OUT / "social").mkdir()
    captions_b = {}
    for name, scene in scenes.items():
        social_photo(Image.open(OUT / "shapes" / "images" / name)).save(
            OUT / "social" / f"{SOCIAL_PREFIX}{name}")
        captions_b[f"{SOCIAL_PREFIX}{name}"] = social_captions(scene)
    names = sorted(scenes)
    held, train_names = names[-held_out:], names[:-held_out]
    for domain, captions, prefix in (("a", captions_a, ""), ("b", captions_b, SOCIAL_PREFIX)):
        for split, chosen in (("train", train_names), ("val", held)):
            _write_captions(OUT / f"{domain}_{split}.txt",
                            {prefix + n: captions[prefix + n] for n in chosen})


def extract_features() -> None:
    """OUT/features_a and OUT/features_b from a random-initialised frozen encoder (preset
    demo, as make demo), which OUT/encoder keeps."""
    from lensjax import extract

    save_random_encoder(OUT / "encoder", "make forgetting")
    for domain, folder in (("a", OUT / "shapes" / "images"), ("b", OUT / "social")):
        _cli(extract, [str(folder), "--weights", str(OUT / "encoder"), "--out",
                       str(OUT / f"features_{domain}")])


def _cli(module, argv: list[str]) -> None:
    run_cli("forgetting", module, argv)


def _captions(model: CaptionModel, cache: FeatureCache, keys: list[str]) -> dict[str, str]:
    """Greedy captions of cached features."""
    out = {}
    for start in range(0, len(keys), 64):
        chunk = keys[start : start + 64]
        tokens = model.generate(cache.get_batch(chunk).astype(np.float32), "greedy",
                                max_new_tokens=23)
        out.update({k: model.tokenizer.decode_caption(t) for k, t in zip(chunk, tokens,
                                                                          strict=True)})
    return out


def _scores(model: CaptionModel, cache: FeatureCache, held_out: Mapping[str, dict],
            scenes: Mapping[str, Scene]) -> dict[str, float]:
    """BLEU-4 (both protocols) on each domain's held-out images; scene scores of A's."""
    row: dict[str, float] = {}
    for domain, references in held_out.items():
        predictions = _captions(model, cache, list(references))
        row[f"bleu_{domain}"] = corpus_bleu4(predictions, references)[0]
        row[f"lenstowords_bleu_{domain}"] = seed_bleu4(predictions, references)
        if domain == "a":
            scene = score_scenes(predictions, {k: scenes[k] for k in references})
            row["triple_f1_a"] = scene.triple_f1
            row["sample_a"] = next(iter(predictions.values()))
        else:
            row["sample_b"] = next(iter(predictions.values()))
    return row


def _plot(results: Mapping[str, Mapping], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    before = results["before"]
    ax.axvline(before["bleu_a"], color="gray", linestyle=":", linewidth=1)
    ax.axvline(0.9 * before["bleu_a"], color="gray", linestyle="--", linewidth=1,
               label="90% of A before fine-tuning")
    if "plain" in results["methods"]:
        ax.axhline(0.9 * results["methods"]["plain"]["bleu_b"], color="gray", linestyle="-.",
                   linewidth=1, label="90% of plain fine-tuning's B")
    ax.scatter([before["bleu_a"]], [before["bleu_b"]], marker="s", color="black")
    ax.annotate("before (trained on A)", (before["bleu_a"], before["bleu_b"]),
                textcoords="offset points", xytext=(5, 5), fontsize=8)
    for name, row in results["methods"].items():
        ax.scatter([row["bleu_a"]], [row["bleu_b"]])
        ax.annotate(name, (row["bleu_a"], row["bleu_b"]), textcoords="offset points",
                    xytext=(5, -10), fontsize=9)
    ax.set(xlabel="BLEU-4 on A (descriptive, kept?)", ylabel="BLEU-4 on B (social, learned?)",
           title="fine-tuning A -> B: what each remedy keeps", xlim=(0, None), ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)


def save_random_encoder(path: Path, created_by: str) -> None:
    """The `demo` preset's ConvNeXt and head, random-initialised (seed 0), saved to `path`:
    the frozen encoder this experiment extracts features with (its measurements in
    BENCHMARKS.md were taken with it; `make demo` now pretrains its encoder instead)."""
    encoder = CaptionModel(Captioner(CaptionerConfig.from_preset("demo"), rngs=nnx.Rngs(0)),
                           {"provenance": {"created_by": created_by, "note": "random encoder"}})
    encoder.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500, help="synthetic scenes")
    parser.add_argument("--held-out", type=int, default=150,
                        help="scenes held out (captioned in both domains at the end)")
    parser.add_argument("--steps-a", type=int, default=400, help="training steps on A")
    parser.add_argument("--steps-b", type=int, default=200,
                        help="fine-tuning steps on B, every method")
    parser.add_argument("--ewc-lambda", type=float, default=30000.0,
                        help="EWC's lambda (its Fisher: 8 batches of A)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--reuse", action="store_true",
                        help="keep forgetting_out's domains, features and A model (from an "
                        "earlier run with the same --images/--held-out/--steps-a) and rerun "
                        "only the fine-tuning")
    parser.add_argument("--mix-share", type=float, default=0.5,
                        help="B's share of each mixed batch (A has the rest)")
    args = parser.parse_args(argv)
    from lensjax import train

    started = time.time()

    def step(text: str) -> None:
        print(f"\n[{time.time() - started:5.0f}s] {text}", flush=True)

    runs = OUT / "runs"
    if not args.reuse:
        shutil.rmtree(OUT, ignore_errors=True)
        step(f"two domains over {args.images} synthetic scenes")
        make_domains(args.images, args.held_out)
        step("features of both domains' images from a random-initialised frozen encoder")
        extract_features()
    elif not (runs / "a" / "best").is_dir():
        sys.exit(f"forgetting: --reuse needs an earlier run's {runs / 'a' / 'best'}")
    files = {(d, split): OUT / f"{d}_{split}.txt" for d in "ab" for split in ("train", "val")}
    held_out = {d: load_flickr30k(files[d, "val"]) for d in "ab"}
    scenes = {s.name: s for s in read_scenes(OUT / "shapes")}
    caches = [OUT / "features_a", OUT / "features_b"]
    cache = FeatureCache([s for c in caches for s in sorted(c.glob(SHARD_PREFIX + "*"))])
    common = ["--features", *map(str, caches), "--batch-size", "32", "--max-len", "24",
              "--val-batches", "4", "--eval-images", "0", "--log-every", "20", "--quiet",
              "--seed", "0"]
    if not args.reuse:
        step(f"training on A: {args.steps_a} steps (--phase demo-all, fresh weights)")
        _cli(train, ["--phase", "demo-all", "--init", "perceiver=fresh,gpt2=fresh,xattn=fresh",
                     "--init", f"encoder={OUT / 'encoder'}", "--data", str(files["a", "train"]),
                     "--val-data", str(files["a", "val"]), "--out", str(runs / "a"),
                     "--max-steps", str(args.steps_a), "--epochs", "100", *common])
    results: dict = {"before": _scores(load_pretrained(runs / "a" / "best"), cache, held_out,
                                       scenes), "methods": {}}
    print(f"   before: {json.dumps(results['before'])}")
    mix = f"b={args.mix_share:g},a={1 - args.mix_share:g}"

    for method in args.methods:
        step(f"fine-tuning on B, {method}: {args.steps_b} steps (--phase 3b)")
        flags = [{"EWC_LAMBDA": str(args.ewc_lambda), "MIX": mix}.get(f, f)
                 for f in METHODS[method]]
        if "--ewc" in flags:
            flags += ["--ewc-data", str(files["a", "train"])]
        if "--mix" in flags:
            data = ["--data", f"b={files['b', 'train']}", f"a={files['a', 'train']}",
                    "--val-data", f"b={files['b', 'val']}", f"a={files['a', 'val']}"]
        else:
            data = ["--data", str(files["b", "train"]), "--val-data", str(files["b", "val"])]
        _cli(train, ["--phase", "3b", "--init", f"3a-ext={runs / 'a'}", *data,
                     "--out", str(runs / method), "--max-steps", str(args.steps_b),
                     "--epochs", "100", "--force", *flags, *common])
        # The run's last weights (the phase ends at --max-steps): best/ by validation loss
        # would favour the early, still-descriptive steps for a mixed run.
        row = _scores(load_pretrained(runs / method / "latest"), cache, held_out, scenes)
        results["methods"][method] = row
        print(f"   {method}: {json.dumps(row)}")

    write_text_atomic(OUT / "results.json", json.dumps(results, indent=2))
    _plot(results, OUT / "forgetting.png")
    before = results["before"]
    print(f"\n{'method':<12} {'A BLEU-4':>9} {'A LtW':>7} {'A F1':>6} {'B BLEU-4':>9} "
          f"{'B LtW':>7}")
    for name, row in [("before", before), *results["methods"].items()]:
        print(f"{name:<12} {row['bleu_a']:>9.4f} {row['lenstowords_bleu_a']:>7.4f} "
              f"{row['triple_f1_a']:>6.3f} {row['bleu_b']:>9.4f} {row['lenstowords_bleu_b']:>7.4f}")
    print(f"\nforgetting finished in {time.time() - started:.0f}s; {OUT / 'forgetting.png'}")
    print(json.dumps({"before": {"bleu_a": before["bleu_a"], "bleu_b": before["bleu_b"]},
                      "methods": {m: {"bleu_a": r["bleu_a"], "bleu_b": r["bleu_b"]}
                                  for m, r in results["methods"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
