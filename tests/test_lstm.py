"""v1's decoder (both notebook variants) against the notebook's Keras models with random
weights: the next-word distribution after every prefix of a padded batch."""

import jax
import numpy as np
import pytest
from flax import nnx

from lensjax.models.lstm import V1Decoder, v1_decoder

VOCAB, MAX_LEN = 50, 8


def _keras_v1(fusion):
    """The notebook's `model` (add) or `model1` (concat), at a small vocabulary."""
    keras = pytest.importorskip("keras")
    from keras import layers

    image_input = layers.Input((2048,))
    image = layers.Dense(512, activation="relu")(image_input)
    image = layers.Dense(512 if fusion == "add" else 256, activation="relu")(image)
    image = layers.Dropout(0.4)(image)
    caption_input = layers.Input((MAX_LEN,))
    words = layers.Embedding(VOCAB, 256, mask_zero=True)(caption_input)
    text = layers.Dropout(0.3)(layers.LSTM(512)(words))
    if fusion == "add":
        merged = layers.Dense(256, activation="relu")(layers.Add()([image, text]))
    else:
        merged = layers.Dense(256, activation="relu")(layers.Concatenate()([image, text]))
        merged = layers.Dropout(0.3)(merged)
    output = layers.Dense(VOCAB, activation="softmax")(merged)
    return keras.Model([image_input, caption_input], output)


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_next_word_distributions_equal_the_notebooks_keras_model(fusion):
    reference = _keras_v1(fusion)
    rng = np.random.default_rng(0)
    for layer in reference.layers:  # random biases too, so that every term is checked
        layer.set_weights([rng.normal(0, 0.1, w.shape).astype(np.float32)
                           for w in layer.get_weights()])
    dense = [layer for layer in reference.layers if type(layer).__name__ == "Dense"]
    (embedding,) = [layer for layer in reference.layers if type(layer).__name__ == "Embedding"]
    (lstm,) = [layer for layer in reference.layers if type(layer).__name__ == "LSTM"]
    model = V1Decoder(v1_decoder(fusion, VOCAB), rngs=nnx.Rngs(0))
    for ours, theirs in zip((model.image_dense1, model.image_dense2, model.merge_dense,
                             model.output), dense, strict=True):
        kernel, bias = theirs.get_weights()
        ours.kernel[...], ours.bias[...] = kernel, bias
    (model.embedding[...],) = embedding.get_weights()
    model.lstm.kernel[...], model.lstm.recurrent_kernel[...], model.lstm.bias[...] = (
        lstm.get_weights())

    features = rng.uniform(0, 1, (3, 2048)).astype(np.float32)
    lengths = [MAX_LEN, 5, 2]
    ids = np.zeros((3, MAX_LEN), np.int32)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(2, VOCAB, n)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.nn.log_softmax(model(features, ids), axis=-1))
    assert np.abs(ours[0, 0] - ours[0, -1]).max() > 0.1  # the prefix matters
    for t in range(MAX_LEN):  # Keras sees each prefix, post-padded
        prefix = np.where(np.arange(MAX_LEN) <= t, ids, 0)
        expected = np.log(reference.predict([features, prefix], verbose=0))
        for row, n in enumerate(lengths):
            position = min(t, n - 1)  # past a row's end its state stays (masked)
            np.testing.assert_allclose(ours[row, position], expected[row],
                                       atol=1e-4 * (1 + np.abs(expected[row]).max()), rtol=0)


def _keras_v2():
    """The notebook's final v2 model (attention version 4) at a small vocabulary, its
    TemporalImageAttention written as the notebook's."""
    keras = pytest.importorskip("keras")
    from keras import layers

    from keras_notebooks import TemporalImageAttention

    image_input = layers.Input((64, 2048))
    patches = layers.Dense(256, name="image_dense")(image_input)
    mean = layers.GlobalAveragePooling1D()(patches)
    h0 = layers.Dense(256, activation="tanh", name="init_h")(mean)
    c0 = layers.Dense(256, activation="tanh", name="init_c")(mean)
    caption_input = layers.Input((MAX_LEN,))
    words = layers.Embedding(VOCAB, 256, mask_zero=True, name="embedding")(caption_input)
    h = layers.LSTM(256, return_sequences=True, name="lstm")(words, initial_state=[h0, c0])
    context = TemporalImageAttention(name="attention")([patches, h])
    fused = layers.Add()([context, h])
    gated = fused * layers.Dense(256, activation="sigmoid", name="gate")(fused)
    x = layers.Dropout(0.5)(layers.Dense(256, activation="relu", name="dense")(gated))
    output = layers.Dense(VOCAB, activation="softmax", name="output")(x)
    return keras.Model([image_input, caption_input], output)


