"""Tests for hgm_mm.data.images: every Pillow mode becomes the right RGB pixels; bad files are refused."""
import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from hgm_mm.data import ImageError, SkipCounter, load_image, load_images


def _save(img: Image.Image, path, fmt=None, **kwargs):
    img.save(path, fmt, **kwargs)
    return path


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)  # (H, W, 3)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny, useless IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------
# Modes


def test_rgb_jpeg_roundtrip(tmp_path):
    path = _save(Image.new("RGB", (8, 6), (200, 30, 60)), tmp_path / "a.jpg")
    img = load_image(path)
    assert img.size == (8, 6)
    assert np.abs(_pixels(img) - [200, 30, 60]).max() <= 3
    img.close()
    path.unlink()  # the returned image does not hold the file
    assert img.mode == "RGB"


@pytest.mark.parametrize("value, expected", [(0, 0), (32768, 128), (65535, 255), (257 * 100, 100)])
def test_16bit_gray_png_scaled_not_clipped(tmp_path, value, expected):
    src = Image.fromarray(np.full((3, 4), value, dtype=np.uint16))
    assert src.mode == "I;16"
    path = _save(src, tmp_path / "g16.png")
    assert Image.open(path).mode == "I;16"
    assert (_pixels(load_image(path)) == expected).all()


def test_16bit_gradient_keeps_order(tmp_path):
    src = Image.fromarray(np.array([[0, 1000, 30000, 60000, 65535]], dtype=np.uint16))
    row = _pixels(load_image(_save(src, tmp_path / "grad.png")))[0, :, 0]
    assert list(row) == [0, 4, 117, 233, 255]


def test_32bit_int_mode_read_as_16bit(tmp_path):
    src = Image.fromarray(np.array([[0, 32768, 65535, 70000, -5]], dtype=np.int32))
    assert src.mode == "I"
    path = _save(src, tmp_path / "i32.tif")
    assert Image.open(path).mode == "I"
    assert list(_pixels(load_image(path))[0, :, 0]) == [0, 128, 255, 255, 0]


def test_float_mode_on_8bit_scale(tmp_path):
    src = Image.fromarray(np.array([[0.0, 127.6, 255.0, 300.0, -4.0]], dtype=np.float32))
    path = _save(src, tmp_path / "f.tif")
    assert Image.open(path).mode == "F"
    assert list(_pixels(load_image(path))[0, :, 1]) == [0, 128, 255, 255, 0]


@pytest.mark.parametrize("mode, value, expected", [("L", 77, 77), ("1", 1, 255), ("1", 0, 0)])
def test_gray_modes(tmp_path, mode, value, expected):
    path = _save(Image.new(mode, (5, 5), value), tmp_path / f"g_{mode}.png")
    assert Image.open(path).mode == mode
    assert (_pixels(load_image(path)) == expected).all()


def test_palette_with_transparency_composited_on_white(tmp_path):
    src = Image.new("P", (2, 1))
    src.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    src.putpixel((0, 0), 0)
    src.putpixel((1, 0), 1)
    path = _save(src, tmp_path / "p.png", transparency=1)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    assert _pixels(load_image(path)).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_palette_without_transparency(tmp_path):
    src = Image.new("P", (2, 1))
    src.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    src.putpixel((1, 0), 1)
    path = _save(src, tmp_path / "p.gif")
    assert _pixels(load_image(path)).tolist() == [[[255, 0, 0], [0, 0, 255]]]


def test_la_composited_on_white(tmp_path):
    src = Image.new("LA", (3, 1))
    src.putdata([(0, 0), (0, 255), (0, 128)])
    path = _save(src, tmp_path / "la.png")
    assert Image.open(path).mode == "LA"
    assert list(_pixels(load_image(path))[0, :, 0]) == [255, 0, 127]


def test_rgba_composited_on_white(tmp_path):
    src = Image.new("RGBA", (2, 1))
    src.putdata([(255, 0, 0, 0), (0, 0, 255, 255)])
    path = _save(src, tmp_path / "rgba.png")
    assert _pixels(load_image(path)).tolist() == [[[255, 255, 255], [0, 0, 255]]]


