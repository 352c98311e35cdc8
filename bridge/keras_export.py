"""A v1/v2 checkpoint written back as the notebook's `best_model.keras` (and its `vocab.txt`),
with zipfile, json and h5py alone.

The archive holds what Keras 3 writes: `metadata.json`, `config.json` (the notebook's
functional graph, layer by layer, sizes from the checkpoint's configuration) and
`model.weights.h5` (each layer's variables under `layers/<key>/vars`, the key counting the
layer's class in `model.layers` order, the layer's name recorded on the group). The v2 model's
`TemporalImageAttention` is the notebook's custom layer (`Custom>TemporalImageAttention`):
`keras.models.load_model(path, compile=False)` opens the file where that class is registered,
as in the notebook. The Keras model ends in a softmax, as the notebooks' did.
"""

from __future__ import annotations

import datetime
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bridge.keras_models import KerasGraph, snake_case
from lensjax.models.lstm import V1DecoderConfig, V2DecoderConfig

KERAS_VERSION = "3.0.0"  # recorded in metadata.json: a Keras 3 archive
MODEL_FILE, VOCAB_FILE = "best_model.keras", "vocab.txt"
Tensor = dict[str, Any]


class _Graph:
    """The functional config under construction: layers in order, each with its inputs."""

    def __init__(self) -> None:
        self.layers: list[dict[str, Any]] = []
        self.weights: dict[str, list[np.ndarray] | dict[str, list[np.ndarray]]] = {}
        self._count: dict[str, int] = {}

    def _name(self, class_name: str) -> str:
        base = snake_case(class_name)
        number = self._count.get(base, -1) + 1
        self._count[base] = number
        return base if number == 0 else f"{base}_{number}"

    def input(self, name: str, shape: Sequence[int], dtype: str = "float32") -> Tensor:
        self.layers.append({
            "module": "keras.layers", "class_name": "InputLayer", "registered_name": None,
            "name": name, "inbound_nodes": [],
            "config": {"batch_shape": [None, *shape], "dtype": dtype, "sparse": False,
                       "ragged": False, "name": name}})
        return _tensor(name, shape, dtype)

    def layer(self, class_name: str, inputs: Any, shape: Sequence[int], config=None, *,
              kwargs: Mapping[str, Any] | None = None, weights=None,
              module: str | None = "keras.layers", registered: str | None = None) -> Tensor:
        """Add a layer (or an op, `module` keras.src.ops.*) called on `inputs` (a tensor or a
        list of them) whose output has `shape` (batch left out)."""
        name = self._name(class_name)
        self.layers.append({
            "module": module, "class_name": class_name, "registered_name": registered,
            "name": name,
            "config": {"name": name, "trainable": True, "dtype": "float32", **(config or {})},
            "inbound_nodes": [{"args": [inputs], "kwargs": dict(kwargs or {})}]})
        if weights is not None:
            self.weights[name] = weights
        return _tensor(name, shape)

    def op(self, class_name: str, inputs: Sequence[Tensor], shape: Sequence[int]) -> Tensor:
        name = self._name(class_name)
        self.layers.append({
            "module": "keras.src.ops.numpy", "class_name": class_name,
            "registered_name": class_name, "name": name, "config": {"name": name},
            "inbound_nodes": [{"args": list(inputs), "kwargs": {}}]})
        return _tensor(name, shape)

    def dense(self, inputs: Tensor, params: Mapping[str, np.ndarray], prefix: str,
              activation: str, shape_lead: Sequence[int]) -> Tensor:
        kernel, bias = params[f"{prefix}.kernel"], params[f"{prefix}.bias"]
        return self.layer("Dense", inputs, [*shape_lead, kernel.shape[1]],
                          {"units": int(kernel.shape[1]), "activation": activation,
                           "use_bias": True}, weights=[kernel, bias])


def _tensor(name: str, shape: Sequence[int], dtype: str = "float32") -> Tensor:
    return {"class_name": "__keras_tensor__",
            "config": {"shape": [None, *shape], "dtype": dtype, "keras_history": [name, 0, 0]}}


