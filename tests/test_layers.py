"""The shared building blocks against their torch counterparts."""

import numpy as np
import pytest
import torch
from flax import nnx

from bridge.tables import LINEAR, QKV_BIAS, QKV_WEIGHT
from conftest import assert_parity
from lensjax.models.layers import MultiheadAttention, adaptive_avg_pool2d, adaptive_pool_matrix


@pytest.mark.parametrize("size_in,size_out", [(7, 8), (14, 8), (28, 8), (5, 3), (8, 8), (3, 8)])
def test_adaptive_avg_pool_matches_torch_windows(size_in, size_out):
    x = torch.randn(2, 4, size_in, size_in + 1)
    expected = torch.nn.AdaptiveAvgPool2d((size_out, size_out))(x).permute(0, 2, 3, 1)
    actual = adaptive_avg_pool2d(x.permute(0, 2, 3, 1).numpy(), (size_out, size_out))
    assert_parity(actual, expected)


def test_adaptive_pool_7_to_8_overlaps():
    matrix = adaptive_pool_matrix(7, 8)
    assert (matrix > 0).sum(axis=1).tolist() == [1, 2, 2, 2, 2, 2, 2, 1]
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)


def test_multihead_attention_matches_torch():
    torch_mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        torch_mha.in_proj_bias.normal_()
    flax_mha = MultiheadAttention(32, 4, rngs=nnx.Rngs(0))
    q, k, v = QKV_WEIGHT.to_flax(torch_mha.in_proj_weight.detach().numpy())
    qb, kb, vb = QKV_BIAS.to_flax(torch_mha.in_proj_bias.detach().numpy())
    for layer, kernel, bias in ((flax_mha.q, q, qb), (flax_mha.k, k, kb), (flax_mha.v, v, vb)):
        layer.kernel.set_value(kernel)
        layer.bias.set_value(bias)
    (out_kernel,) = LINEAR.to_flax(torch_mha.out_proj.weight.detach().numpy())
    flax_mha.out.kernel.set_value(out_kernel)
    flax_mha.out.bias.set_value(torch_mha.out_proj.bias.detach().numpy())
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    expected = torch_mha(x, context, context)[0]
    assert_parity(flax_mha(x.numpy(), context.numpy()), expected)


@pytest.mark.parametrize("kernel_size,shape", [(7, (2, 9, 11, 5)), (3, (1, 4, 4, 3)),
                                               (7, (2, 3, 2, 4))])
def test_depthwise_conv_and_its_gradients_match_torch(kernel_size, shape):
    import jax
    import jax.numpy as jnp

    from lensjax.models.layers import DepthwiseConv2d

    channels = shape[-1]
    conv = torch.nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                           groups=channels).double()
    x = torch.randn(*shape, dtype=torch.float64)
    upstream = torch.randn(*shape, dtype=torch.float64)
    x_nchw = x.permute(0, 3, 1, 2).requires_grad_()
    out = conv(x_nchw)
    (out.permute(0, 2, 3, 1) * upstream).sum().backward()

    layer = DepthwiseConv2d(channels, kernel_size, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.asarray(conv.weight.detach().permute(2, 3, 1, 0).numpy(),
                                    jnp.float32)  # OIHW -> HWIO
    layer.bias[...] = jnp.asarray(conv.bias.detach().numpy(), jnp.float32)
    with jax.default_matmul_precision("highest"):
        actual = layer(jnp.asarray(x.numpy(), jnp.float32))
        grad_x, grads = jax.grad(
            lambda x, layer: jnp.sum(layer(x) * jnp.asarray(upstream.numpy(), jnp.float32)),
            argnums=(0, 1))(jnp.asarray(x.numpy(), jnp.float32), layer)
    assert_parity(actual, out.permute(0, 2, 3, 1))
    assert_parity(grad_x, x_nchw.grad.permute(0, 2, 3, 1))
    assert_parity(grads.kernel[...], conv.weight.grad.permute(2, 3, 1, 0))
    assert_parity(grads.bias[...], conv.bias.grad)
