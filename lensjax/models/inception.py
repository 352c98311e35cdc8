"""InceptionV3 in the layout of `keras.applications.InceptionV3`: the image encoder of
LensToWords v1 (its pooled 2048-d vector, `layers[-2]` of the full model) and v2 (`mixed10`,
8x8x2048, reshaped row-major to (64, 2048)).

Every convolution is Keras' `conv2d_bn`: a bias-free convolution ("same" padding unless
"valid"), BatchNormalization without scale (gamma fixed at 1, epsilon 1e-3, inference
statistics) and ReLU. The 94 of them are kept in `convs` in the order Keras creates them
(its `conv2d`, `conv2d_1`, ... and `batch_normalization`, ...), which is how a weights file
maps onto them. Average pools inside the blocks are TensorFlow's "same" pooling, which
leaves the padding out of each window's count (Keras' weights need this); torchvision's
`inception_v3` pools with `count_include_pad=True` instead (`InceptionV3(count_pad=True)`,
for its weights). Inputs are 299x299 RGB scaled as `x / 127.5 - 1` (`preprocess`; what
torchvision's `transform_input=True` makes of ImageNet-normalised pixels too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from lensjax.models import init

IMAGE_SIZE = 299
BN_EPSILON = 1e-3


def _block(out: int, kh: int, kw: int, stride: int = 1, padding: str = "SAME"
           ) -> tuple[int, int, int, int, str]:
    return (out, kh, kw, stride, padding)


def _mixed_35(pool: int) -> list:
    """mixed0-2: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
    return [_block(64, 1, 1), _block(48, 1, 1), _block(64, 5, 5), _block(64, 1, 1),
            _block(96, 3, 3), _block(96, 3, 3), _block(pool, 1, 1)]


def _mixed_17(width: int) -> list:
    """mixed4-7: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""
    return [_block(192, 1, 1), _block(width, 1, 1), _block(width, 1, 7), _block(192, 7, 1),
            _block(width, 1, 1), _block(width, 7, 1), _block(width, 1, 7),
            _block(width, 7, 1), _block(192, 1, 7), _block(192, 1, 1)]


def _mixed_8() -> list:
    """mixed9-10: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | avgpool-1x1."""
    return [_block(320, 1, 1), _block(384, 1, 1), _block(384, 1, 3), _block(384, 3, 1),
            _block(448, 1, 1), _block(384, 3, 3), _block(384, 1, 3), _block(384, 3, 1),
            _block(192, 1, 1)]


# (filters, kernel rows, kernel cols, stride, padding) of every conv2d_bn, in Keras' order.
CONVS: tuple[tuple[int, int, int, int, str], ...] = tuple([
    _block(32, 3, 3, 2, "VALID"), _block(32, 3, 3, 1, "VALID"), _block(64, 3, 3),
    _block(80, 1, 1, 1, "VALID"), _block(192, 3, 3, 1, "VALID"),
    *_mixed_35(32), *_mixed_35(64), *_mixed_35(64),
    _block(384, 3, 3, 2, "VALID"), _block(64, 1, 1), _block(96, 3, 3),
    _block(96, 3, 3, 2, "VALID"),
    *_mixed_17(128), *_mixed_17(160), *_mixed_17(160), *_mixed_17(192),
    _block(192, 1, 1), _block(320, 3, 3, 2, "VALID"), _block(192, 1, 1), _block(192, 1, 7),
    _block(192, 7, 1), _block(192, 3, 3, 2, "VALID"),
    *_mixed_8(), *_mixed_8(),
])


class ConvBN(nnx.Module):
    """Keras' conv2d_bn at inference: params `kernel` (kh, kw, in, out) (Keras' and Flax's
    HWIO), `beta`, `mean`, `variance` (out,)."""

    def __init__(self, n_in: int, spec: tuple[int, int, int, int, str], *, rngs: nnx.Rngs):
        out, kh, kw, self.stride, self.padding = spec
        self.kernel = nnx.Param(init.glorot_uniform()(rngs.params(), (kh, kw, n_in, out)))
        self.beta = nnx.Param(init.zeros(None, (out,)))
        self.mean = nnx.Param(init.zeros(None, (out,)))
        self.variance = nnx.Param(init.ones(None, (out,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, in) -> (B, H', W', out)."""
        y = lax.conv_general_dilated(x, self.kernel[...], (self.stride, self.stride),
                                     self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        scale = lax.rsqrt(self.variance[...] + BN_EPSILON)
        return jax.nn.relu((y - self.mean[...]) * scale + self.beta[...])


def max_pool(x: jax.Array) -> jax.Array:
    """3x3, stride 2, "valid" max pooling. (B, H, W, C) -> (B, (H-3)//2+1, ...)."""
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


def avg_pool_same(x: jax.Array, count_pad: bool = False) -> jax.Array:
    """3x3, stride 1, "same" average pooling. By default it counts only the pixels inside
    the image (TensorFlow's); `count_pad` divides every window by 9 (torch's
    `avg_pool2d(..., padding=1)`, `count_include_pad=True`)."""
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, "SAME")
    if count_pad:
        return total / 9.0
    count = lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, lax.add, window,
                              strides, "SAME")
    return total / count