def _embedding_and_lstm(graph: _Graph, caption: Tensor, params, max_len: int,
                        return_sequences: bool, initial: list[Tensor] | None = None) -> Tensor:
    table = params["decoder.embedding"]
    words = graph.layer("Embedding", caption, [max_len, table.shape[1]],
                        {"input_dim": int(table.shape[0]), "output_dim": int(table.shape[1]),
                         "mask_zero": True}, weights=[table])
    kernel = params["decoder.lstm.kernel"]
    units = int(kernel.shape[1] // 4)
    cell = [kernel, params["decoder.lstm.recurrent_kernel"], params["decoder.lstm.bias"]]
    return graph.layer("LSTM", words, [max_len, units] if return_sequences else [units],
                       {"units": units, "return_sequences": return_sequences},
                       kwargs={"initial_state": initial} if initial else None,
                       weights={"cell": cell})


def v1_graph(decoder: V1DecoderConfig, params: Mapping[str, np.ndarray], max_len: int
             ) -> _Graph:
    """The v1 notebook's `model` (Add) or `model1` (Concatenate) with `params`' weights."""
    graph = _Graph()
    image = graph.input("image_input", [decoder.feature_dim])
    caption = graph.input("caption_input", [max_len], "float32")
    x = graph.dense(image, params, "decoder.image_dense1", "relu", [])
    x = graph.dense(x, params, "decoder.image_dense2", "relu", [])
    x = graph.layer("Dropout", x, [decoder.image_dim], {"rate": decoder.image_dropout})
    text = _embedding_and_lstm(graph, caption, params, max_len, return_sequences=False)
    text = graph.layer("Dropout", text, [decoder.hidden], {"rate": decoder.text_dropout})
    if decoder.fusion == "add":
        merged = graph.layer("Add", [x, text], [decoder.hidden])
    else:
        merged = graph.layer("Concatenate", [x, text], [decoder.image_dim + decoder.hidden],
                             {"axis": -1})
    merged = graph.dense(merged, params, "decoder.merge_dense", "relu", [])
    if decoder.merge_dropout:
        merged = graph.layer("Dropout", merged, [decoder.merge_dim],
                             {"rate": decoder.merge_dropout})
    graph.dense(merged, params, "decoder.output", "softmax", [])
    return graph


def v2_graph(decoder: V2DecoderConfig, params: Mapping[str, np.ndarray], max_len: int
             ) -> _Graph:
    """The v2 notebook's final model with `params`' weights."""
    graph, dim = _Graph(), decoder.dim
    image = graph.input("image_input", [decoder.patches, decoder.feature_dim])
    patches = graph.dense(image, params, "decoder.image_dense", "linear", [decoder.patches])
    mean = graph.layer("GlobalAveragePooling1D", patches, [dim])
    caption = graph.input("caption_input", [max_len], "float32")
    h0 = graph.dense(mean, params, "decoder.init_h", "tanh", [])
    c0 = graph.dense(mean, params, "decoder.init_c", "tanh", [])
    lstm = _embedding_and_lstm(graph, caption, params, max_len, return_sequences=True,
                               initial=[h0, c0])
    attention = {child: [params[f"decoder.attention.{child}.kernel"],
                         params[f"decoder.attention.{child}.bias"]]
                 for child in ("W_img", "W_txt", "V")}
    context = graph.layer("TemporalImageAttention", [patches, lstm], [max_len, dim],
                          {"attn_units": dim}, weights=attention, module=None,
                          registered="Custom>TemporalImageAttention")
    fused = graph.layer("Add", [context, lstm], [max_len, dim])
    gate = graph.dense(fused, params, "decoder.gate", "sigmoid", [max_len])
    gated = graph.op("Multiply", [fused, gate], [max_len, dim])
    x = graph.dense(gated, params, "decoder.dense", "relu", [max_len])
    x = graph.layer("Dropout", x, [max_len, dim], {"rate": decoder.dropout})
    graph.dense(x, params, "decoder.output", "softmax", [max_len])
    return graph


def _config(graph: _Graph) -> dict[str, Any]:
    inputs = [[layer["name"], 0, 0] for layer in graph.layers
              if layer["class_name"] == "InputLayer"]
    return {"module": "keras.src.models.functional", "class_name": "Functional",
            "registered_name": "Functional",
            "config": {"name": "functional", "trainable": True, "layers": graph.layers,
                       "input_layers": inputs,
                       "output_layers": [[graph.layers[-1]["name"], 0, 0]]}}


def _weights_file(graph: _Graph) -> bytes:
    """model.weights.h5: every layer's variables at its class-count key."""
    import h5py

    keys = KerasGraph(graph.layers, [], Path(MODEL_FILE)).weight_keys()  # ops have none
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as root:
        for name, key in keys.items():
            group = root.create_group(f"layers/{key}/vars")
            group.attrs["name"] = name
            weights = graph.weights.get(name, [])
            children = weights if isinstance(weights, dict) else {"": weights}
            for child, arrays in children.items():
                target = group if not child else root.create_group(f"layers/{key}/{child}/vars")
                for index, array in enumerate(arrays):
                    target.create_dataset(str(index), data=np.asarray(array, np.float32))
        root.create_group("vars")
    return buffer.getvalue()


def write_keras(path: Path, family: str, cfg: Any, params: Mapping[str, np.ndarray]) -> None:
    """Write the `.keras` archive of a v1/v2 model (`cfg`, its `decoder.*` params)."""
    build = v1_graph if family == "v1" else v2_graph
    graph = build(cfg.decoder, params, cfg.max_len)
    metadata = {"keras_version": KERAS_VERSION,
                "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S")}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps(metadata))
        archive.writestr("config.json", json.dumps(_config(graph)))
        archive.writestr("model.weights.h5", _weights_file(graph))
