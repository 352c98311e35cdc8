"""The v1 and v2 notebooks' Keras captioners, built as the notebooks build them (no layer
names, the custom attention layer registered) at small vocabularies, for the bridge's tests.
Needs TensorFlow and Keras (the `test` extra)."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers


@keras.saving.register_keras_serializable()
class TemporalImageAttention(layers.Layer):
    """The v2 notebook's additive attention layer (its final version), as written there."""

    def __init__(self, attn_units=256, **kwargs):
        super().__init__(**kwargs)
        self.attn_units = attn_units
        self.W_img = layers.Dense(attn_units)
        self.W_txt = layers.Dense(attn_units)
        self.V = layers.Dense(1)

    def build(self, input_shape):
        super().build(input_shape)

    def call(self, inputs, mask=None):
        image_features, lstm_features = inputs
        img_exp = tf.expand_dims(self.W_img(image_features), 1)
        txt_exp = tf.expand_dims(self.W_txt(lstm_features), 2)
        score = tf.squeeze(self.V(tf.nn.tanh(img_exp + txt_exp)), axis=-1)
        txt_mask = tf.ones_like(score[:, :, 0], dtype=tf.float32)
        if mask is not None:
            txt_mask = tf.cast(mask[1], tf.float32)
        score = score - (1.0 - tf.expand_dims(txt_mask, -1)) * 1e9
        weights = tf.expand_dims(tf.nn.softmax(score, axis=2), -1)
        return tf.reduce_sum(weights * tf.expand_dims(image_features, 1), axis=2)

    def compute_mask(self, inputs, mask=None):
        return mask[1] if mask is not None else None

    def get_config(self):
        config = super().get_config()
        config.update({"attn_units": self.attn_units})
        return config


def v1_model(vocab_size: int, max_len: int, fusion: str = "add") -> keras.Model:
    """The notebook's `model` (Add) or `model1` (Concatenate, L2 on the LSTM kernels)."""
    image_input = layers.Input(shape=(2048,), name="image_input")
    image = layers.Dense(512, activation="relu")(image_input)
    image = layers.Dense(512 if fusion == "add" else 256, activation="relu")(image)
    image = layers.Dropout(0.4)(image)
    caption_input = layers.Input(shape=(max_len,), name="caption_input")
    words = layers.Embedding(input_dim=vocab_size, output_dim=256, mask_zero=True)(caption_input)
    regularizers = {} if fusion == "add" else {
        "kernel_regularizer": keras.regularizers.l2(1e-4),
        "recurrent_regularizer": keras.regularizers.l2(1e-4)}
    text = layers.Dropout(0.3)(layers.LSTM(512, **regularizers)(words))
    if fusion == "add":
        merged = layers.Dense(256, activation="relu")(layers.Add()([image, text]))
    else:
        merged = layers.Dense(256, activation="relu")(layers.Concatenate()([image, text]))
        merged = layers.Dropout(0.3)(merged)
    output = layers.Dense(vocab_size, activation="softmax")(merged)
    model = keras.Model(inputs=[image_input, caption_input], outputs=output)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def v2_model(vocab_size: int, max_len: int) -> keras.Model:
    """The notebook's final v2 model (attention version 4)."""
    image_input = layers.Input(shape=(64, 2048), name="image_input")
    image_features = layers.Dense(256)(image_input)
    image_global = layers.GlobalAveragePooling1D()(image_features)
    h0 = layers.Dense(256, activation="tanh")(image_global)
    c0 = layers.Dense(256, activation="tanh")(image_global)
    caption_input = layers.Input(shape=(max_len,), name="caption_input")
    embeddings = layers.Embedding(input_dim=vocab_size, output_dim=256,
                                  mask_zero=True)(caption_input)
    lstm_output = layers.LSTM(256, return_sequences=True)(embeddings, initial_state=[h0, c0])
    context = TemporalImageAttention()([image_features, lstm_output])
    fused = layers.Add()([context, lstm_output])
    gate = layers.Dense(256, activation="sigmoid")(fused)
    gated = fused * gate
    x = layers.Dropout(0.5)(layers.Dense(256, activation="relu")(gated))
    output = layers.Dense(vocab_size, activation="softmax")(x)
    model = keras.Model(inputs=[image_input, caption_input], outputs=output)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model
