import io
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from synermix.data.images import canonicalise, decode_bytes, encode_png, inspect_image, resize_shorter_side

from .helpers import huge_png_header, noise_image, png_bytes

LIMIT = 40_000_000


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_good_grey_png_is_described():
    info = inspect_image(png_bytes(noise_image(1)), LIMIT)
    assert info.decodable and info.error == ""
    assert (info.width, info.height, info.mode, info.format) == (32, 32, "L", "PNG")
    assert 20 <= info.mean_intensity <= 236 and info.std_intensity > 10
    assert info.image is not None and info.image.mode == "L"


def test_zero_byte_file():
    info = inspect_image(b"", LIMIT)
    assert not info.decodable and info.error == "empty file (0 bytes)"


def test_text_file_named_jpg():
    info = inspect_image(b"this is a text file, not a JPEG\n", LIMIT)
    assert not info.decodable and "not an image file" in info.error


def test_truncated_png():
    data = png_bytes(noise_image(2, size=(64, 64)))
    info = inspect_image(data[: len(data) // 2], LIMIT)
    assert not info.decodable
    assert "truncated" in info.error or "cannot decode" in info.error
    assert (info.width, info.height) == (64, 64)  # the header was readable


def test_cmyk_jpeg_is_decoded_to_rgb_but_mode_reported():
    data = encoded(noise_image(3, mode="RGB").convert("CMYK"), "JPEG")
    info = inspect_image(data, LIMIT)
    assert info.decodable and info.mode == "CMYK" and info.image.mode == "RGB"


def test_16_bit_png_is_scaled_to_8_bit():
    array = np.full((8, 8), 65535, dtype=np.uint16)
    array[:4] = 257 * 100
    data = encoded(Image.fromarray(array), "PNG")
    info = inspect_image(data, LIMIT)
    assert (info.decodable and info.mode.startswith("I;16")) or info.mode == "I"
    pixels = np.asarray(info.image)
    assert info.image.mode == "L" and pixels[0, 0] == 100 and pixels[-1, -1] == 255


def test_one_pixel_image_decodes_with_its_size():
    info = inspect_image(png_bytes(Image.new("L", (1, 1), 128)), LIMIT)
    assert info.decodable and (info.width, info.height) == (1, 1)


def test_all_black_frame_has_zero_mean_and_std():
    info = inspect_image(png_bytes(Image.new("L", (32, 32), 0)), LIMIT)
    assert info.decodable and info.mean_intensity == 0 and info.std_intensity == 0


def test_pixel_limit_refuses_before_decoding():
    info = inspect_image(huge_png_header(100_000, 100_000), LIMIT)
    assert not info.decodable
    assert "decompression-bomb guard" in info.error and "10000000000 pixels" in info.error
    # below Pillow's own limit our configured guard fires, naming the size
    info = inspect_image(huge_png_header(10_000, 5_000), LIMIT)
    assert not info.decodable and "10000x5000 = 50000000 pixels is past data.max_pixels" in info.error


def test_pixel_limit_is_the_configured_value():
    data = png_bytes(noise_image(4, size=(100, 100)))
    assert inspect_image(data, 10_000).decodable
    assert not inspect_image(data, 9_999).decodable


def test_same_pixels_in_two_formats_share_the_content_hash():
    image = noise_image(5, mode="RGB")
    a = inspect_image(png_bytes(image), LIMIT)
    b = inspect_image(encoded(image, "BMP"), LIMIT)
    assert a.content_sha256 == b.content_sha256
    assert inspect_image(png_bytes(noise_image(6, mode="RGB")), LIMIT).content_sha256 != a.content_sha256


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    info = inspect_image(encoded(image, "JPEG", exif=exif), LIMIT)
    assert (info.width, info.height) == (40, 20)  # as stored
    assert info.image.size == (20, 40)  # as meant to be seen


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("RGBA", "RGB"), ("P", "RGB"), ("LA", "L"), ("1", "L"), ("YCbCr", "RGB"), ("L", "L"), ("RGB", "RGB")],
)
def test_canonical_modes(mode, expected):
    assert canonicalise(Image.new(mode, (4, 4))).mode == expected


def test_resize_shorter_side_keeps_aspect_ratio():
    assert resize_shorter_side(Image.new("L", (300, 150)), 64).size == (128, 64)
    square = Image.new("L", (64, 64))
    assert resize_shorter_side(square, 64) is square


def test_png_encoding_is_deterministic():
    image = noise_image(7, mode="RGB")
    assert encode_png(image) == encode_png(image.copy())


def test_a_long_thin_header_is_refused_before_decoding():
    """Resizing scales the shorter side up to the model's input: 1 x 250,000 px in a 74-byte
    file would allocate gigabytes. The header's aspect ratio refuses it undecoded."""
    info = inspect_image(huge_png_header(1, 250_000), LIMIT)
    assert not info.decodable and "more than 20 times the other" in info.error
    assert (info.width, info.height) == (1, 250_000)
    assert inspect_image(png_bytes(noise_image(2, size=(200, 10))), LIMIT).decodable  # 20:1 is fine
    assert not inspect_image(png_bytes(noise_image(2, size=(201, 10))), LIMIT).decodable


@pytest.mark.parametrize("fmt", ["GIF", "EPS", "PPM", "TGA"])
def test_formats_the_project_does_not_read_never_reach_a_decoder(fmt):
    image = noise_image(4, mode="L" if fmt != "EPS" else "RGB")
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except OSError:  # EPS writing needs nothing, but keep the test honest on odd builds
        pytest.skip(f"Pillow cannot write {fmt} here")
    info = inspect_image(buffer.getvalue(), LIMIT)
    assert not info.decodable and "not an image file of a format read here" in info.error


def test_describe_false_skips_the_manifest_fields_and_keeps_the_pixels():
    data = png_bytes(noise_image(5))
    full, bare = inspect_image(data, LIMIT), inspect_image(data, LIMIT, describe=False)
    assert bare.decodable and bare.content_sha256 == "" and bare.mean_intensity != bare.mean_intensity
    assert bare.image.tobytes() == full.image.tobytes() and full.content_sha256


def test_reserve_is_held_while_the_pixels_decode_and_can_refuse():
    seen = []

    @contextmanager
    def reserve(width, height, mode):
        seen.append((width, height, mode, decode_bytes(width, height, mode)))
        yield

    assert inspect_image(png_bytes(noise_image(6, size=(40, 30))), LIMIT, reserve=reserve).decodable
    assert seen == [(40, 30, "L", 40 * 30 * 2)]

    @contextmanager
    def refuse(width, height, mode):
        raise ValueError("no room")
        yield

    with pytest.raises(ValueError, match="no room"):  # the caller's refusal reaches the caller
        inspect_image(png_bytes(noise_image(6)), LIMIT, reserve=refuse)


def test_a_phones_multi_picture_jpeg_still_opens():
    image = noise_image(7, mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="MPO", save_all=True, append_images=[image])
    info = inspect_image(buffer.getvalue(), LIMIT)
    assert info.decodable and info.format == "MPO"
