"""v1/v2's saved Keras captioners (`best_model.keras`, what the notebooks' ModelCheckpoint
wrote) onto lensjax's v1/v2 models, read with zipfile and h5py alone: no TensorFlow, no
Keras, no code from the file.

A `.keras` archive holds `config.json` (the functional graph: each layer's class, settings
and inputs) and `model.weights.h5` (each layer's variables under `layers/<key>/vars`, where
the key counts the layer's class in `model.layers` order: `dense`, `dense_1`, ...; recent
Keras also records the layer's name on the group). The notebooks named no layer, so their
names (`dense_6`, ...) depend on what else the session had built: each lensjax part is found
by its place in the graph instead (the Dense fed by the image input, the LSTM's initial
states, the model's output layer, ...), and the sizes are read from the layers' settings.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bridge.convert import _sha256
from bridge.io import BridgeError
from lensjax.models.inception import InceptionConfig
from lensjax.models.lstm import V1DecoderConfig, V2DecoderConfig
from lensjax.models.v1.config import V1Config
from lensjax.models.v2.config import V2Config

Params = dict[str, np.ndarray]


def snake_case(name: str) -> str:
    """Keras' `naming.to_snake_case` of a class name (`GlobalAveragePooling1D` ->
    `global_average_pooling1d`): the weights file's key of a layer of that class."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _histories(node: Any) -> Iterator[str]:
    """The source layer names of every Keras tensor in an inbound-node structure."""
    if isinstance(node, dict):
        if node.get("class_name") == "__keras_tensor__":
            yield node["config"]["keras_history"][0]
            return
        for value in node.values():
            yield from _histories(value)
    elif isinstance(node, list):
        for value in node:
            yield from _histories(value)


@dataclasses.dataclass
class KerasGraph:
    """A functional model's `config.json`: its layers in order, and who feeds whom."""

    layers: list[dict[str, Any]]
    outputs: list[str]
    path: Path

    @classmethod
    def from_config(cls, config: Mapping[str, Any], path: Path) -> KerasGraph:
        if config.get("class_name") != "Functional":
            raise BridgeError(f"{path}: a {config.get('class_name')!r} model, not the "
                              "notebooks' functional Keras model")
        body = config["config"]
        outputs = body["output_layers"]  # [name, node, index], or a list of those
        outputs = [outputs] if outputs and isinstance(outputs[0], str) else outputs
        # A legacy .h5 names a registered custom class "Package>Class"
        layers = [{**layer, "class_name": layer["class_name"].rpartition(">")[2]}
                  for layer in body["layers"]]
        return cls(layers, [entry[0] for entry in outputs], path)

    def layer(self, name: str) -> dict[str, Any]:
        return next(layer for layer in self.layers if layer["name"] == name)

    def of_class(self, class_name: str) -> list[dict[str, Any]]:
        return [layer for layer in self.layers if layer["class_name"] == class_name]

    def inputs_of(self, name: str) -> list[str]:
        """The layers feeding `name`'s positional inputs, in order."""
        nodes = self.layer(name)["inbound_nodes"]
        return list(_histories(nodes[0]["args"])) if nodes else []

    def keyword_inputs_of(self, name: str, keyword: str) -> list[str]:
        nodes = self.layer(name)["inbound_nodes"]
        return list(_histories(nodes[0]["kwargs"].get(keyword, []))) if nodes else []

    def consumers_of(self, name: str) -> list[str]:
        return [layer["name"] for layer in self.layers
                if layer["inbound_nodes"] and name in self.inputs_of(layer["name"])]

    def through(self, name: str, *skipped: str) -> str:
        """The one layer after `name`, past layers of the `skipped` classes (e.g. Dropout)."""
        current = name
        while True:
            after = self.consumers_of(current)
            if len(after) != 1:
                raise self.not_the_notebooks(f"{current!r} feeds {len(after)} layers, "
                                             "expected one")
            current = after[0]
            if self.layer(current)["class_name"] not in skipped:
                return current

    def weight_keys(self) -> dict[str, str]:
        """{layer name: its key in the weights file}: each class counted in `model.layers`
        order (the graph's operations such as a `*` are no layers and are not counted)."""
        used: dict[str, int] = {}
        keys = {}
        for layer in self.layers:
            if str(layer.get("module", "")).startswith("keras.src.ops"):
                continue
            base = snake_case(layer["class_name"])
            keys[layer["name"]] = base if base not in used else f"{base}_{used[base] + 1}"
            used[base] = used.get(base, -1) + 1
        return keys

    def not_the_notebooks(self, why: str) -> BridgeError:
        return BridgeError(f"{self.path}: not the notebook's model ({why})")


