"""Image loading: identical to LensToWords' torchvision preprocessing, robust to odd files."""

import os
import socket
import threading

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from lensjax.data.images import (
    ImageError,
    escape_text,
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
    ("missing.jpg", "cannot be read"),
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
    assert [p.name for p in find_images([tmp_path]).paths] == ["a.png", "b.jpg"]
    assert [p.name for p in find_images([tmp_path], recursive=True).paths] == [
        "a.png", "b.jpg", "c.webp"]
    assert [p.name for p in find_images([str(tmp_path / "*.jpg")]).paths] == ["b.jpg"]
    assert [p.name for p in find_images([str(tmp_path / "**/*.webp")], recursive=True).paths
            ] == ["c.webp"]
    assert [p.name for p in find_images([tmp_path / "notes.txt"]).paths] == ["notes.txt"]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        find_images([str(tmp_path / "*.tiff")])


def _in_a_thread(function, timeout=10.0):
    """function() in a daemon thread -> its result, or its exception raised here; fails
    (instead of hanging) after `timeout` seconds."""
    outcome = []

    def call():
        try:
            outcome.append((True, function()))
        except Exception as error:
            outcome.append((False, error))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout:.0f}s"
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def test_non_regular_files_are_skipped_without_being_opened(tmp_path):
    """Issue item 1: a FIFO named *.png blocked the whole run in open(); only regular files
    are images, the rest are named as skipped, whether found in a folder or named."""
    _photo(32, 32).save(tmp_path / "good.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.jpg").mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "socket.jpg"))
        found = _in_a_thread(lambda: find_images([tmp_path]))
        named = _in_a_thread(lambda: find_images([tmp_path / "pipe.png", "/dev/null"]))
    assert [p.name for p in found.paths] == ["good.png"]
    assert [str(e) for e in found.skipped] == [
        f"{tmp_path / 'folder.jpg'}: a folder, not an image file; skipped without opening it",
        f"{tmp_path / 'pipe.png'}: a FIFO (named pipe), not an image file; skipped without "
        "opening it",
        f"{tmp_path / 'socket.jpg'}: a socket, not an image file; skipped without opening it"]
    assert named.paths == [] and "a character device" in str(named.skipped[1])
    with pytest.raises(ImageError, match="pipe.png: a FIFO"):
        _in_a_thread(lambda: load_image(tmp_path / "pipe.png"))
    results = _in_a_thread(lambda: list(load_images_in_background(
        [tmp_path / "pipe.png", tmp_path / "good.png"], threads=1)))
    assert isinstance(results[0][1], ImageError) and results[1][1].shape == (224, 224, 3)


def test_symlink_loops_and_repeated_inputs_give_each_file_once(tmp_path):
    """Issue item 8: a recursive glob through a link loop returned one file 41 times; inputs
    are deduplicated by real path (the first path given is kept) and loops end."""
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    _photo(32, 32).save(photos / "a.png")
    _photo(32, 32).save(photos / "sub" / "b.png")
    os.symlink(photos, photos / "sub" / "loop")  # one loop: glob.glob went 40 levels deep
    os.symlink(photos / "a.png", photos / "link.png")
    pattern = str(photos / "**" / "*.png")
    assert find_images([pattern], recursive=True).paths == [photos / "a.png",
                                                             photos / "sub" / "b.png"]
    assert find_images([photos], recursive=True).paths == [photos / "a.png",
                                                           photos / "sub" / "b.png"]
    assert find_images([photos / "link.png", photos, photos / "a.png"]).paths == [
        photos / "link.png"]


def test_background_threads_never_keep_the_process_alive(tmp_path):
    """Issue item 9: decoding threads are daemons, and stop when the consumer stops early."""
    _photo(32, 32).save(tmp_path / "a.png")
    before = set(threading.enumerate())
    loader = load_images_in_background([tmp_path / "a.png"] * 8, threads=3, prefetch=2)
    next(loader)
    started = [t for t in threading.enumerate() if t not in before]
    assert len(started) == 3 and all(thread.daemon for thread in started)
    loader.close()
    for thread in started:
        thread.join(5)
    assert not any(thread.is_alive() for thread in started)


def test_escape_text_keeps_one_line_per_value():
    """Issue item 11: a TAB or newline in a file name split a printed line in two."""
    name = os.fsdecode(b"caf\xe9 a\tb\nc\\d\r\x1b\xe2\x80\xa8\xc3\xa9.png")
    assert escape_text(name) == "caf\\xe9 a\\tb\\nc\\\\d\\r\\x1b\\u2028\u00e9.png"
    assert escape_text("a dog on the grass") == "a dog on the grass"


def test_decoding_threads_leave_the_warning_filters_as_they_were(tmp_path):
    """open_rgb turns PIL's bomb warning into an error inside `warnings.catch_warnings`,
    which swaps a process-wide list: unserialised threads could leave the filter behind."""
    import warnings

    _bad_files(tmp_path)
    before = list(warnings.filters)
    names = ["good.jpg", "bomb.png", "notes.jpg"] * 20
    results = list(load_images_in_background([tmp_path / n for n in names], threads=8,
                                             prefetch=8))
    assert len(results) == len(names)
    assert warnings.filters == before
