"""Every awkward image either converts the way a viewer sees it, or is refused with an
ImageError naming the source; one bad image never fails a batch."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cv_assets.embedding import ColorHistogramEmbedder, ImageError, get_embedder, load_image


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _noise_rgb(height=120, width=160, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# -- sources ---------------------------------------------------------------------------------


def test_rgb_sources_of_every_kind_decode_to_the_same_pixels(tmp_path):
    pixels = _noise_rgb()
    png = _encode(Image.fromarray(pixels), "PNG")
    path = tmp_path / "frame.png"
    path.write_bytes(png)
    for source in (pixels, Image.fromarray(pixels), path, str(path), png, bytearray(png), memoryview(png)):
        out = load_image(source)
        assert out.dtype == np.uint8 and out.shape == (120, 160, 3)
        np.testing.assert_array_equal(out, pixels)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "refs" / "CHAR_09.png"
    with pytest.raises(ImageError, match="CHAR_09.png: file not found"):
        load_image(missing)


def test_not_an_image_and_empty_bytes_are_refused_with_the_given_name(tmp_path):
    with pytest.raises(ImageError, match=r"^event evt-7: not a recognised image format"):
        load_image(b"definitely not an image", name="event evt-7")
    with pytest.raises(ImageError, match="empty image data"):
        load_image(b"", name="event evt-8")
    with pytest.raises(ImageError, match="unsupported image source type int"):
        load_image(42)


def test_truncated_jpeg_passes_verify_but_is_refused(tmp_path):
    data = _encode(Image.fromarray(_noise_rgb(200, 200)), "JPEG", quality=90)
    truncated = data[: int(len(data) * 0.6)]
    Image.open(io.BytesIO(truncated)).verify()  # the header is fine: verify() does not notice
    path = tmp_path / "cut.jpg"
    path.write_bytes(truncated)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a stub): a bomb's shape."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageError, match="decompression bomb") as info:
        load_image(_png_header_only(30_000, 30_000), name="refs/huge.png")
    assert str(info.value).startswith("refs/huge.png:")


def test_a_bomb_beyond_pillows_own_ceiling_quotes_our_limit_not_pillows_text():
    with pytest.raises(ImageError) as info:
        load_image(_png_header_only(30_000, 30_000), name="refs/huge.png")
    message = str(info.value)
    assert message == ("refs/huge.png: rejected as a decompression bomb: its header declares more than the limit "
                       "of 64000000 pixels")
    assert "DOS attack" not in message


def test_large_png_is_reduced_right_after_decoding_when_the_embedder_needs_less(tmp_path):
    rgba = np.zeros((2000, 1800, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[:, :900, 3] = 0  # the left half fully transparent: white once composited
    path = tmp_path / "large.png"
    Image.fromarray(rgba, "RGBA").save(path)
    assert load_image(path).shape == (2000, 1800, 3)
    reduced = load_image(path, min_side=448)
    assert reduced.shape == (500, 450, 3)  # factor 4 keeps both sides >= 448
    assert (reduced[:, :220] == 255).all() and (reduced[:, 230:, 0] == 200).all() and (reduced[:, 230:, 1] == 0).all()


def test_images_above_our_pixel_limit_are_refused(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(_noise_rgb(100, 100)).save(path)
    with pytest.raises(ImageError, match=r"10000 pixels exceeds the limit of 5000"):
        load_image(path, max_pixels=5000)
    assert load_image(path, max_pixels=10_000).shape == (100, 100, 3)


# -- colour modes ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_is_converted_to_rgb(fmt):
    red_cmyk = Image.new("CMYK", (32, 24), (0, 255, 255, 0))
    out = load_image(_encode(red_cmyk, fmt))
    assert out.shape == (24, 32, 3)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 3


def test_palette_transparency_is_composited_not_exposing_the_hidden_colour():
    image = Image.new("P", (20, 10), 0)
    image.putpalette([0, 255, 0] + [255, 0, 0] + [0, 0, 0] * 254)  # 0: green (transparent), 1: red
    image.paste(1, (10, 0, 20, 10))
    out = load_image(_encode(image, "PNG", transparency=0))
    assert (out[:, :10] == 255).all(), "transparent half must be the white background, not green"
    assert (out[:, 10:] == [255, 0, 0]).all()


def test_rgba_hidden_colour_stays_hidden_and_partial_alpha_blends_on_white():
    rgba = np.zeros((10, 30, 4), dtype=np.uint8)
    rgba[:, :10] = [0, 255, 0, 0]  # invisible green
    rgba[:, 10:20] = [255, 0, 0, 128]  # half-transparent red
    rgba[:, 20:] = [0, 0, 255, 255]  # opaque blue
    for source in (_encode(Image.fromarray(rgba, "RGBA"), "PNG"), rgba):
        out = load_image(source).astype(int)
        assert (out[:, :10] == 255).all()
        assert np.abs(out[:, 10:20] - [255, 127, 127]).max() <= 1
        assert (out[:, 20:] == [0, 0, 255]).all()


def test_grey_with_alpha_and_one_bit_images_convert():
    la = Image.new("LA", (8, 8), (0, 0))  # black but fully transparent
    assert (load_image(_encode(la, "PNG")) == 255).all()
    bilevel = Image.new("1", (8, 8), 1)
    out = load_image(_encode(bilevel, "PNG"))
    assert out.shape == (8, 8, 3) and (out == 255).all()


def test_16_bit_greyscale_is_scaled_not_clipped_to_white():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    out = load_image(_encode(Image.fromarray(ramp), "PNG"))
    assert out.shape == (64, 64, 3)
    expected = np.round(ramp / 257.0).astype(np.uint8)
    assert np.abs(out[:, :, 0].astype(int) - expected).max() <= 1
    assert (out == 255).mean() < 0.01, "a 16-bit ramp must not saturate to white"
    assert abs(int(out[32, 0, 0]) - 128) <= 2  # the middle of the ramp is mid-grey
    # The same through arrays.
    assert np.abs(load_image(ramp)[:, :, 0].astype(int) - expected).max() <= 1


def test_float_greyscale_image_is_scaled():
    values = np.linspace(0.0, 1.0, 100, dtype=np.float32).reshape(10, 10)
    out = load_image(Image.fromarray(values, "F"))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_exif_orientation_is_applied():
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # landscape as stored: left red, right blue
    stored[:, :20] = [255, 0, 0]
    stored[:, 20:] = [0, 0, 255]
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(_encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.shape == (40, 20, 3), "displayed upright the photo is portrait"
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60, "the stored left (red) half is now on top"
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60


def test_large_jpeg_may_decode_at_reduced_scale_but_keeps_min_side(tmp_path):
    path = tmp_path / "large.jpg"
    Image.fromarray(_noise_rgb(1080, 1920)).save(path, quality=85)
    assert load_image(path).shape == (1080, 1920, 3)
    reduced = load_image(path, min_side=448)
    assert reduced.shape == (540, 960, 3)


# -- arrays ----------------------------------------------------------------------------------


def test_arrays_of_other_layouts_convert_and_bad_ones_are_refused():
    grey = np.full((6, 5), 77, dtype=np.uint8)
    assert (load_image(grey) == 77).all() and load_image(grey).shape == (6, 5, 3)
    assert load_image(grey[:, :, None]).shape == (6, 5, 3)
    floats = np.full((4, 4, 3), 0.5, dtype=np.float32)
    assert (load_image(floats) == 128).all()
    with pytest.raises(ImageError, match=r"expected an RGB image array \(H, W, 3\), got shape \(4, 4, 2\)"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8), name="frame 3")
    with pytest.raises(ImageError, match="empty image array"):
        load_image(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((4, 4, 3), np.nan, dtype=np.float32))


# -- batches -----------------------------------------------------------------------------------


def _bad_and_good_sources(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_noise_rgb(64, 64, seed=3)).save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(_encode(Image.fromarray(_noise_rgb(200, 200)), "JPEG")[:2000])
    sources = [good, cut, _noise_rgb(50, 80, seed=4), b"junk", tmp_path / "missing.png", _png_header_only(30_000, 30_000)]
    names = ["good", "cut", "array", "junk", "missing", "bomb"]
    return sources, names


@pytest.mark.parametrize("family", ["clip", "color_histogram"])
def test_one_bad_image_never_fails_the_batch(tmp_path, tiny_clip_dir, settings_factory, family):
    settings, _ = settings_factory()
    embedder = get_embedder(settings.embedder) if family == "clip" else ColorHistogramEmbedder(batch_size=2)
    embedder.batch_size = 2  # spread good and bad items over several batches
    sources, names = _bad_and_good_sources(tmp_path)
    outcome = embedder.embed_sources(sources, names=names)
    assert outcome.ok == [0, 2]
    assert sorted(outcome.errors) == [1, 3, 4, 5]
    assert outcome.errors[1].startswith("cut: corrupt or truncated")
    assert outcome.errors[3] == "junk: not a recognised image format"
    assert outcome.errors[4] == "missing: file not found"
    assert outcome.errors[5].startswith("bomb: rejected as a decompression bomb")
    assert outcome.vectors.shape == (2, 512) and outcome.vectors.dtype == np.float32
    expected = embedder.embed_images([load_image(sources[0]), sources[2]])
    np.testing.assert_allclose(outcome.vectors, expected, atol=1e-5)
    embedder.batch_size = settings.embedder.batch_size


def test_embed_images_refuses_an_invalid_frame_with_its_position():
    with pytest.raises(ImageError, match=r"^image 1: expected an RGB image array"):
        ColorHistogramEmbedder().embed_images([_noise_rgb(), np.zeros((3,), dtype=np.uint8)])