def test_v2_next_word_distributions_equal_the_notebooks_keras_model():
    from lensjax.models.lstm import V2Decoder, V2DecoderConfig

    reference = _keras_v2()
    rng = np.random.default_rng(1)
    model = V2Decoder(V2DecoderConfig(vocab_size=VOCAB), rngs=nnx.Rngs(0))
    attention = reference.get_layer("attention")
    pairs = [(getattr(model, n), reference.get_layer(n))
             for n in ("image_dense", "init_h", "init_c", "gate", "dense", "output")]
    pairs += [(getattr(model.attention, n), getattr(attention, n)) for n in ("W_img", "W_txt", "V")]
    for ours, theirs in pairs:
        kernel, bias = (rng.normal(0, 0.05, w.shape).astype(np.float32)
                        for w in theirs.get_weights())
        theirs.set_weights([kernel, bias])
        ours.kernel[...], ours.bias[...] = kernel, bias
    embedding = rng.normal(0, 0.5, (VOCAB, 256)).astype(np.float32)
    reference.get_layer("embedding").set_weights([embedding])
    model.embedding[...] = embedding
    lstm = [rng.normal(0, 0.1, w.shape).astype(np.float32)
            for w in reference.get_layer("lstm").get_weights()]
    reference.get_layer("lstm").set_weights(lstm)
    model.lstm.kernel[...], model.lstm.recurrent_kernel[...], model.lstm.bias[...] = lstm

    features = rng.uniform(0, 1, (3, 64, 2048)).astype(np.float32)
    ids = np.zeros((3, MAX_LEN), np.int32)
    for row, n in enumerate([MAX_LEN, 5, 2]):
        ids[row, :n] = rng.integers(2, VOCAB, n)
    expected = np.log(reference.predict([features, ids], verbose=0))  # (B, T, V), padded too
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.nn.log_softmax(model(features, ids), axis=-1))
    assert np.abs(ours[0, 0] - ours[0, -1]).max() > 0.05  # the prefix matters
    np.testing.assert_allclose(ours, expected, atol=1e-4 * (1 + np.abs(expected).max()), rtol=0)


def _greedy_by_hooks(model, features, steps):
    prefix = model.start_decoding(features, 1, steps)
    logits, state, tokens = prefix.logits, prefix.cache, []
    for position in range(steps):
        token = jax.numpy.argmax(logits, axis=-1).astype(np.int32)
        tokens.append(np.asarray(token))
        logits, state = model.decode_step(prefix.context, state, token, position + 1)
    return np.stack(tokens, axis=1)


def _greedy_by_rerunning(model, features, steps, start_id):
    """The notebooks' greedy: the whole prefix through the model at every step."""
    ids = np.full((len(features), 1), start_id, np.int32)
    for _ in range(steps):
        nxt = np.asarray(model(features, ids))[:, -1].argmax(-1).astype(np.int32)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    return ids[:, 1:]


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_lstm_state_decoding_equals_rerunning_the_prefix(family):
    from lensjax.models.lstm import V2Decoder, V2DecoderConfig

    rng = np.random.default_rng(2)
    if family == "v1":
        model = V1Decoder(v1_decoder("add", VOCAB), rngs=nnx.Rngs(3))
        features = rng.uniform(0, 1, (3, 2048)).astype(np.float32)
    else:
        model = V2Decoder(V2DecoderConfig(vocab_size=VOCAB), rngs=nnx.Rngs(3))
        features = rng.uniform(0, 1, (3, 64, 2048)).astype(np.float32)
    model.embedding[...] = rng.normal(0, 1.0, model.embedding.shape).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        by_hooks = _greedy_by_hooks(model, features, 6)
        rerun = _greedy_by_rerunning(model, features, 6, model.cfg.start_id)
    np.testing.assert_array_equal(by_hooks, rerun)
    assert len({tuple(row) for row in by_hooks}) > 1 or len(set(by_hooks[0])) > 1


def test_beam_reorder_gathers_each_beams_parent_state():
    model = V1Decoder(v1_decoder("add", VOCAB), rngs=nnx.Rngs(0))
    h = np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)  # row tags
    parents = np.array([[2, 2, 0], [1, 0, 0]])  # 2 images x 3 beams
    new_h, _ = model.reorder_state((h, h), parents)
    np.testing.assert_array_equal(np.asarray(new_h)[:, 0], [2, 2, 0, 4, 3, 3])


def test_the_shared_decode_loops_run_an_lstm_with_its_own_end_token():
    from lensjax.generate import DecodeOptions, beam_search, sample
    from lensjax.models.lstm import V2Decoder, V2DecoderConfig

    rng = np.random.default_rng(4)
    model = V2Decoder(V2DecoderConfig(vocab_size=VOCAB), rngs=nnx.Rngs(5))
    model.embedding[...] = rng.normal(0, 1.0, model.embedding.shape).astype(np.float32)
    features = rng.uniform(0, 1, (3, 64, 2048)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        rerun = _greedy_by_rerunning(model, features, 6, model.cfg.start_id)
        end = int(rerun[0, 2])  # make the third word of image 0 its <end>
        options = DecodeOptions("greedy", 6, eos_id=end, stop_at_period=False,
                                stop_on_repeat=False)
        keys = jax.random.split(jax.random.key(0), 3)
        greedy = np.asarray(sample(model, features, keys, 1.0, options))
        beams = np.asarray(beam_search(model, features, 0.7,
                                       DecodeOptions("beam", 6, beam_width=3, eos_id=end)))
    for row, tokens in enumerate(rerun):
        stop = next((i for i, t in enumerate(tokens) if t in (end, 0)), len(tokens))
        expected = np.where(np.arange(6) < stop, tokens, end)
        np.testing.assert_array_equal(greedy[row], expected)
    assert greedy[0, 2] == end and beams.shape == (3, 6) and beams.max() < VOCAB
