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

`inception_params` maps InceptionV3's 94 Conv2D and 94 scale-free BatchNormalization layers
of a legacy file (the layers' own names: `conv2d`, `conv2d_1`, ... or `conv2d_1` ...
`conv2d_94` in Keras 2's files, in creation order) onto
`lensjax.models.inception.InceptionV3`.
"""

from __future__ import annotations

import dataclasses
import os
import re
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


def _creation_order(names: list[str], prefix: str) -> list[str]:
    """Layer names `prefix`, `prefix_1`, ... sorted by their number (no number: 0)."""
    pattern = re.compile(rf"^{re.escape(prefix)}(?:_(\d+))?$")
    found = [(int(m.group(1) or 0), n) for n in names if (m := pattern.match(n))]
    return [name for _, name in sorted(found)]


def inception_params(weights: KerasWeights) -> dict[str, np.ndarray]:
    """InceptionV3's weights (a legacy file: `keras.applications`' own, or
    `model.save_weights("x.h5")` in Keras 2) as `lensjax.models.inception.InceptionV3`
    parameters (`convs.{i}.kernel|beta|mean|variance`); BridgeError listing what does not
    fit."""
    from lensjax.models.inception import CONVS, input_widths

    if weights.layout != LEGACY:
        raise BridgeError("a Keras 3 weights file keys InceptionV3's layers by their position "
                          "in model.layers, not by name, so which convolution is which "
                          "cannot be told from it: use keras.applications' "
                          "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5, or save "
                          "the model's weights in the legacy HDF5 layout")
    layers = weights.layers

    convs = _creation_order(list(layers), "conv2d")
    norms = _creation_order(list(layers), "batch_normalization")
    if len(convs) != len(CONVS) or len(norms) != len(CONVS):
        raise BridgeError(f"InceptionV3 has {len(CONVS)} Conv2D and {len(CONVS)} "
                          f"BatchNormalization layers; the file has {len(convs)} and "
                          f"{len(norms)}")
    params: dict[str, np.ndarray] = {}
    problems = []
    for index, (conv, norm, spec, n_in) in enumerate(zip(convs, norms, CONVS, input_widths(),
                                                          strict=True)):
        out, kh, kw, _, _ = spec
        kernel = layers[conv]
        if len(kernel) != 1 or kernel[0].shape != (kh, kw, n_in, out):
            problems.append(f"{conv}: expected one kernel {(kh, kw, n_in, out)}, found "
                            f"{[w.shape for w in kernel]}")
            continue
        stats = layers[norm]
        if len(stats) != 3 or any(w.shape != (out,) for w in stats):
            problems.append(f"{norm}: expected beta, moving mean and variance ({out},) "
                            f"(no scale), found {[w.shape for w in stats]}")
            continue
        prefix = f"convs.{index}."
        params[prefix + "kernel"] = kernel[0].astype(np.float32)
        for name, value in zip(("beta", "mean", "variance"), stats, strict=True):
            params[prefix + name] = value.astype(np.float32)
    if problems:
        raise BridgeError(f"the InceptionV3 weights do not fit ({len(problems)} problems): "
                          + "; ".join(problems[:4]))
    return params
