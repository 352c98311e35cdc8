"""InceptionV3's weights (v1/v2's encoder) onto `lensjax.models.inception.InceptionV3`,
from either public source:

- Keras (`keras.applications`' `inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5`,
  read by `bridge.keras_h5`): its 94 Conv2D and scale-free BatchNormalization layers by
  their own names (`conv2d`, `conv2d_1`, ..., or `conv2d_1` ... `conv2d_94` in Keras 2's
  files), which count in creation order; the model takes them as they are
  (`InceptionV3()`, TensorFlow's average pooling);
- torchvision (`inception_v3` state dicts): each `BasicConv2d` by its module name; its
  BatchNorm's scale gamma is folded into the kernel and the mean (`gamma (conv(x) - mean)
  = conv'(x) - mean'`), so the model needs no scale; its block average pools count the
  padding, so it runs as `InceptionV3(count_pad=True)`. The auxiliary classifier and `fc`
  are not the encoder and are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from bridge.io import BridgeError
from bridge.keras_h5 import LEGACY, KerasWeights


def _block(name: str, convs: list[str]) -> list[str]:
    return [f"{name}.{conv}" for conv in convs]


_A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3", "branch_pool"]
_C = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", *(f"branch7x7dbl_{i}"
                                                                  for i in range(1, 6)),
      "branch_pool"]
_E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
      "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
# torchvision's BasicConv2d modules in Keras' creation order (lensjax's `convs` order).
TORCHVISION_CONVS: tuple[str, ...] = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    *_block("Mixed_5b", _A), *_block("Mixed_5c", _A), *_block("Mixed_5d", _A),
    *_block("Mixed_6a", ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
    *_block("Mixed_6b", _C), *_block("Mixed_6c", _C), *_block("Mixed_6d", _C),
    *_block("Mixed_6e", _C),
    *_block("Mixed_7a", ["branch3x3_1", "branch3x3_2", *(f"branch7x7x3_{i}"
                                                         for i in range(1, 5))]),
    *_block("Mixed_7b", _E), *_block("Mixed_7c", _E),
)


def _expected_shapes() -> list[tuple[int, int, int, int]]:
    from lensjax.models.inception import CONVS, input_widths

    return [(kh, kw, n_in, out) for (out, kh, kw, _, _), n_in in zip(CONVS, input_widths(),
                                                                       strict=True)]


def _creation_order(names: list[str], prefix: str) -> list[str]:
    """Layer names `prefix`, `prefix_1`, ... sorted by their number (no number: 0)."""
    pattern = re.compile(rf"^{re.escape(prefix)}(?:_(\d+))?$")
    found = [(int(m.group(1) or 0), n) for n in names if (m := pattern.match(n))]
    return [name for _, name in sorted(found)]


def keras_params(weights: KerasWeights) -> dict[str, np.ndarray]:
    """A legacy Keras file's InceptionV3 as `InceptionV3` parameters
    (`convs.{i}.kernel|beta|mean|variance`); BridgeError listing what does not fit."""
    if weights.layout != LEGACY:
        raise BridgeError("a Keras 3 weights file keys InceptionV3's layers by their position "
                          "in model.layers, not by name, so which convolution is which "
                          "cannot be told from it: use keras.applications' "
                          "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5, or save "
                          "the model's weights in the legacy HDF5 layout")
    layers = weights.layers
    shapes = _expected_shapes()
    convs = _creation_order(list(layers), "conv2d")
    norms = _creation_order(list(layers), "batch_normalization")
    if len(convs) != len(shapes) or len(norms) != len(shapes):
        raise BridgeError(f"InceptionV3 has {len(shapes)} Conv2D and {len(shapes)} "
                          f"BatchNormalization layers; the file has {len(convs)} and "
                          f"{len(norms)}")
    params: dict[str, np.ndarray] = {}
    problems = []
    for index, (conv, norm, shape) in enumerate(zip(convs, norms, shapes, strict=True)):
        kernel, stats = layers[conv], layers[norm]
        if len(kernel) != 1 or kernel[0].shape != shape:
            problems.append(f"{conv}: expected one kernel {shape}, found "
                            f"{[w.shape for w in kernel]}")
        elif len(stats) != 3 or any(w.shape != (shape[-1],) for w in stats):
            problems.append(f"{norm}: expected beta, moving mean and variance ({shape[-1]},) "
                            f"(no scale), found {[w.shape for w in stats]}")
        else:
            params.update(_conv_params(index, kernel[0], *stats))
    if problems:
        raise BridgeError(f"the InceptionV3 weights do not fit ({len(problems)} problems): "
                          + "; ".join(problems[:4]))
    return params


def torchvision_params(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision's `inception_v3` state dict as `InceptionV3(count_pad=True)` parameters,
    gamma folded into kernel and mean; BridgeError listing what is missing or mis-shaped."""
    shapes = _expected_shapes()
    params: dict[str, np.ndarray] = {}
    problems = []
    for index, (name, (kh, kw, n_in, out)) in enumerate(zip(TORCHVISION_CONVS, shapes,
                                                           strict=True)):
        keys = {"weight": f"{name}.conv.weight", "gamma": f"{name}.bn.weight",
                "beta": f"{name}.bn.bias", "mean": f"{name}.bn.running_mean",
                "variance": f"{name}.bn.running_var"}
        missing = [k for k in keys.values() if k not in state_dict]
        if missing:
            problems += [f"missing {k}" for k in missing]
            continue
        weight = np.asarray(state_dict[keys["weight"]], np.float32)
        if weight.shape != (out, n_in, kh, kw):
            problems.append(f"{keys['weight']}: expected {(out, n_in, kh, kw)}, found "
                            f"{weight.shape}")
            continue
        gamma, beta, mean, variance = (np.asarray(state_dict[keys[k]], np.float32)
                                       for k in ("gamma", "beta", "mean", "variance"))
        kernel = weight.transpose(2, 3, 1, 0) * gamma  # OIHW -> HWIO, gamma per output
        params.update(_conv_params(index, kernel, beta, mean * gamma, variance))
    if problems:
        raise BridgeError(f"the torchvision inception_v3 weights do not fit ({len(problems)} "
                          f"problems): " + "; ".join(problems[:4]))
    return params


def _conv_params(index: int, kernel, beta, mean, variance) -> dict[str, np.ndarray]:
    prefix = f"convs.{index}."
    return {prefix + "kernel": np.asarray(kernel, np.float32),
            prefix + "beta": np.asarray(beta, np.float32),
            prefix + "mean": np.asarray(mean, np.float32),
            prefix + "variance": np.asarray(variance, np.float32)}