@pytest.mark.parametrize("fmt, tolerance", [("TIFF", 0), ("JPEG", 3)])
def test_cmyk(tmp_path, fmt, tolerance):
    src = Image.new("CMYK", (16, 8), (0, 0, 0, 0))
    src.paste((255, 0, 0, 0), (8, 0, 16, 8))  # right half pure cyan
    path = _save(src, tmp_path / f"c.{fmt.lower()}", fmt)
    assert Image.open(path).mode == "CMYK"
    px = _pixels(load_image(path))
    assert np.abs(px[:, :4] - [255, 255, 255]).max() <= tolerance
    assert np.abs(px[:, 12:] - [0, 255, 255]).max() <= tolerance


def _oriented(tmp_path, orientation: int, fmt: str):
    src = Image.new("RGB", (20, 10), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 8, 4))  # red block at the top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(src, tmp_path / f"o{orientation}.{fmt.lower()}", fmt, exif=exif.tobytes())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_6_rotates(tmp_path, fmt):
    img = load_image(_oriented(tmp_path, 6, fmt))
    assert img.size == (10, 20)
    px = _pixels(img)
    # orientation 6: display = stored rotated 90 degrees clockwise, so the red block is top-right
    assert np.abs(px[1, 8] - [255, 0, 0]).max() <= 40
    assert np.abs(px[1, 1] - [0, 0, 255]).max() <= 40
    assert 0x0112 not in img.getexif()


def test_exif_orientation_1_unchanged(tmp_path):
    img = load_image(_oriented(tmp_path, 1, "PNG"))
    assert img.size == (20, 10)
    assert _pixels(img)[0, 0].tolist() == [255, 0, 0]


def test_file_object_accepted_and_left_open(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (3, 2), 9).save(buf, "PNG")
    buf.seek(0)
    img = load_image(buf)
    assert img.size == (3, 2) and (_pixels(img) == 9).all()
    assert not buf.closed


# ------------------------------------------------------------------------------------------
# Refusals


@pytest.fixture
def jpeg_bytes() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_jpeg_refused(tmp_path, jpeg_bytes, keep):
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg_bytes[: int(len(jpeg_bytes) * keep)])
    with pytest.raises(ImageError, match=r"cut\.jpg: truncated or corrupt image .*re-download") as info:
        load_image(path)
    assert info.value.source == str(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_refused(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[:2000])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(path)


def test_corrupt_jpeg_body_refused(tmp_path, jpeg_bytes):
    path = tmp_path / "bad.jpg"
    path.write_bytes(jpeg_bytes[:30] + b"\x00" * 40 + b"garbage" * 10)
    with pytest.raises(ImageError, match=r"bad\.jpg: "):
        load_image(path)


@pytest.mark.parametrize("content", [b"", b"hello, this is text\n", b'{"not": "an image"}'])
def test_non_image_refused(tmp_path, content):
    path = tmp_path / "notes.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image file"):
        load_image(path)


def test_missing_file_refused(tmp_path):
    with pytest.raises(ImageError, match=r"gone\.png: file not found"):
        load_image(tmp_path / "gone.png")


def test_bomb_checked_before_decoding(tmp_path):
    # 7000x7000 is under Pillow's own limit but over max_pixels; the pixel data is junk, so only a
    # header check (not a decode) can give the bomb message.
    path = tmp_path / "big.png"
    path.write_bytes(_png_header_only(7000, 7000))
    with pytest.raises(ImageError, match=r"big\.png: 7000x7000 = 49,000,000 pixels exceeds max_pixels=40,000,000"):
        load_image(path)


def test_small_max_pixels(tmp_path):
    path = _save(Image.new("RGB", (20, 10)), tmp_path / "s.png")
    with pytest.raises(ImageError, match="200 pixels exceeds max_pixels=199"):
        load_image(path, max_pixels=199)
    assert load_image(path, max_pixels=200).size == (20, 10)


@pytest.mark.parametrize("side", [10_000, 20_000])  # over Pillow's warning limit, over its error limit
def test_pillow_bomb_error_and_warning_become_image_error(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a warning that escaped would be recorded here
        with pytest.raises(ImageError, match=r"bomb\.png: refused as a decompression bomb"):
            load_image(path, max_pixels=10**12)
    assert [w.category for w in caught] == []


def test_bad_arguments():
    with pytest.raises(TypeError, match="path or a binary file object"):
        load_image(42)
    with pytest.raises(ValueError, match="max_pixels must be positive"):
        load_image("x.png", max_pixels=0)
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip', got 'ignore'"):
        load_images([], on_error="ignore")


def test_image_error_picklable(tmp_path):
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "gone.png")
    err = pickle.loads(pickle.dumps(info.value))
    assert (str(err), err.source, err.problem) == (str(info.value), info.value.source, info.value.problem)


