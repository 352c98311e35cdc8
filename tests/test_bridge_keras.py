"""`python -m bridge import --family v1|v2 --keras ... --vocab ...`: the notebooks' saved Keras
models, read without TensorFlow, give Keras' own next-word distributions."""

import zipfile

import jax
import numpy as np
import pytest

import keras_notebooks  # tests/ (TensorFlow: the test extra)
from bridge.__main__ import main as bridge_main
from bridge.io import BridgeError
from bridge.keras_models import import_keras, snake_case
from lensjax import load_pretrained
from lensjax.data.word_vocab import WordVocabulary
from lensjax.params import flat_params

VOCAB, MAX_LEN = 30, 7


def _vocabulary(path, size=VOCAB):
    words = ["", "[UNK]", "<start>", "<end>", "a", "cat", "on", "the", "mat", "."]
    WordVocabulary(words + [f"w{i}" for i in range(size - len(words))]).write(path)
    return path


def _saved(model, path):
    model.save(path)
    return path


def _with_weights_edited(keras_file, out, edit):
    """A copy of the `.keras` archive whose model.weights.h5 `edit(h5py root)` changed."""
    import h5py

    with zipfile.ZipFile(keras_file) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    weights = out.with_suffix(".h5")
    weights.write_bytes(contents["model.weights.h5"])
    with h5py.File(weights, "r+") as root:
        edit(root)
    contents["model.weights.h5"] = weights.read_bytes()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    return out


