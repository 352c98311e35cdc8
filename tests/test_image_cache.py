"""The decoded-image cache that phases training the encoder read their batches from."""

import numpy as np
from PIL import Image

from lensjax.data.image_cache import ImageCache
from lensjax.data.images import load_image


def test_batches_equal_the_model_input_of_each_file_and_bad_files_are_left_out(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    cache = ImageCache(tmp_path, ["a.png", "b.jpg", "broken.png", "absent.png", "a.png"], 32,
                       progress=False)
    assert len(cache) == 2 and "a.png" in cache and "broken.png" not in cache
    named = sorted(str(p).split(":")[0] for p in cache.problems)
    assert named == [str(tmp_path / "absent.png"), str(tmp_path / "broken.png")]
    assert cache.nbytes == 2 * 32 * 32 * 3
    batch = cache.get_batch(["b.jpg", "a.png", "b.jpg"])
    assert batch.dtype == np.float32 and batch.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(batch[1], load_image(tmp_path / "a.png", 32))
    np.testing.assert_array_equal(batch[0], batch[2])
