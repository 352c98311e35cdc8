"""v1's decoder (both notebook variants) against the notebook's Keras models with random
weights: the next-word distribution after every prefix of a padded batch."""

import jax
import numpy as np
import pytest
from flax import nnx

from lensjax.models.lstm import V1Decoder, v1_preset

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
    model = V1Decoder(v1_preset(fusion, VOCAB), rngs=nnx.Rngs(0))
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
