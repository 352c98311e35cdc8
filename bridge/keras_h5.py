"""Keras weight files read with h5py alone: no TensorFlow, no Keras, no code from the file.

Two layouts hold a model's weights by layer name:

- Keras 3 (`model.save_weights("x.weights.h5")`, and `model.weights.h5` inside a `.keras`
  archive): `layers/<key>/vars/<i>`, each layer's variables in creation order. The keys are
  not the layers' names: they count each class in `model.layers` order (`conv2d`,
  `conv2d_1`, ...), which for a functional model is Keras' order by graph depth, so they
  are read against the model's `config.json` (a `.keras` archive's);
- legacy HDF5 (Keras 2 and `keras.applications`' files such as
  `inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5`, also the `model_weights`
  group of a whole-model `.h5`): the root's `layer_names` attribute, each layer group's
  `weight_names` attribute in order.

`bridge.inception` maps InceptionV3's layers of such a file onto lensjax's.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from bridge.io import BridgeError

LayerWeights = dict[str, list[np.ndarray]]
LEGACY, KERAS3 = "legacy", "keras3"


@dataclasses.dataclass(frozen=True)
class KerasWeights:
    """{key: [its weight arrays in order]} of a file (layers without weights left out), and
    its layout: LEGACY (keys are the layers' names) or KERAS3 (keys count each class in
    `model.layers` order)."""

    layers: LayerWeights
    layout: str


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_keras_weights(path: str | os.PathLike) -> KerasWeights:
    """The weights of a Keras weights file, either layout; BridgeError naming the file when
    it is neither."""
    import h5py

    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise BridgeError(f"{path}: not an HDF5 file ({error})") from None
    with handle as root:
        if "model_weights" in root:  # a whole-model legacy .h5
            root = root["model_weights"]
        if "layer_names" in root.attrs:
            layers: LayerWeights = {}
            for name in map(_text, root.attrs["layer_names"]):
                group = root[name]
                names = [_text(n) for n in group.attrs.get("weight_names", [])]
                if names:
                    layers[name] = [np.asarray(group[n]) for n in names]
            return KerasWeights(layers, LEGACY)
        if "layers" in root:
            layers = {}
            for name, group in root["layers"].items():
                variables = group.get("vars")
                if variables is not None and len(variables):
                    layers[name] = [np.asarray(variables[str(i)])
                                    for i in range(len(variables))]
            return KerasWeights(layers, KERAS3)
    raise BridgeError(f"{path}: neither a Keras 3 weights file (layers/...) nor a legacy "
                      "Keras HDF5 weights file (layer_names)")
