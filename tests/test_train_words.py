"""Training v1 and v2 (`python -m lensjax.train --phase v1|v2`): the notebooks' sequences,
split, loss weights, losses, gradient clipping and ReduceLROnPlateau against Keras and
scikit-learn, and a tiny run on the synthetic set that captions through the caption CLI."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

import keras_notebooks  # tests/ (TensorFlow: the test extra)
from bridge.keras_models import import_keras
from lensjax import CaptionModel, load_pretrained
from lensjax.data.cache import FeatureCache
from lensjax.data.captions import sklearn_split
from lensjax.data.tokenizer import shift
from lensjax.data.word_vocab import WordVocabulary, clean_captions, token_weights
from lensjax.models.families import preset_config
from lensjax.models.inception import InceptionConfig
from lensjax.optim import build_optimizer, clip_each_by_norm
from lensjax.params import flat_params, new_module
from lensjax.phases import PHASES
from lensjax.train import main as train
from lensjax.train.plateau import PlateauSchedule
from lensjax.train.step import Batch, Trainer

VOCAB, MAX_LEN = 30, 7


def _vocabulary(size: int = VOCAB) -> WordVocabulary:
    words = ["", "[UNK]", "<start>", "<end>", "a", "cat", "on", "the", "mat", "."]
    return WordVocabulary(words + [f"w{i}" for i in range(size - len(words))])


def _captions(rng, rows: int) -> list[list[int]]:
    """Word id sequences `<start> w... <end>` of 1 to MAX_LEN + 2 words."""
    return [[2, *rng.integers(4, VOCAB, n), 3] for n in rng.integers(0, MAX_LEN + 1, rows)]


def test_sequences_are_the_notebooks_x_and_y():
    from keras.utils import pad_sequences

    vocabulary = _vocabulary()
    captions = ["a cat on the mat", "", "the cat . " * 4 + "w3"]
    sequences, lengths = vocabulary.training_sequences(captions, MAX_LEN + 1)
    inputs, targets = shift(sequences)
    for row, caption in enumerate(captions):
        z = vocabulary.encode(f"<start> {caption} <end>")
        # the notebooks: x = z[:-1], y = z[1:], post-padded and post-truncated to max_len
        x = pad_sequences([z[:-1]], maxlen=MAX_LEN, padding="post", truncating="post")[0]
        y = pad_sequences([z[1:]], maxlen=MAX_LEN, padding="post", truncating="post")[0]
        np.testing.assert_array_equal(targets[row], y)
        counted = y != 0
        np.testing.assert_array_equal(inputs[row][counted], x[counted])
        assert lengths[row] == counted.sum()


def test_the_split_is_scikit_learns_train_test_split():
    from sklearn.model_selection import train_test_split

    for n in (10, 31, 1000):
        keys = [f"img{i}.jpg" for i in range(n)]
        train_keys, val_keys = train_test_split(keys, test_size=0.1, random_state=42,
                                                shuffle=True)
        assert sklearn_split(keys) == (train_keys, val_keys)


def test_captions_are_cleaned_and_v2_drops_the_bad_ones():
    raw = {"a.jpg": ["Sunset at the beach 🌅 #nofilter @friend https://x.co/1"],
           "b.jpg": ["love this", "so cute"], "c.jpg": ["ok"]}
    assert clean_captions(raw, "v1") == {"a.jpg": ["Sunset at the beach 🌅"],
                                         "b.jpg": ["love this", "so cute"], "c.jpg": ["ok"]}
    assert clean_captions(raw, "v2") == {"a.jpg": ["Sunset at the beach 🌅"]}


def test_token_weights_are_the_notebooks():
    from collections import Counter

    vocabulary = _vocabulary()
    captions = ["a cat on the mat", "the cat", "a mat on a mat", "w1 w1 w2"]
    # the notebook's cell, over its `<start> ... <end>` captions
    word_counts = Counter(w for c in captions for w in f"<start> {c} <end>".split())
    total_words = sum(word_counts.values())
    expected = np.ones(len(vocabulary))
    for idx, word in enumerate(vocabulary.words):
        expected[idx] = (total_words / word_counts.get(word, 1)) ** 0.3
    expected = np.clip(expected / np.mean(expected), 0.5, 3.0)
    np.testing.assert_allclose(token_weights(vocabulary, captions), expected, rtol=1e-6)


def _imported(family: str, fusion: str, tmp_path):
    reference = (keras_notebooks.v1_model(VOCAB, MAX_LEN, fusion) if family == "v1"
                 else keras_notebooks.v2_model(VOCAB, MAX_LEN))
    rng = np.random.default_rng(1)
    for layer in reference.layers:  # weights large enough for a loss that tells them apart
        layer.set_weights([rng.normal(0, 0.1, w.shape).astype(np.float32)
                           for w in layer.get_weights()])
    reference.save(tmp_path / "best_model.keras")
    _vocabulary().write(tmp_path / "vocab.txt")
    model = import_keras(family, tmp_path / "best_model.keras", tmp_path / "vocab.txt")
    return reference, model


def _eval_loss(model: CaptionModel, loss: str, features, sequences, weights=None) -> float:
    params = {p: np.asarray(v) for p, v in flat_params(model.module).items()}
    trainer = Trainer(model.config, {"decoder": 1e-3}, loss=loss, token_weights=weights)
    state = trainer.init(params)
    inputs, targets = shift(sequences)
    lengths = (targets != 0).sum(1).astype(np.int32)
    with jax.default_matmul_precision("highest"):
        return trainer.eval_loss(state, Batch(features, inputs, targets, lengths))


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_v1_loss_is_keras_sparse_cross_entropy_over_every_prefix_with_its_l2(fusion, tmp_path):
    reference, model = _imported("v1", fusion, tmp_path)
    rng = np.random.default_rng(2)
    captions = _captions(rng, 4)
    features = rng.uniform(0, 1, (4, 2048)).astype(np.float32)
    sequences = np.zeros((4, MAX_LEN + 1), np.int32)
    prefixes, targets, rows = [], [], []
    for row, z in enumerate(captions):
        z = z[: MAX_LEN + 1]
        sequences[row, : len(z)] = z
        for t in range(1, len(z)):  # the notebook's samples: each prefix and its next word
            prefixes.append(np.pad(z[:t], (0, MAX_LEN - t)))
            targets.append(z[t])
            rows.append(row)
    expected = reference.evaluate([features[rows], np.array(prefixes)], np.array(targets),
                                  batch_size=len(targets), verbose=0)
    if fusion == "concat":  # Keras adds the L2 penalty to the loss it reports
        assert sum(float(x) for x in reference.losses) > 1e-3
    got = _eval_loss(model, "words", features, sequences)
    np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_v2_loss_is_the_notebooks_masked_weighted_loss(tmp_path):
    import tensorflow as tf

    reference, model = _imported("v2", "add", tmp_path)
    rng = np.random.default_rng(3)
    sequences = np.zeros((4, MAX_LEN + 1), np.int32)
    for row, z in enumerate(_captions(rng, 4)):
        z = z[: MAX_LEN + 1]
        sequences[row, : len(z)] = z
    features = rng.uniform(0, 1, (4, 64, 2048)).astype(np.float32)
    weights = rng.uniform(0.5, 3.0, VOCAB).astype(np.float32)
    x, y = shift(sequences)
    x = np.where(y == 0, 0, x)  # the notebook's x = z[:-1] ends before <end>
    # the notebook's masked_weighted_loss, on Keras' own predictions
    y_pred = reference.predict([features, x], verbose=0)
    loss = tf.keras.losses.SparseCategoricalCrossentropy(reduction="none")(y, y_pred)
    mask = tf.cast(tf.not_equal(y, 0), tf.float32)
    expected = float(tf.reduce_sum(loss * mask * tf.gather(weights, y)) / tf.reduce_sum(mask))
    got = _eval_loss(model, "weighted-words", features, sequences, weights)
    np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_gradients_are_clipped_per_weight_as_keras_clipnorm():
    import keras

    rng = np.random.default_rng(4)
    grads = {"big": rng.normal(0, 1.0, (5, 3)).astype(np.float32),
             "small": rng.normal(0, 0.01, (4,)).astype(np.float32)}
    # SGD at learning rate 1 moves each variable by minus its clipped gradient
    variables = {name: keras.Variable(np.zeros_like(g)) for name, g in grads.items()}
    keras.optimizers.SGD(learning_rate=1.0, clipnorm=0.5).apply_gradients(
        [(grads[n], variables[n]) for n in grads])
    clipped, _ = clip_each_by_norm(0.5).update(grads, None)
    for name in grads:
        np.testing.assert_allclose(clipped[name], -np.asarray(variables[name]), rtol=1e-6)
    assert np.linalg.norm(clipped["big"]) == pytest.approx(0.5)
    np.testing.assert_array_equal(clipped["small"], grads["small"])


def test_keras_adam_follows_keras_adam():
    import keras

    rng = np.random.default_rng(5)
    # gradients near Keras' epsilon as well, where optax.adam would differ
    grads = [(rng.normal(0, 0.02, (6,)) * [1, 1, 1e-5, 1, 1e-6, 1]).astype(np.float32)
             for _ in range(3)]
    variable = keras.Variable(np.zeros(6, np.float32))
    keras_adam = keras.optimizers.Adam(learning_rate=2e-4, epsilon=1e-7)
    optimizer = build_optimizer({"w": "decoder"}, {"decoder": 2e-4}, optimizer="keras-adam")
    params = {"w": np.zeros(6, np.float32)}
    state = optimizer.init(params)
    for g in grads:
        keras_adam.apply_gradients([(g, variable)])
        updates, state = optimizer.update({"w": g}, state, params)
        params = {"w": params["w"] + updates["w"]}
    np.testing.assert_allclose(params["w"], np.asarray(variable), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("phase", ["v1", "v2"])
def test_plateau_schedule_is_keras_reduce_lr_on_plateau(phase):
    import keras

    plateau = PHASES[phase].plateau
    rate = PHASES[phase].learning_rates["decoder"]
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=rate), loss="mse")
    callback = keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss", factor=plateau.factor, patience=plateau.patience,
        min_lr=plateau.min_lr, verbose=0)
    callback.set_model(model)
    schedule = PlateauSchedule(dataclasses.asdict(plateau), {"decoder": rate})
    state = schedule.initial()
    # improvements, a plateau, one smaller than min_delta (1e-4), and a long decline of rates
    losses = [5.0, 4.0, 4.1, 4.2, 3.99995, 3.9, 3.95, 3.96, 3.97, 3.98, 3.5,
              *[3.6] * 100]
    for epoch, loss in enumerate(losses):
        callback.on_epoch_end(epoch, {"val_loss": loss})
        state = schedule.update(state, loss)
        expected = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        # float32 products, taken in another order
        assert rate * state["scale"] == pytest.approx(expected, rel=1e-5), epoch
    assert rate * state["scale"] == pytest.approx(plateau.min_lr, rel=1e-5)


# -- the command line


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """40 synthetic images and a v2 checkpoint whose fresh InceptionV3 extracted their
    features (the encoder the tiny runs caption images with)."""
    from lensjax.data.synthetic import generate
    from lensjax.extract import main as extract

    root = tmp_path_factory.mktemp("words")
    captions = generate(root / "shapes", images=40, seed=0, progress=False)
    cfg = dataclasses.replace(preset_config("v2-tiny"), encoder=InceptionConfig())
    CaptionModel(new_module(cfg, 0), {"tokenizer": _vocabulary(40).to_metadata()}).save(
        root / "inception")
    assert extract([str(root / "shapes" / "images"), "--weights", str(root / "inception"),
                    "--out", str(root / "features_v2"), "--shards", "1"]) == 0
    # v1's pooled vector is the mean of v2's 64 patches (InceptionV3's global average pool)
    patches = FeatureCache(root / "features_v2")
    with FeatureCache.create(root / "features_v1", 1, shape=(2048,)) as writer:
        for key in patches.keys():
            writer.put(key, patches.get_batch([key])[0].astype(np.float32).mean(0))
    return {"captions": captions, "root": root, "images": root / "shapes" / "images"}


def _run(shapes, phase: str, out: Path, *extra: str) -> list[str]:
    return ["--phase", phase, "--data", str(shapes["captions"]), "--features",
            str(shapes["root"] / f"features_{phase}"), "--out", str(out), "--batch-size", "8",
            "--max-len", "13", "--preset", f"{phase}-tiny", "--quiet", *extra]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_v2_run_learns_captions_through_the_cli_and_evaluates(shapes, tmp_path, capsys):
    from lensjax.caption import main as caption
    from lensjax.evaluate import main as evaluate

    run = tmp_path / "v2"
    assert train(_run(shapes, "v2", run, "--epochs", "4", "--lr", "decoder=2e-2",
                      "--init", f"encoder={shapes['root'] / 'inception'}",
                      "--eval-images", "4")) == 0
    document = json.loads((run / "run.json").read_text())
    assert document["status"] == "done" and document["eval"]["method"] == "beam"
    assert document["settings"]["loss"] == "weighted-words"
    assert document["settings"]["clip_norm"] == 0.5
    val = [r["val_loss"] for r in _records(run) if "val_loss" in r]
    assert len(val) == 4 and val[-1] < 0.8 * val[0]
    model = load_pretrained(run / "best")
    words = model.tokenizer.words  # built from the synthetic captions
    assert words[:2] == ["", "[UNK]"] and {"<start>", "<end>", "background"} <= set(words)
    assert model.config.decoder.start_id == words.index("<start>")
    assert model.config.vocab_size == len(words) and model.config.encoder is not None

    images = sorted(shapes["images"].iterdir())[:2]
    capsys.readouterr()
    assert caption([*map(str, images), "--weights", str(run / "best"), "--greedy"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert all(set(line.split("\t")[-1].split()) <= set(words) for line in lines)

    out = tmp_path / "report"
    assert evaluate(["--weights", str(run / "best"), "--features",
                     str(shapes["root"] / "features_v2"), "--references",
                     str(shapes["captions"]), "--split", "all", "--method", "beam",
                     "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert 0 < report["lenstowords_bleu4"] <= 1 and 0 < report["coco"]["BLEU-4"] <= 1


def test_a_resumed_v1_run_continues_its_learning_rate_schedule(shapes, tmp_path, monkeypatch):
    from lensjax.train.loop import PhaseRun

    # Scripted validation losses by epoch: v1's patience of 2 lowers the rates after epochs
    # 4 and 6, the first only if the resumed run remembers epoch 3's count.
    scripted = [3.0, 2.0, 2.5, 2.5, 2.5, 2.5]
    monkeypatch.setattr(PhaseRun, "validate", lambda self, state: scripted[self.progress.epoch])
    args = ("--epochs", "6", "--eval-images", "0", "--log-every", "1")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train(_run(shapes, "v1", whole, *args)) == 0
    steps_per_epoch = json.loads((whole / "latest" / "lensjax.json").read_text())[
        "training"]["step"] // 6
    assert train(_run(shapes, "v1", split, *args, "--max-steps",
                      str(3 * steps_per_epoch))) == 0
    assert train(_run(shapes, "v1", split, *args, "--resume")) == 0
    expected, got = _records(whole), _records(split)
    reductions = [r for r in expected if r.get("event") == "lr_reduced"]
    assert [r["step"] for r in reductions] == [4 * steps_per_epoch, 6 * steps_per_epoch]
    assert [r for r in got if r.get("event") == "lr_reduced"] == reductions
    losses = {r["step"]: r["train_loss"] for r in expected if "train_loss" in r}
    resumed = {r["step"]: r["train_loss"] for r in got if "train_loss" in r}
    assert sorted(resumed) == sorted(losses)
    np.testing.assert_allclose([resumed[s] for s in sorted(losses)],
                               [losses[s] for s in sorted(losses)], rtol=1e-5)


def test_v2_reloads_its_best_weights_when_it_lowers_the_learning_rate(shapes, tmp_path,
                                                                      monkeypatch):
    from lensjax.checkpoint import load_checkpoint
    from lensjax.train.loop import PhaseRun

    # Scripted validation losses: the best at epoch 1, then a plateau of v2's patience (4).
    scripted = iter([1.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    seen = []
    reduce = PhaseRun.reduce_on_plateau

    def spy(self, state, val):
        state = reduce(self, state, val)
        seen.append((self.progress.plateau["scale"], self.trainer.params(state)))
        return state

    monkeypatch.setattr(PhaseRun, "validate", lambda self, state: next(scripted))
    monkeypatch.setattr(PhaseRun, "reduce_on_plateau", spy)
    run = tmp_path / "v2"
    assert train(_run(shapes, "v2", run, "--epochs", "5", "--eval-images", "0",
                      "--patience", "8")) == 0
    best = load_checkpoint(run / "best")[0]
    scales = [scale for scale, _ in seen]
    assert scales == [1.0, 1.0, 1.0, 1.0, 0.5]
    reloaded, before = seen[-1][1], seen[-2][1]
    assert all(np.array_equal(reloaded[p], best[p]) for p in best)
    assert any(not np.array_equal(before[p], best[p]) for p in best)
    reductions = [r for r in _records(run) if r.get("event") == "lr_reduced"]
    assert len(reductions) == 1 and reductions[0]["reloaded_best"] is True


def test_word_phase_refusals(shapes, tmp_path, capsys):
    def error(*argv) -> str:
        assert train(list(argv)) == 2
        return capsys.readouterr().err

    assert "a v2 model takes words or weighted-words" in error(
        *_run(shapes, "v2", tmp_path / "a", "--loss", "eos"))
    assert "not images" in error(*_run(shapes, "v1", tmp_path / "b", "--images",
                                       str(shapes["images"])))
    no_words = tmp_path / "no_words"
    CaptionModel(new_module(preset_config("v2-tiny"), 0)).save(no_words)
    assert "carries no word vocabulary" in error(
        *_run(shapes, "v2", tmp_path / "c", "--init", f"decoder={no_words}"))
