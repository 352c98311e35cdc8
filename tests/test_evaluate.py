"""Evaluation: LensToWords' BLEU-4 exactly as nltk computes it, the COCO metrics as
pycocoevalcap computes them, and the CLI's reports and bad inputs."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from PIL import Image

from lensjax.evaluate import EvaluationError, coco_metrics, main, seed_bleu4

REFERENCES = {
    "1.jpg": ["A dog runs on the grass.", "A brown dog is running!", "The dog plays outside"],
    "2.jpg": ["Two men, 3 women: a crowd.", "People stand in a CROWD", "A group of 5 people"],
    "3.jpg": ["A red car on a street", "a car parked", "The red car is parked on the street"],
    "4.jpg": ["A cat sleeps", "a cat sleeping on a bed", "the cat is asleep"],
}
PREDICTIONS = {
    "1.jpg": "A dog is running on the grass.",
    "2.jpg": "a crowd of 5 people!",
    "3.jpg": "A RED car parked on the street",
    "4.jpg": "",
}


def test_seed_bleu4_equals_nltk_to_the_last_digit():
    def norm(text):
        return re.sub(r"[^\w\s]", "", text.lower()).split()

    expected = np.mean([
        sentence_bleu([norm(r) for r in REFERENCES[k]], norm(p), weights=(0.25,) * 4,
                      smoothing_function=SmoothingFunction().method4)
        for k, p in PREDICTIONS.items()
    ])
    assert seed_bleu4(PREDICTIONS, REFERENCES) == expected


def test_identical_predictions_score_one():
    # Four words at least: a shorter sentence has no 4-gram, and BLEU-4 is then below 1.
    single = {k: [max(refs, key=len)] for k, refs in REFERENCES.items()}
    same = {k: refs[0] for k, refs in single.items()}
    assert seed_bleu4(same, single) == pytest.approx(1.0)
    assert coco_metrics(same, single)["BLEU-4"] == pytest.approx(1.0)


def test_coco_metrics_equal_pycocoevalcap_run_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": r} for r in v] for k, v in REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": p}] for k, p in PREDICTIONS.items()})
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    ours = coco_metrics(PREDICTIONS, REFERENCES, spice=False)
    assert [ours[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert ours["METEOR"] == pytest.approx(Meteor().compute_score(gts, res)[0], abs=1e-12)
    assert ours["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)


def test_java_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("lensjax.evaluate.shutil.which", lambda name: None)
    with pytest.raises(EvaluationError, match="need Java"):
        coco_metrics(PREDICTIONS, REFERENCES)


def _write_set(tmp_path, predictions=PREDICTIONS):
    refs = tmp_path / "captions.txt"
    lines = ["image_name| comment_number| comment"]
    lines += [f"{k}| {i}| {c}" for k, caps in REFERENCES.items() for i, c in enumerate(caps)]
    refs.write_text("\n".join(lines) + "\n")
    preds = tmp_path / "captions.jsonl"
    preds.write_text("".join(json.dumps({"image": f"photos/{k}", "caption": v}) + "\n"
                             for k, v in predictions.items()))
    images = tmp_path / "photos"
    images.mkdir(exist_ok=True)
    for key in REFERENCES:
        Image.new("RGB", (8, 8), "red").save(images / key)
    return refs, preds, images


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.stack = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        if tag not in ("img", "meta"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


def test_cli_writes_metrics_per_image_csv_and_a_gallery(tmp_path, capsys):
    refs, preds, images = _write_set(tmp_path)
    out = tmp_path / "report"
    assert main(["--predictions", str(preds), "--references", str(refs), "--split", "all",
                 "--out", str(out), "--html", "--images", str(images)]) == 0
    table = capsys.readouterr().out
    assert "LensToWords BLEU-4" in table and "COCO BLEU-4 (pycocoevalcap, corpus)" in table
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 4
    assert metrics["lenstowords_bleu4"] == pytest.approx(seed_bleu4(PREDICTIONS, REFERENCES))
    rows = (out / "per_image.csv").read_text().splitlines()
    assert rows[0] == "key,prediction,references,seed_bleu4" and len(rows) == 5
    assert rows[1].startswith("4.jpg,,")  # the empty prediction is scored, and worst
    collector = _Collector()
    collector.feed((out / "gallery.html").read_text())
    assert not collector.stack
    assert collector.images and sorted(set(collector.images)) == sorted(set(collector.links))
    for src in collector.images:
        assert (out / src).resolve().is_file()


def test_unmatched_keys_are_reported_or_refused_with_strict(tmp_path, capsys):
    predictions = {**PREDICTIONS, "9.jpg": "an extra prediction"}
    del predictions["3.jpg"]
    refs, preds, _ = _write_set(tmp_path, predictions)
    args = ["--predictions", str(preds), "--references", str(refs), "--split", "all",
            "--no-coco", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "1 predictions have no references" in err
    assert "1 reference images have no prediction" in err
    assert main([*args, "--strict"]) == 2


def test_non_utf8_predictions_name_the_line(tmp_path, capsys):
    refs, preds, _ = _write_set(tmp_path)
    preds.write_bytes(preds.read_bytes() + b'{"image": "x.jpg", "caption": "caf\xe9"}\n')
    assert main(["--predictions", str(preds), "--references", str(refs), "--no-coco",
                 "--out", str(tmp_path / "r")]) == 2
    assert "captions.jsonl:5: not UTF-8" in capsys.readouterr().err


def test_end_to_end_generates_from_features_then_scores(tmp_path, capsys):
    from flax import nnx

    from lensjax import Captioner, CaptionerConfig, CaptionModel
    from lensjax.data.cache import FeatureCache

    cfg = CaptionerConfig.from_preset("tiny", encoder=None, head=None)
    CaptionModel(Captioner(cfg, rngs=nnx.Rngs(0))).save(tmp_path / "ckpt")
    refs, _, _ = _write_set(tmp_path)
    rng = np.random.default_rng(0)
    with FeatureCache.create(tmp_path / "features", shards=2, shape=(64, 48)) as writer:
        for key in list(REFERENCES)[:3]:
            writer.put(key, rng.standard_normal((64, 48)))
    out = tmp_path / "report"
    assert main(["--weights", str(tmp_path / "ckpt"), "--features", str(tmp_path / "features"),
                 "--references", str(refs), "--split", "all", "--method", "greedy",
                 "--no-coco", "--out", str(out), "--batch-size", "2"]) == 0
    assert "1 reference images have no features" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["images"] == 3


def test_cli_scores_captions_against_the_synthetic_scenes(tmp_path, capsys):
    from lensjax.data.synthetic import describe, generate, read_scenes

    captions = generate(tmp_path / "shapes", images=4, seed=3, size=64, progress=False)
    scenes = read_scenes(tmp_path / "shapes")
    right, wrong = scenes[0], scenes[1]
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"image": right.name, "caption": describe(right)[1]}) + "\n"
                     + json.dumps({"image": wrong.name, "caption": "nothing here ."}) + "\n")
    out = tmp_path / "report"
    assert main(["--predictions", str(preds), "--references", str(captions), "--no-coco",
                 "--scenes", str(tmp_path / "shapes" / "scenes.jsonl"), "--out", str(out)]) == 0
    assert "scenes: (size, colour, kind) triple F1" in capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())["scenes"]
    assert report == {"images": 2, "triple_f1": 0.5, "exact_sets": 0.5, "count": 0.5,
                      "background": 1.0, "background_named": 0.5}


def test_cli_refuses_scenes_of_another_set(tmp_path, capsys):
    from lensjax.data.synthetic import generate

    captions = generate(tmp_path / "a", images=2, seed=0, size=64, progress=False)
    generate(tmp_path / "b", images=1, seed=0, size=64, progress=False)
    preds = tmp_path / "preds.csv"
    preds.write_text("image,caption\n000000.png,a red circle\n000001.png,a red circle\n")
    assert main(["--predictions", str(preds), "--references", str(captions), "--no-coco",
                 "--scenes", str(tmp_path / "b" / "scenes.jsonl"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "have no scene" in capsys.readouterr().err