def preprocess(images: np.ndarray | jax.Array) -> jax.Array:
    """RGB pixels 0-255 (B, 299, 299, 3) -> Keras' InceptionV3 input, `x / 127.5 - 1`."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def from_imagenet_normalised(images: jax.Array) -> jax.Array:
    """lensjax's image input (pixels / 255, ImageNet-normalised, as `lensjax.data.images`
    loads every file) -> InceptionV3's `x / 127.5 - 1`: 2 (x std + mean) - 1."""
    from lensjax.data.images import IMAGENET_MEAN, IMAGENET_STD

    return 2.0 * (images * IMAGENET_STD + IMAGENET_MEAN) - 1.0


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """v1/v2's encoder in a model configuration. `count_pad`: the block average pools count
    the padding, as torchvision's weights need (Keras' need it False)."""

    count_pad: bool = False


class InceptionV3(nnx.Module):
    """The feature extractor: `__call__` gives `mixed10` (B, 8, 8, 2048) for 299x299 inputs;
    `pooled` its spatial mean (B, 2048) (v1); `patches` the (B, 64, 2048) rows (v2)."""

    def __init__(self, *, rngs: nnx.Rngs, count_pad: bool = False):
        """`count_pad`: the block average pools count the padding (torchvision's weights)."""
        self.count_pad = count_pad
        self.convs = nnx.List([ConvBN(n_in, spec, rngs=rngs)
                               for n_in, spec in zip(input_widths(), CONVS, strict=True)])

    def __call__(self, x: jax.Array) -> jax.Array:
        """Preprocessed images (B, H, W, 3) -> mixed10 (B, H', W', 2048)."""
        convs: Iterator[ConvBN] = iter(self.convs)
        return _graph(x, lambda t: next(convs)(t), max_pool,
                      lambda t: avg_pool_same(t, self.count_pad),
                      lambda ts: jnp.concatenate(ts, axis=-1))

    def pooled(self, x: jax.Array) -> jax.Array:
        """(B, 299, 299, 3) -> (B, 2048): Keras' GlobalAveragePooling2D (`avg_pool`)."""
        return jnp.mean(self(x), axis=(1, 2))

    def patches(self, x: jax.Array) -> jax.Array:
        """(B, 299, 299, 3) -> (B, 64, 2048): mixed10 reshaped row-major."""
        out = self(x)
        return out.reshape(out.shape[0], -1, out.shape[-1])


def input_widths() -> list[int]:
    """Each conv's input channels, in `CONVS` order (the graph run on shapes only)."""
    widths: list[int] = []
    specs = iter(CONVS)

    def conv(t):
        out, kh, kw, stride, padding = next(specs)
        widths.append(t.shape[-1])
        return jax.eval_shape(lambda v: lax.conv_general_dilated(
            v, jnp.zeros((kh, kw, v.shape[-1], out)), (stride, stride), padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC")), t)

    _graph(jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32), conv,
           lambda t: jax.eval_shape(max_pool, t), lambda t: jax.eval_shape(avg_pool_same, t),
           lambda ts: jax.eval_shape(lambda *v: jnp.concatenate(v, -1), *ts))
    return widths


def _graph(x, conv, max_pool_, avg_pool_, concat):
    """InceptionV3's graph over pluggable ops; `conv` is called in Keras' creation order."""
    x = conv(conv(conv(x)))
    x = max_pool_(x)
    x = conv(conv(x))
    x = max_pool_(x)
    for _ in range(3):  # mixed0-2
        b1 = conv(x)
        b5 = conv(conv(x))
        b3 = conv(conv(conv(x)))
        x = concat([b1, b5, b3, conv(avg_pool_(x))])
    b3 = conv(x)  # mixed3
    bd = conv(conv(conv(x)))
    x = concat([b3, bd, max_pool_(x)])
    for _ in range(4):  # mixed4-7
        b1 = conv(x)
        b7 = conv(conv(conv(x)))
        bd = conv(conv(conv(conv(conv(x)))))
        x = concat([b1, b7, bd, conv(avg_pool_(x))])
    b3 = conv(conv(x))  # mixed8
    b7 = conv(conv(conv(conv(x))))
    x = concat([b3, b7, max_pool_(x)])
    for _ in range(2):  # mixed9-10
        b1 = conv(x)
        b3 = conv(x)
        b3 = concat([conv(b3), conv(b3)])
        bd = conv(conv(x))
        bd = concat([conv(bd), conv(bd)])
        x = concat([b1, b3, bd, conv(avg_pool_(x))])
    return x


class InceptionEncoding(nnx.Module):
    """Base of v1/v2's captioners: an optional InceptionV3 `encoder` (None when the model
    captions pre-computed features only) whose output `_features` turns into the decoder's
    features (pooled for v1, patches for v2)."""

    def __init__(self, cfg: InceptionConfig | None, *, rngs: nnx.Rngs):
        self.encoder = InceptionV3(rngs=rngs, count_pad=cfg.count_pad) if cfg else None

    def check_can_encode(self) -> None:
        """Raise MissingComponentError unless this model has its InceptionV3."""
        from lensjax.models.encoding import MissingComponentError

        if self.encoder is None:
            raise MissingComponentError(
                "this model has no InceptionV3 encoder, so it cannot encode images; import "
                "one with `python -m bridge import ... --inception WEIGHTS.h5` (or caption "
                "pre-computed features instead)")

    def encode(self, images: jax.Array, *, remat: bool = False) -> jax.Array:
        """ImageNet-normalised NHWC images (B, 299, 299, 3) -> the decoder's features (v1
        (B, 2048), v2 (B, 64, 2048)). `remat` is accepted for the training step's sake."""
        self.check_can_encode()
        return self._features(from_imagenet_normalised(images))