# ------------------------------------------------------------------------------------------
# Several images: raise or skip and count


@pytest.fixture
def mixed(tmp_path, jpeg_bytes):
    good1 = _save(Image.new("RGB", (4, 4), (1, 2, 3)), tmp_path / "good1.png")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    text = tmp_path / "text.png"
    text.write_bytes(b"not an image")
    good2 = _save(Image.new("L", (2, 3), 5), tmp_path / "good2.png")
    return [good1, cut, text, good2]


def test_load_images_raise(mixed):
    with pytest.raises(ImageError, match=r"cut\.jpg"):
        load_images(mixed)
    images, skipped = load_images([mixed[0], mixed[3]])
    assert [im.size for im in images] == [(4, 4), (2, 3)] and skipped == []


def test_load_images_skip_counts(mixed):
    images, skipped = load_images(mixed, on_error="skip")
    assert [im.size for im in images] == [(4, 4), (2, 3)]
    assert [source for source, _ in skipped] == [str(mixed[1]), str(mixed[2])]
    assert "truncated" in skipped[0][1] and "not an image" in skipped[1][1]


def test_skip_counter(mixed):
    counter = SkipCounter()
    loaded = [counter.load(p) for p in mixed]
    assert [im is None for im in loaded] == [False, True, True, False]
    assert counter.count == 2
    assert counter.summary().startswith(f"skipped 2 unreadable image(s) (first: {mixed[1]}: truncated")
    assert SkipCounter().summary() == "skipped 0 images"
    with pytest.raises(TypeError):  # only ImageError is skipped; a bug propagates
        counter.load(42)
    assert counter.count == 2


# ------------------------------------------------------------------------------------------
# PIL images handed to the API follow the same policy as paths


def _policy_cases(tmp_path):
    rgba = Image.new("RGBA", (12, 10), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 6, 10))  # left half opaque blue, right half transparent red
    sixteen = Image.fromarray(np.tile(np.linspace(0, 65535, 12, dtype=np.uint16), (10, 1)))
    return {"exif_rotated": _oriented(tmp_path, 6, "JPEG"), "alpha": _save(rgba, tmp_path / "alpha.png"),
            "sixteen_bit": _save(sixteen, tmp_path / "g16.png")}


@pytest.mark.parametrize("case", ["exif_rotated", "alpha", "sixteen_bit"])
def test_a_pil_image_gets_the_pixels_its_file_gets(tmp_path, case):
    from hgm_mm.data import prepare_image

    path = _policy_cases(tmp_path)[case]
    opened = Image.open(path)
    assert opened.mode != "RGB" or case == "exif_rotated"
    assert (np.asarray(prepare_image(opened)) == np.asarray(load_image(path))).all()
    assert not (case == "exif_rotated" and opened.convert("RGB").size == load_image(path).size)  # what it fixes


def test_model_encoders_read_pil_images_as_they_read_paths(tmp_path):
    import torch

    import hgm_mm

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hgm_mm.create_model("hgm-tiny")
    paths = list(_policy_cases(tmp_path).values())
    with torch.no_grad():
        by_path = model.encode_image([str(p) for p in paths])
        by_pil = model.encode_image([Image.open(p) for p in paths])
        rooms_by_path = model.encode_room_views([str(p) for p in paths])
        rooms_by_pil = model.encode_room_views([Image.open(p) for p in paths])
    assert torch.allclose(by_path, by_pil, atol=1e-6)
    assert torch.allclose(rooms_by_path, rooms_by_pil, atol=1e-6)


def test_prepare_image_refuses_what_is_not_an_image():
    from hgm_mm.data import prepare_image

    with pytest.raises(TypeError, match="expected a PIL image, got ndarray"):
        prepare_image(np.zeros((4, 4, 3)))
    with pytest.raises(ImageError, match="exceeds max_pixels=10"):
        prepare_image(Image.new("RGB", (4, 4)), max_pixels=10)