@dataclasses.dataclass
class KerasModel:
    """A `.keras` archive: its graph, {weights-file key path: [arrays]} (nested layers'
    variables under `parent/child`, e.g. `lstm/cell`) and {layer name: its key} (the names the
    file records, else Keras' class counts)."""

    graph: KerasGraph
    variables: dict[str, list[np.ndarray]]
    keys: dict[str, str]

    def weights(self, layer: str, count: int, child: str | None = None) -> list[np.ndarray]:
        """The `count` arrays of `layer` (of its sublayer `child`); BridgeError otherwise."""
        key = self.keys[layer]
        key = f"{key}/{child}" if child else key
        found = self.variables.get(key, [])
        if len(found) != count:
            raise BridgeError(f"{self.graph.path}: layer {layer!r} ({key}) has {len(found)} "
                              f"weight arrays, the notebook's has {count}")
        return found


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# The sublayers of the notebook's TemporalImageAttention, in the order it creates them (the
# order a legacy .h5 lists their weights in).
ATTENTION_CHILDREN = ("W_img", "W_txt", "V")


def read_keras_model(path: str | os.PathLike) -> KerasModel:
    """Read a `.keras` archive, or a legacy whole-model `.h5` (`model.save("x.h5")`);
    BridgeError naming the file when it is neither."""
    import h5py

    path = Path(path)
    with open(path, "rb") as handle:
        if handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
            return read_legacy_keras_model(path)
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
            weights = archive.read("model.weights.h5")
    except (zipfile.BadZipFile, KeyError) as error:
        raise BridgeError(f"{path}: not a .keras archive (a zip holding config.json and "
                          f"model.weights.h5): {error}") from None
    variables: dict[str, list[np.ndarray]] = {}
    named: dict[str, str] = {}
    with h5py.File(io.BytesIO(weights), "r") as root:
        if "layers" not in root:
            raise BridgeError(f"{path}: model.weights.h5 has no layers/ group")

        def visit(name: str, group) -> None:
            if not (isinstance(group, h5py.Group) and name.endswith("/vars")):
                return
            key = name[: -len("/vars")]
            if "/" not in key and "name" in group.attrs:
                named[str(group.attrs["name"])] = key
            if len(group):
                variables[key] = [np.asarray(group[str(i)]) for i in range(len(group))]

        root["layers"].visititems(visit)
    graph = KerasGraph.from_config(config, path)
    return KerasModel(graph, variables, {**graph.weight_keys(), **named})


def read_legacy_keras_model(path: Path) -> KerasModel:
    """A whole-model HDF5 file as Keras 3 writes it: the graph in the root's `model_config`
    attribute (config.json's content), each layer's weights by its name under
    `model_weights` (`bridge.keras_h5`), nested layers' weights in one list that is split
    here: an LSTM's are its cell's, the attention layer's its three Dense sublayers'."""
    import h5py

    from bridge.keras_h5 import read_keras_weights

    with h5py.File(path, "r") as root:
        config = root.attrs.get("model_config")
        if config is None or "model_weights" not in root:
            raise BridgeError(f"{path}: an HDF5 file without a model (no model_config or "
                              "model_weights): a weights-only file? Give the whole model, "
                              "saved with model.save()")
        config = json.loads(config.decode() if isinstance(config, bytes) else config)
    graph = KerasGraph.from_config(config, path)
    if any(layer["inbound_nodes"] and not isinstance(layer["inbound_nodes"][0], dict)
           for layer in graph.layers):
        raise BridgeError(f"{path}: written by Keras 2 (its graph lists inbound nodes "
                          "as lists); load it in Keras 3 and save it as .keras")
    variables: dict[str, list[np.ndarray]] = {}
    for name, arrays in read_keras_weights(path).layers.items():
        class_name = graph.layer(name)["class_name"]
        if class_name == "LSTM":
            variables[f"{name}/cell"] = arrays
        elif class_name == "TemporalImageAttention" and len(arrays) == 6:
            for index, child in enumerate(ATTENTION_CHILDREN):
                variables[f"{name}/{child}"] = arrays[2 * index : 2 * index + 2]
        else:
            variables[name] = arrays
    return KerasModel(graph, variables, {layer["name"]: layer["name"]
                                         for layer in graph.layers})


