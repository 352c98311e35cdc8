"""InceptionV3 (the v1/v2 image encoder) against keras.applications.InceptionV3 with random
weights and random BatchNormalization statistics: mixed10 and the pooled vector, and the
"same" average pooling that leaves the padding out of each window's count."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from lensjax.models.inception import CONVS, InceptionV3, avg_pool_same, preprocess


def _by_creation(layers, kind):
    """Keras layers of one kind in creation order (conv2d, conv2d_1, ...)."""
    chosen = [layer for layer in layers if type(layer).__name__ == kind]

    def number(layer):
        match = re.search(r"_(\d+)$", layer.name)
        return int(match.group(1)) if match else 0

    return sorted(chosen, key=number)


def test_same_average_pool_counts_only_pixels_inside():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    out = np.asarray(avg_pool_same(x))[0, :, :, 0]
    assert out[0, 0] == pytest.approx(np.mean([0, 1, 4, 5]))  # a corner: 4 pixels
    assert out[1, 1] == pytest.approx(np.mean([0, 1, 2, 4, 5, 6, 8, 9, 10]))


@pytest.mark.slow
def test_mixed10_and_pooled_equal_keras_inceptionv3():
    keras = pytest.importorskip("keras")
    reference = keras.applications.InceptionV3(weights=None, include_top=False)
    rng = np.random.default_rng(0)
    convs = _by_creation(reference.layers, "Conv2D")
    norms = _by_creation(reference.layers, "BatchNormalization")
    assert len(convs) == len(norms) == len(CONVS)
    model = InceptionV3(rngs=nnx.Rngs(0))
    for ours, conv, norm in zip(model.convs, convs, norms, strict=True):
        (kernel,) = conv.get_weights()
        beta, mean, variance = norm.get_weights()  # scale=False: no gamma
        beta = rng.normal(0, 0.1, beta.shape).astype(np.float32)
        mean = rng.normal(0, 0.1, mean.shape).astype(np.float32)
        variance = rng.uniform(0.5, 1.5, variance.shape).astype(np.float32)
        norm.set_weights([beta, mean, variance])
        assert ours.kernel.shape == kernel.shape
        ours.kernel[...] = kernel
        ours.beta[...], ours.mean[...], ours.variance[...] = beta, mean, variance
    pixels = rng.uniform(0, 255, (2, 299, 299, 3)).astype(np.float32)
    inputs = np.asarray(preprocess(pixels))
    expected = reference.predict(inputs, verbose=0)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(nnx.jit(lambda m, x: m(x))(model, inputs))
        pooled = np.asarray(nnx.jit(lambda m, x: m.pooled(x))(model, inputs))
        patches = np.asarray(nnx.jit(lambda m, x: m.patches(x))(model, inputs))
    assert got.shape == expected.shape == (2, 8, 8, 2048) and expected.std() > 1e-2
    tolerance = 1e-4 * (1 + np.abs(expected).max())
    np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0)
    np.testing.assert_allclose(pooled, expected.mean(axis=(1, 2)), atol=tolerance, rtol=0)
    np.testing.assert_array_equal(patches, got.reshape(2, 64, 2048))


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    """A random-weight Keras InceptionV3 saved in both weights layouts."""
    keras = pytest.importorskip("keras")
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    root = tmp_path_factory.mktemp("inception")
    model = keras.applications.InceptionV3(weights=None, include_top=False)
    model.save_weights(root / "new.weights.h5")
    with h5py.File(root / "legacy.h5", "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    convs = _by_creation(model.layers, "Conv2D")
    norms = _by_creation(model.layers, "BatchNormalization")
    return root, [c.get_weights()[0] for c in convs], [n.get_weights() for n in norms]


def test_keras_weight_files_map_onto_the_convs_in_creation_order(keras_files):
    from bridge.inception import keras_params
    from bridge.keras_h5 import read_keras_weights

    root, kernels, stats = keras_files
    params = keras_params(read_keras_weights(root / "legacy.h5"))
    assert len(params) == 4 * len(CONVS)
    for index, (kernel, (beta, mean, variance)) in enumerate(zip(kernels, stats, strict=True)):
        np.testing.assert_array_equal(params[f"convs.{index}.kernel"], kernel)
        np.testing.assert_array_equal(params[f"convs.{index}.beta"], beta)
        np.testing.assert_array_equal(params[f"convs.{index}.mean"], mean)
        np.testing.assert_array_equal(params[f"convs.{index}.variance"], variance)
    model = InceptionV3(rngs=nnx.Rngs(0))
    ours = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(model))}
    assert {p: v.shape for p, v in ours.items()} == {p: v.shape for p, v in params.items()}


def test_keras_weight_files_that_do_not_fit_are_refused(keras_files, tmp_path):
    import h5py

    from bridge.inception import keras_params
    from bridge.io import BridgeError
    from bridge.keras_h5 import read_keras_weights

    root, _, _ = keras_files
    with pytest.raises(BridgeError, match="position in model.layers"):
        keras_params(read_keras_weights(root / "new.weights.h5"))
    weights = read_keras_weights(root / "legacy.h5")
    # Keras numbers layer names per process, so the file's names depend on what ran before.
    del weights.layers[next(n for n in weights.layers if n.startswith("conv2d"))]
    with pytest.raises(BridgeError, match="93 and 94"):
        keras_params(weights)
    weights = read_keras_weights(root / "legacy.h5")
    norm = next(n for n in weights.layers if n.startswith("batch_normalization"))
    weights.layers[norm] = [np.ones(3), *weights.layers[norm]]  # with a scale
    with pytest.raises(BridgeError, match="no scale"):
        keras_params(weights)
    h5py.File(tmp_path / "other.h5", "w").create_dataset("x", data=np.zeros(3))
    with pytest.raises(BridgeError, match="neither"):
        read_keras_weights(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(BridgeError, match="not an HDF5 file"):
        read_keras_weights(tmp_path / "text.h5")


def _load(model: InceptionV3, params: dict) -> InceptionV3:
    for index, conv in enumerate(model.convs):
        for name in ("kernel", "beta", "mean", "variance"):
            getattr(conv, name)[...] = params[f"convs.{index}.{name}"]
    return model


@pytest.mark.slow
def test_torchvision_weights_give_torchvisions_mixed_7c_with_counted_padding():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from bridge.inception import torchvision_params

    reference = torchvision.models.inception_v3(weights=None, aux_logits=False,
                                                init_weights=False, transform_input=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    reference.eval()
    captured = {}
    reference.Mixed_7c.register_forward_hook(lambda m, i, o: captured.update(out=o))
    rng = np.random.default_rng(0)
    inputs = np.asarray(preprocess(rng.uniform(0, 255, (2, 299, 299, 3)).astype(np.float32)))
    with torch.no_grad():
        reference(torch.from_numpy(inputs.transpose(0, 3, 1, 2).copy()))
    expected = captured["out"].numpy().transpose(0, 2, 3, 1)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    params = torchvision_params(state)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(nnx.jit(lambda m, x: m(x))(
            _load(InceptionV3(rngs=nnx.Rngs(0), count_pad=True), params), inputs))
        # TensorFlow's pooling on the same weights differs: the source decides the pooling.
        tf_pooling = np.asarray(nnx.jit(lambda m, x: m(x))(
            _load(InceptionV3(rngs=nnx.Rngs(0)), params), inputs))
    assert expected.shape == (2, 8, 8, 2048) and expected.std() > 1e-2
    tolerance = 1e-4 * (1 + np.abs(expected).max())
    np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0)
    assert np.abs(tf_pooling - expected).max() > 10 * tolerance
    from bridge.io import BridgeError

    del state["Mixed_6b.branch7x7_2.bn.running_var"]
    with pytest.raises(BridgeError, match="missing Mixed_6b.branch7x7_2.bn.running_var"):
        torchvision_params(state)
