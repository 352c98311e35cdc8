"""Image loading: identical to LensToWords' torchvision preprocessing, robust to odd files."""

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from lensjax.data.images import (
    ImageError,
    find_images,
    load_image,
    load_images_in_background,
    open_rgb,
)

TORCHVISION = transforms.Compose([
    transforms.Resize((224, 224)),
    transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])


def _photo(width=320, height=240, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    noise = rng.integers(0, 60, (height, width, 3))
    return Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(320, 240), (150, 400), (224, 224), (1000, 50)])
def test_preprocessing_equals_torchvision(tmp_path, size):
    path = tmp_path / "photo.png"
    _photo(*size).save(path)
    expected = TORCHVISION(Image.open(path).convert("RGB")).permute(1, 2, 0).numpy()
    actual = load_image(path)
    assert actual.shape == (224, 224, 3) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_other_modes_become_rgb(tmp_path, mode):
    image = _photo().convert(mode) if mode != "I;16" else Image.fromarray(
        (np.arange(240 * 320).reshape(240, 320) % 65536).astype(np.uint16))
    suffix = "jpg" if mode == "CMYK" else "tiff" if mode == "LA" else "png"
    path = tmp_path / f"image.{suffix}"
    image.save(path)
    rgb = open_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (320, 240)
    if mode == "I;16":
        assert np.asarray(rgb).max() > 200  # scaled from 16 bits, not clipped to white/black


@pytest.mark.parametrize("suffix", ["webp", "bmp", "tiff", "gif"])
def test_other_formats_load(tmp_path, suffix):
    path = tmp_path / f"image.{suffix}"
    _photo().save(path)
    assert load_image(path).shape == (224, 224, 3)


def test_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(open_rgb(tmp_path / "anim.gif"))[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(tmp_path):
    image = _photo(320, 240)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_rgb(tmp_path / "rotated.jpg").size == (240, 320)


def _bad_files(tmp_path):
    good = tmp_path / "good.jpg"
    _photo().save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image at all")
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(5000))
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")
    return good


@pytest.mark.parametrize("name,reason", [
    ("truncated.jpg", "cannot be decoded"),
    ("empty.jpg", "not an image file"),
    ("notes.jpg", "not an image file"),
    ("random.png", "not an image file"),
    ("bomb.png", "decompression bomb"),
    ("missing.jpg", "cannot be decoded"),
])
def test_bad_files_raise_image_error_naming_file(tmp_path, name, reason):
    _bad_files(tmp_path)
    with pytest.raises(ImageError, match=rf"{name}.*{reason}"):
        load_image(tmp_path / name)


def test_background_loading_keeps_order_and_reports_bad_files(tmp_path):
    _bad_files(tmp_path)
    names = ["good.jpg", "empty.jpg", "good.jpg", "bomb.png", "missing.jpg", "good.jpg"]
    results = list(load_images_in_background([tmp_path / n for n in names], threads=3,
                                             prefetch=2))
    assert [p.name for p, _ in results] == names
    kinds = [isinstance(r, ImageError) for _, r in results]
    assert kinds == [False, True, False, True, True, False]
    expected = TORCHVISION(Image.open(tmp_path / "good.jpg").convert("RGB"))
    np.testing.assert_allclose(results[0][1], expected.permute(1, 2, 0).numpy(), atol=1e-6)


def test_find_images_files_folders_and_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.png", "notes.txt", "sub/c.webp"):
        _photo(32, 32).save(tmp_path / name, format="PNG") if not name.endswith(
            ".txt") else (tmp_path / name).write_text("x")
    assert [p.name for p in find_images([tmp_path])] == ["a.png", "b.jpg"]
    assert [p.name for p in find_images([tmp_path], recursive=True)] == ["a.png", "b.jpg",
                                                                        "c.webp"]
    assert [p.name for p in find_images([str(tmp_path / "*.jpg")])] == ["b.jpg"]
    assert [p.name for p in find_images([tmp_path / "notes.txt"])] == ["notes.txt"]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        find_images([str(tmp_path / "*.tiff")])