def _dense(model: KerasModel, layer: str, prefix: str) -> Params:
    kernel, bias = model.weights(layer, 2)
    return {f"{prefix}.kernel": kernel, f"{prefix}.bias": bias}


def _lstm(model: KerasModel, layer: str) -> Params:
    kernel, recurrent, bias = model.weights(layer, 3, "cell")
    return {"decoder.lstm.kernel": kernel, "decoder.lstm.recurrent_kernel": recurrent,
            "decoder.lstm.bias": bias}


def _dropout_after(graph: KerasGraph, name: str) -> float:
    """The rate of a Dropout right after `name` (0 when none)."""
    after = graph.consumers_of(name)
    if len(after) == 1 and graph.layer(after[0])["class_name"] == "Dropout":
        return float(graph.layer(after[0])["config"]["rate"])
    return 0.0


def _units(graph: KerasGraph, name: str) -> int:
    return int(graph.layer(name)["config"]["units"])


def _the(graph: KerasGraph, class_name: str) -> str:
    found = graph.of_class(class_name)
    if len(found) != 1:
        raise graph.not_the_notebooks(f"{len(found)} {class_name} layers, expected one")
    return found[0]["name"]


def _input_shapes(graph: KerasGraph) -> dict[str, tuple]:
    shapes = {}
    for layer in graph.of_class("InputLayer"):
        config = layer["config"]
        shape = config.get("batch_shape") or config.get("batch_input_shape")
        shapes[layer["name"]] = tuple(shape[1:])
    return shapes


def _image_and_caption_inputs(graph: KerasGraph, image_rank: int) -> tuple[str, str, tuple]:
    """(image input name, caption input name, image shape) by the inputs' ranks."""
    shapes = _input_shapes(graph)
    image = [name for name, shape in shapes.items() if len(shape) == image_rank and
             graph.consumers_of(name) and graph.layer(graph.consumers_of(name)[0])["class_name"]
             == "Dense"]
    caption = [name for name, shape in shapes.items() if len(shape) == 1 and name not in image]
    if len(image) != 1 or len(caption) != 1:
        raise graph.not_the_notebooks(f"inputs {shapes}")
    return image[0], caption[0], shapes[image[0]]


def v1_params(model: KerasModel) -> tuple[V1DecoderConfig, Params, int]:
    """v1's Keras model (either notebook variant) -> (decoder config, `decoder.*` params,
    the caption input's length)."""
    graph = model.graph
    image_input, caption_input, (feature_dim,) = _image_and_caption_inputs(graph, 1)
    dense1 = graph.consumers_of(image_input)[0]
    dense2 = graph.through(dense1)
    embedding, lstm = _the(graph, "Embedding"), _the(graph, "LSTM")
    merges = graph.of_class("Add") + graph.of_class("Concatenate")
    if len(merges) != 1:
        raise graph.not_the_notebooks("no single Add or Concatenate of the two branches")
    merge = merges[0]["name"]
    merge_dense = graph.through(merge)
    (output,) = graph.outputs
    if graph.through(dense2, "Dropout") != merge or graph.through(lstm, "Dropout") != merge:
        raise graph.not_the_notebooks("the image and caption branches do not meet in "
                                      f"{merge!r}")
    fusion = "add" if merges[0]["class_name"] == "Add" else "concat"
    params = {
        **_dense(model, dense1, "decoder.image_dense1"),
        **_dense(model, dense2, "decoder.image_dense2"),
        "decoder.embedding": model.weights(embedding, 1)[0],
        **_lstm(model, lstm),
        **_dense(model, merge_dense, "decoder.merge_dense"),
        **_dense(model, output, "decoder.output"),
    }
    if fusion == "concat" and graph.inputs_of(merge)[0] != _feeder(graph, dense2):
        # lensjax concatenates [image, caption]: put the kernel's rows in that order
        hidden = _units(graph, lstm)
        kernel = params["decoder.merge_dense.kernel"]
        params["decoder.merge_dense.kernel"] = np.concatenate([kernel[hidden:], kernel[:hidden]])
    cfg = V1DecoderConfig(
        vocab_size=int(graph.layer(embedding)["config"]["input_dim"]),
        feature_dim=int(feature_dim), embed_dim=int(graph.layer(embedding)["config"]
                                                   ["output_dim"]),
        hidden=_units(graph, lstm), image_dim=_units(graph, dense2),
        merge_dim=_units(graph, merge_dense), fusion=fusion,
        image_dropout=_dropout_after(graph, dense2), text_dropout=_dropout_after(graph, lstm),
        merge_dropout=_dropout_after(graph, merge_dense))
    return cfg, params, int(_input_shapes(graph)[caption_input][0])