def _prefixes(rng, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Post-padded word prefixes starting with <start> (2), and their lengths."""
    lengths = rng.integers(1, MAX_LEN + 1, rows)
    ids = np.zeros((rows, MAX_LEN), np.int32)
    for row, length in enumerate(lengths):
        ids[row, :length] = [2, *rng.integers(4, VOCAB, length - 1)]
    return ids, lengths


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_a_v1_keras_file_imports_to_keras_own_next_word_distributions(fusion, tmp_path):
    reference = keras_notebooks.v1_model(VOCAB, MAX_LEN, fusion)
    keras_file = _saved(reference, tmp_path / "best_model.keras")
    model = import_keras("v1", keras_file, _vocabulary(tmp_path / "vocab.txt"))
    assert model.config.decoder.fusion == fusion and model.config.max_len == MAX_LEN
    rng = np.random.default_rng(0)
    features = rng.uniform(0, 1, (4, 2048)).astype(np.float32)
    ids, lengths = _prefixes(rng, 4)
    expected = reference.predict([features, ids], verbose=0)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.nn.softmax(model.logits(features, ids), axis=-1))
    got = ours[np.arange(4), lengths - 1]
    np.testing.assert_allclose(got, expected, atol=1e-5 * (1 + expected.max()), rtol=1e-4)


def test_a_v2_keras_file_imports_through_the_cli_and_loads_with_its_vocabulary(tmp_path):
    reference = keras_notebooks.v2_model(VOCAB, MAX_LEN)
    keras_file = _saved(reference, tmp_path / "best_model.keras")
    vocab = _vocabulary(tmp_path / "vocab.txt")
    assert bridge_main(["import", "--family", "v2", "--keras", str(keras_file), "--vocab",
                        str(vocab), "--out", str(tmp_path / "v2")]) == 0
    model = load_pretrained(tmp_path / "v2")
    assert model.family.name == "v2" and model.tokenizer == WordVocabulary.read(vocab)
    rng = np.random.default_rng(1)
    features = rng.uniform(0, 1, (3, 64, 2048)).astype(np.float32)
    ids, lengths = _prefixes(rng, 3)
    expected = reference.predict([features, ids], verbose=0)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.nn.softmax(model.logits(features, ids), axis=-1))
    for row, length in enumerate(lengths):  # Keras' positions past the caption differ
        np.testing.assert_allclose(ours[row, :length], expected[row, :length],
                                   atol=1e-5 * (1 + expected.max()), rtol=1e-4)
    captions = [model.tokenizer.decode_caption(row)
                for row in model.generate(features, "beam", max_new_tokens=5)]
    assert all(set(text.split()) <= set(model.tokenizer.words) for text in captions)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_a_legacy_whole_model_h5_imports_as_its_keras_archive(family, tmp_path):
    reference = (keras_notebooks.v1_model(VOCAB, MAX_LEN, "concat") if family == "v1"
                 else keras_notebooks.v2_model(VOCAB, MAX_LEN))
    vocab = _vocabulary(tmp_path / "vocab.txt")
    archive = import_keras(family, _saved(reference, tmp_path / "best_model.keras"), vocab)
    legacy = import_keras(family, _saved(reference, tmp_path / "best_model.h5"), vocab)
    assert legacy.config == archive.config
    ours, theirs = flat_params(legacy.module), flat_params(archive.module)
    assert sorted(ours) == sorted(theirs)
    for path in ours:
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)


def test_a_weights_only_h5_is_refused_as_a_model(tmp_path):
    reference = keras_notebooks.v1_model(VOCAB, MAX_LEN)
    reference.save_weights(tmp_path / "model.weights.h5")
    with pytest.raises(BridgeError, match="without a model.*whole model"):
        import_keras("v1", tmp_path / "model.weights.h5", _vocabulary(tmp_path / "vocab.txt"))


def test_a_vocabulary_of_another_size_is_refused_naming_both(tmp_path):
    keras_file = _saved(keras_notebooks.v2_model(VOCAB, MAX_LEN), tmp_path / "m.keras")
    with pytest.raises(BridgeError, match=r"lists 40 words but the model's embedding has 30"):
        import_keras("v2", keras_file, _vocabulary(tmp_path / "vocab.txt", 40))


def test_the_wrong_family_and_a_non_archive_are_refused(tmp_path, capsys):
    keras_file = _saved(keras_notebooks.v2_model(VOCAB, MAX_LEN), tmp_path / "m.keras")
    vocab = _vocabulary(tmp_path / "vocab.txt")
    with pytest.raises(BridgeError, match="not the notebook's model"):
        import_keras("v1", keras_file, vocab)
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    assert bridge_main(["import", "--family", "v1", "--keras", str(tmp_path / "junk.keras"),
                        "--vocab", str(vocab), "--out", str(tmp_path / "out")]) == 2
    assert "not a .keras archive" in capsys.readouterr().err
    assert bridge_main(["import", "--family", "v1", "--keras", str(keras_file),
                        "--out", str(tmp_path / "out")]) == 2
    assert "missing: --vocab" in capsys.readouterr().err
    assert bridge_main(["import", "--keras", str(keras_file), "--vocab", str(vocab),
                        "--out", str(tmp_path / "out")]) == 2
    assert "pass --family v1 or --family v2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_weights_are_found_by_class_count_where_the_file_records_no_names(tmp_path):
    """Keras files from before the layer names were recorded: keys count each class."""
    keras_file = _saved(keras_notebooks.v2_model(VOCAB, MAX_LEN), tmp_path / "m.keras")

    def forget_names(root):
        root["layers"].visititems(lambda name, obj: obj.attrs.pop("name", None)
                                  if not hasattr(obj, "shape") else None)

    nameless = _with_weights_edited(keras_file, tmp_path / "nameless.keras", forget_names)
    vocab = _vocabulary(tmp_path / "vocab.txt")
    named = import_keras("v2", keras_file, vocab)
    nameless = import_keras("v2", nameless, vocab)
    for path, value in named.params.items():
        np.testing.assert_array_equal(nameless.params[path], value)
    assert snake_case("GlobalAveragePooling1D") == "global_average_pooling1d"


@pytest.mark.parametrize("family, fusion", [("v1", "add"), ("v1", "concat"), ("v2", None)])
def test_export_writes_a_keras_file_that_keras_loads_into_the_notebooks_model(family, fusion,
                                                                              tmp_path):
    import keras

    reference = (keras_notebooks.v1_model(VOCAB, MAX_LEN, fusion) if family == "v1"
                 else keras_notebooks.v2_model(VOCAB, MAX_LEN))
    vocab = _vocabulary(tmp_path / "vocab.txt")
    imported = import_keras(family, _saved(reference, tmp_path / "best_model.keras"), vocab)
    checkpoint = imported.save(tmp_path / "ckpt")
    assert bridge_main(["export", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "vocab.txt").read_text() == vocab.read_text()
    exported = keras.models.load_model(tmp_path / "out" / "best_model.keras", compile=False)
    assert [type(layer).__name__ for layer in exported.layers] == \
        [type(layer).__name__ for layer in reference.layers]
    for theirs, ours in zip(reference.layers, exported.layers, strict=True):
        for a, b in zip(theirs.get_weights(), ours.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(3)
    features = rng.uniform(0, 1, (3, 2048) if family == "v1" else (3, 64, 2048)
                           ).astype(np.float32)
    ids, _ = _prefixes(rng, 3)
    np.testing.assert_allclose(exported.predict([features, ids], verbose=0),
                               reference.predict([features, ids], verbose=0), rtol=1e-6,
                               atol=1e-7)
    again = import_keras(family, tmp_path / "out" / "best_model.keras",
                         tmp_path / "out" / "vocab.txt")
    assert again.config == imported.config
    for path, value in imported.params.items():
        np.testing.assert_array_equal(again.params[path], value)


def test_a_layer_whose_weights_are_missing_is_named(tmp_path):
    keras_file = _saved(keras_notebooks.v2_model(VOCAB, MAX_LEN), tmp_path / "m.keras")

    def drop_lstm_bias(root):
        del root["layers/lstm/cell/vars/2"]

    broken = _with_weights_edited(keras_file, tmp_path / "broken.keras", drop_lstm_bias)
    # the layer's name counts the session's LSTMs; its key in the file does not
    with pytest.raises(BridgeError, match=r"layer 'lstm(_\d+)?' \(lstm/cell\) has 2 weight "
                                          r"arrays, the notebook's has 3"):
        import_keras("v2", broken, _vocabulary(tmp_path / "vocab.txt"))