def _feeder(graph: KerasGraph, branch: str) -> str:
    """What `branch` hands on: the Dropout after it, or itself."""
    after = graph.consumers_of(branch)
    return after[0] if after and graph.layer(after[0])["class_name"] == "Dropout" else branch


def v2_params(model: KerasModel) -> tuple[V2DecoderConfig, Params, int]:
    """v2's Keras model (the notebook's final attention model) -> (decoder config,
    `decoder.*` params, the caption input's length)."""
    graph = model.graph
    image_input, caption_input, (patches, feature_dim) = _image_and_caption_inputs(graph, 2)
    image_dense = graph.consumers_of(image_input)[0]
    embedding, lstm = _the(graph, "Embedding"), _the(graph, "LSTM")
    initial = graph.keyword_inputs_of(lstm, "initial_state")
    attention = [layer["name"] for layer in graph.layers
                 if layer["class_name"] == "TemporalImageAttention"]
    if len(initial) != 2 or len(attention) != 1:
        raise graph.not_the_notebooks("no LSTM started from (h0, c0), or no single "
                                      "TemporalImageAttention")
    gates = [layer["name"] for layer in graph.of_class("Dense")
             if layer["config"]["activation"] == "sigmoid"]
    dense = [layer["name"] for layer in graph.of_class("Dense")
             if layer["config"]["activation"] == "relu"]
    (output,) = graph.outputs
    if len(gates) != 1 or len(dense) != 1:
        raise graph.not_the_notebooks("no single sigmoid gate and relu Dense")
    params = {
        **_dense(model, image_dense, "decoder.image_dense"),
        **_dense(model, initial[0], "decoder.init_h"),
        **_dense(model, initial[1], "decoder.init_c"),
        "decoder.embedding": model.weights(embedding, 1)[0],
        **_lstm(model, lstm),
        **_dense(model, gates[0], "decoder.gate"),
        **_dense(model, dense[0], "decoder.dense"),
        **_dense(model, output, "decoder.output"),
    }
    for child in ("W_img", "W_txt", "V"):
        kernel, bias = model.weights(attention[0], 2, child)
        params.update({f"decoder.attention.{child}.kernel": kernel,
                       f"decoder.attention.{child}.bias": bias})
    cfg = V2DecoderConfig(
        vocab_size=int(graph.layer(embedding)["config"]["input_dim"]),
        feature_dim=int(feature_dim), patches=int(patches), dim=_units(graph, lstm),
        dropout=_dropout_after(graph, dense[0]))
    return cfg, params, int(_input_shapes(graph)[caption_input][0])


def keras_config(family: str, decoder: V1DecoderConfig | V2DecoderConfig, max_len: int,
                 inception: InceptionConfig | None) -> V1Config | V2Config:
    """The lensjax configuration of an imported decoder; named after the notebook's preset
    when it is one."""
    from lensjax.models.families import family_named

    kind = V1Config if family == "v1" else V2Config
    cfg = kind(decoder, encoder=inception, max_len=max_len)
    for name, preset in family_named(family).presets.items():
        if dataclasses.replace(preset, encoder=inception, max_len=max_len) == \
                dataclasses.replace(cfg, preset=preset.preset):
            return dataclasses.replace(cfg, preset=name)
    return cfg


def _inception_params(path: Path) -> tuple[Params, InceptionConfig]:
    """InceptionV3 from keras.applications' `.h5` weights or a torchvision state dict."""
    from bridge.inception import keras_params, torchvision_params
    from bridge.io import read_state_dict, resolve_weights_file
    from bridge.keras_h5 import read_keras_weights

    if path.suffix.lower() in (".h5", ".hdf5"):
        return keras_params(read_keras_weights(path)), InceptionConfig()
    return (torchvision_params(read_state_dict(resolve_weights_file(path))),
            InceptionConfig(count_pad=True))


def import_keras(family: str, keras: str | os.PathLike, vocab: str | os.PathLike,
                 inception: str | os.PathLike | None = None, *, log=None):
    """A v1/v2 notebook's `best_model.keras` and its vocabulary file (one word per line, as
    `vectorizer.get_vocabulary()` lists them), optionally with InceptionV3 weights ->
    a ready `CaptionModel` whose checkpoint carries the vocabulary. BridgeError naming the
    file for anything that does not fit."""
    from bridge.convert import _provenance
    from bridge.io import count_non_finite
    from lensjax.api import CaptionModel
    from lensjax.data.word_vocab import VocabularyError, WordVocabulary
    from lensjax.params import build_captioner

    say = log or (lambda message: None)
    if family not in ("v1", "v2"):
        raise BridgeError(f"a Keras import is v1 or v2, not {family!r}")
    keras, vocab = Path(keras), Path(vocab)
    model = read_keras_model(keras)
    try:
        decoder, params, max_len = (v1_params if family == "v1" else v2_params)(model)
    except (KeyError, IndexError, ValueError, StopIteration, TypeError) as error:
        # a graph or layer settings unlike the notebook's, found by a lookup that failed
        raise model.graph.not_the_notebooks(f"{type(error).__name__}: {error}") from None
    say(f"read {keras}: the {family} notebook's model, vocabulary {decoder.vocab_size}, "
        f"captions of {max_len} words")
    try:
        words = WordVocabulary.read(vocab)
    except (VocabularyError, UnicodeDecodeError) as error:
        raise BridgeError(f"{vocab}: {error}") from None
    if len(words) != decoder.vocab_size:
        raise BridgeError(f"{vocab} lists {len(words)} words but the model's embedding has "
                          f"{decoder.vocab_size} rows: the vocabulary of another model?")
    decoder = dataclasses.replace(decoder, start_id=words.start_id, end_id=words.end_id)
    components: dict[str, Any] = {
        "decoder": {"source": str(keras), "sha256": _sha256(keras), "format": "keras"},
        "vocabulary": {"source": str(vocab), "sha256": _sha256(vocab), "words": len(words)},
        "encoder": {"status": "absent"},
    }
    encoder_cfg = None
    if inception is not None:
        inception = Path(inception)
        encoder, encoder_cfg = _inception_params(inception)
        params.update({f"encoder.{k}": v for k, v in encoder.items()})
        components["encoder"] = {"source": str(inception), "sha256": _sha256(inception),
                                 "count_pad": encoder_cfg.count_pad}
        source = "torchvision" if encoder_cfg.count_pad else "Keras"
        say(f"read {inception}: InceptionV3 ({source} weights)")
    bad = [name for name, value in params.items() if count_non_finite(value)]
    if bad:
        raise BridgeError(f"NaN or infinite weights in {', '.join(bad[:4])}")
    cfg = keras_config(family, decoder, max_len, encoder_cfg)
    metadata = {"components": components, "tokenizer": words.to_metadata(),
                "provenance": {**_provenance(), "phase": None}}
    return CaptionModel(build_captioner(cfg, params), metadata)


def inception_model(family: str, inception: str | os.PathLike):
    """A `CaptionModel` of `family`'s full-size preset around imported InceptionV3 weights,
    for feature extraction (`python -m lensjax.extract --family v1|v2 --inception FILE`): only
    its encoder is meant to run; the decoder is freshly initialised."""
    from lensjax.api import CaptionModel
    from lensjax.models.families import family_named
    from lensjax.params import build_captioner, flat_params, new_module

    inception = Path(inception)
    encoder, encoder_cfg = _inception_params(inception)
    cfg = dataclasses.replace(family_named(family).presets[family], encoder=encoder_cfg)
    params = {p: np.asarray(v) for p, v in flat_params(new_module(
        dataclasses.replace(cfg, encoder=None))).items()}
    params.update({f"encoder.{k}": v for k, v in encoder.items()})
    return CaptionModel(build_captioner(cfg, params), {"components": {
        "encoder": {"source": str(inception), "sha256": _sha256(inception)},
        "decoder": {"status": "random"}}})
