"""app.imaging.decode on real bytes: Pillow-written PNG/JPEG/TIFF, pydicom-written DICOM, and the shared
real DICOM and PNG files where this checkout has them."""

import csv
import logging
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import MPEG2MPML, RLELossless

from app.errors import (
    ExtremeAspectRatio,
    ImageTooLarge,
    InvalidImage,
    MedzeroError,
    UnsupportedDicom,
    UnsupportedMediaType,
)
from app.imaging.decode import decode_image, detect_format, dicom_to_image
from tests.factories import (
    jpeg_bytes,
    make_dicom_bytes,
    make_dicom_dataset,
    pil_image,
    png_bytes,
    png_header_bytes,
    png_with_bad_chunk_bytes,
    rgb_ramp,
    shared_data_dir,
    tiff_bytes,
)

# the Settings defaults
MAX_PIXELS = 64 * 2**20
MAX_ASPECT_RATIO = 20.0


def decode_pixels(data: bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    decoded = decode_image(data, max_pixels=max_pixels, max_aspect_ratio=MAX_ASPECT_RATIO)
    assert decoded.image.mode == "RGB"
    return np.asarray(decoded.image)


def pillow_bytes(image: Image.Image, image_format: str) -> bytes:
    buffer = BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


# --- format detection ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [
    (png_bytes(), "png"),
    (jpeg_bytes(), "jpeg"),
    (tiff_bytes(), "tiff"),
    (make_dicom_bytes(), "dicom"),
    (make_dicom_bytes(preamble=False), "dicom"),
], ids=["png", "jpeg", "tiff", "dicom-part10", "dicom-bare-stream"])
def test_format_is_detected_from_content_alone(data: bytes, expected: str) -> None:
    assert detect_format(data) == expected
    assert decode_image(data, max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO).format == expected


def test_empty_upload_is_invalid() -> None:
    with pytest.raises(InvalidImage, match="empty upload"):
        decode_image(b"", max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)


def test_unrecognised_bytes_are_invalid_and_the_message_lists_accepted_formats() -> None:
    with pytest.raises(InvalidImage, match="PNG, JPEG, TIFF or DICOM"):
        decode_image(b"patient notes, definitely not an image\n" * 20, max_pixels=MAX_PIXELS,
                     max_aspect_ratio=MAX_ASPECT_RATIO)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom complains about the noise it was forced to read
def test_bytes_starting_like_a_dicom_tag_are_not_taken_for_dicom() -> None:
    garbage = b"\x08\x00\x16\x00" + bytes(range(256)) * 4  # (0008,0016) tag, then noise
    with pytest.raises(InvalidImage, match="not a recognised image"):
        detect_format(garbage)


@pytest.mark.parametrize(("image_format", "named"), [
    ("GIF", "GIF"), ("BMP", "BMP"), ("WEBP", "WebP"), ("PDF", "PDF"), ("JPEG2000", "JPEG 2000"),
])
def test_known_formats_we_do_not_take_are_unsupported_media(image_format: str, named: str) -> None:
    data = pillow_bytes(pil_image(mode="RGB"), image_format)
    with pytest.raises(UnsupportedMediaType, match=named) as caught:
        decode_image(data, max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)
    assert caught.value.status_code == 415
    assert "PNG, JPEG, TIFF or DICOM" in caught.value.message


# --- PNG, JPEG, TIFF ----------------------------------------------------------------------------------------


def test_greyscale_png_is_replicated_into_three_equal_channels() -> None:
    pixels = decode_pixels(png_bytes(width=64, height=48, mode="L"))
    assert pixels.shape == (48, 64, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255


def test_rgb_png_keeps_its_pixels_exactly() -> None:
    assert np.array_equal(decode_pixels(png_bytes(width=64, height=48)), rgb_ramp(64, 48))


def test_rgba_png_drops_alpha_rather_than_compositing() -> None:
    pixels = decode_pixels(png_bytes(width=64, height=48, mode="RGBA"))
    # The right column is fully transparent; compositing on black would have zeroed its red.
    assert np.array_equal(pixels, rgb_ramp(64, 48))


@pytest.mark.parametrize("data", [png_bytes(mode="I;16"), tiff_bytes(mode="I;16"), tiff_bytes(mode="I")],
                         ids=["png-16bit", "tiff-16bit", "tiff-32bit"])
def test_high_bit_depth_greyscale_is_scaled_by_its_range_not_truncated(data: bytes) -> None:
    row = decode_pixels(data)[0, :, 0].astype(int)  # the stored ramp runs 1000..3000
    assert row[0] == 0 and row[-1] == 255
    assert 120 <= row[len(row) // 2] <= 135
    assert (np.diff(row) >= 0).all()


@pytest.mark.parametrize("mode", ["LA", "P", "1"])
def test_other_png_modes_decode_to_rgb(mode: str) -> None:
    pixels = decode_pixels(png_bytes(width=40, height=30, mode=mode))
    assert pixels.shape == (30, 40, 3)
    assert pixels[..., 0].max() - pixels[..., 0].min() >= 200


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_decodes_to_rgb_with_its_content(mode: str) -> None:
    pixels = decode_pixels(jpeg_bytes(width=64, height=48, mode=mode)).astype(int)
    assert pixels.shape == (48, 64, 3)
    assert pixels[24, 1, 0] < 25 and pixels[24, -2, 0] > 230  # the red (or grey) ramp survived


def test_tiff_decodes_to_rgb_exactly() -> None:
    assert np.array_equal(decode_pixels(tiff_bytes(width=64, height=48)), rgb_ramp(64, 48))


def test_multi_page_tiff_decodes_its_first_page() -> None:
    decoded = decode_image(tiff_bytes(width=64, height=48, pages=3), max_pixels=MAX_PIXELS,
                           max_aspect_ratio=MAX_ASPECT_RATIO)
    assert decoded.image.size == (64, 48)  # later pages are 128x96


@pytest.mark.parametrize("data", [png_bytes(), jpeg_bytes(), tiff_bytes()], ids=["png", "jpeg", "tiff"])
def test_truncated_images_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidImage, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)


# --- decompression bombs ------------------------------------------------------------------------------------


def test_crafted_header_under_our_limit_has_nothing_to_decode() -> None:
    # Control for the two tests below: this file really holds no decodable pixels.
    with pytest.raises(InvalidImage):
        decode_image(png_header_bytes(width=90, height=90), max_pixels=MAX_PIXELS,
                     max_aspect_ratio=MAX_ASPECT_RATIO)


def test_image_over_max_pixels_is_refused_before_decoding() -> None:
    # 81M pixels: over our 64Mi limit, under Pillow's own warning threshold, so our check is what fires.
    with pytest.raises(ImageTooLarge, match="9000x9000") as caught:
        decode_image(png_header_bytes(width=9000, height=9000), max_pixels=MAX_PIXELS,
                     max_aspect_ratio=MAX_ASPECT_RATIO)
    assert caught.value.status_code == 413


def test_pillows_own_bomb_error_becomes_image_too_large() -> None:
    with pytest.raises(ImageTooLarge):
        decode_image(png_header_bytes(width=100_000, height=100_000), max_pixels=10**12,
                     max_aspect_ratio=MAX_ASPECT_RATIO)


def test_a_small_max_pixels_refuses_a_valid_image() -> None:
    data = png_bytes(width=64, height=48)
    with pytest.raises(ImageTooLarge):
        decode_image(data, max_pixels=64 * 48 - 1, max_aspect_ratio=MAX_ASPECT_RATIO)
    assert decode_image(data, max_pixels=64 * 48, max_aspect_ratio=MAX_ASPECT_RATIO).image.size == (64, 48)


# --- aspect-ratio bombs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(10, 200_000), (200_000, 10)])
def test_extreme_aspect_ratio_is_refused_from_the_header_before_decoding(width: int, height: int) -> None:
    # A few bytes, 2M pixels (under the pixel limit), and open_clip's shortest-side resize would make it
    # 224 x 4.5M. The file holds nothing decodable (see the control above), so only a header check names the ratio.
    with pytest.raises(ExtremeAspectRatio) as caught:
        decode_image(png_header_bytes(width=width, height=height), max_pixels=MAX_PIXELS,
                     max_aspect_ratio=MAX_ASPECT_RATIO)
    assert f"image is {width}x{height}, an aspect ratio of 20000.00" in caught.value.message
    assert "over the limit of 20 (MEDZERO_MAX_ASPECT_RATIO)" in caught.value.message


@pytest.mark.parametrize("build", [png_bytes, jpeg_bytes, tiff_bytes], ids=["png", "jpeg", "tiff"])
def test_aspect_ratio_at_the_limit_decodes_and_just_over_it_is_refused(build: Callable[..., bytes]) -> None:
    data = build(width=200, height=10)
    assert decode_image(data, max_pixels=MAX_PIXELS, max_aspect_ratio=20.0).image.size == (200, 10)
    with pytest.raises(ExtremeAspectRatio, match=r"200x10, an aspect ratio of 20\.00"):
        decode_image(data, max_pixels=MAX_PIXELS, max_aspect_ratio=19.9)


def test_dicom_with_an_extreme_aspect_ratio_is_refused_before_its_pixel_data_is_decoded() -> None:
    dataset = make_dicom_dataset(rows=2, columns=100)
    dataset.PixelData = b"\x00" * 7  # undecodable: decoding first would make this InvalidImage
    with pytest.raises(ExtremeAspectRatio, match=r"100x2, an aspect ratio of 50\.00"):
        dicom_to_image(dataset, max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)


@pytest.mark.parametrize("side", ["Rows", "Columns"])
def test_dicom_with_a_zero_side_is_invalid_before_any_ratio_is_taken(side: str) -> None:
    dataset = make_dicom_dataset()
    setattr(dataset, side, 0)
    with pytest.raises(InvalidImage, match="a side of zero pixels"):
        dicom_to_image(dataset, max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)


# --- DICOM built with pydicom -------------------------------------------------------------------------------


def grey(pixels: np.ndarray) -> np.ndarray:
    assert (pixels[..., 0] == pixels[..., 2]).all()
    return pixels[..., 0].astype(int)


def test_8bit_monochrome2_without_window_is_shown_as_stored() -> None:
    stored = np.tile(np.arange(10, 210, 4, dtype=np.uint8), (20, 1))
    pixels = decode_pixels(make_dicom_bytes(pixels=stored))
    assert pixels.shape == (20, 50, 3)
    assert np.array_equal(grey(pixels), stored)  # same as the same image saved as PNG


@pytest.mark.parametrize("bits", [8, 16])
def test_monochrome1_shows_the_stored_minimum_bright(bits: int) -> None:
    display = grey(decode_pixels(make_dicom_bytes(photometric="MONOCHROME1", bits_allocated=bits)))
    # The default pixels ramp from the stored minimum (left) to the maximum (right).
    assert display[0, 0] == 255 and display[0, -1] == 0


def test_monochrome1_with_presentation_lut_inverse_is_inverted_once() -> None:
    monochrome1 = grey(decode_pixels(make_dicom_bytes(photometric="MONOCHROME1", bits_allocated=16)))
    both = grey(decode_pixels(make_dicom_bytes(photometric="MONOCHROME1", bits_allocated=16,
                                               presentation_lut_shape="INVERSE")))
    assert np.array_equal(both, monochrome1)
    assert both[0, 0] == 255  # twice inverted would put the stored minimum back at black


def test_monochrome2_with_presentation_lut_inverse_is_inverted() -> None:
    display = grey(decode_pixels(make_dicom_bytes(presentation_lut_shape="INVERSE")))
    assert display[0, 0] == 255 and display[0, -1] == 0


def test_rescale_then_first_window_maps_below_centre_and_above() -> None:
    # CT-like: stored = HU + 1024; a soft-tissue window (centre 40, width 400) first, a bone window second.
    hounsfield = np.array([-1000, -200, 40, 300, 3000])
    stored = np.tile(hounsfield + 1024, (4, 1)).astype(np.uint16)
    display = grey(decode_pixels(make_dicom_bytes(
        pixels=stored, bits_allocated=16, bits_stored=12, rescale_slope=1, rescale_intercept=-1024,
        window_center=[40, 500], window_width=[400, 2000])))[0]
    assert display[0] == 0 and display[1] == 0
    assert abs(display[2] - 128) <= 1
    assert display[3] == 255 and display[4] == 255


def test_16bit_without_window_uses_the_full_8bit_range() -> None:
    display = grey(decode_pixels(make_dicom_bytes(bits_allocated=16, bits_stored=12,
                                                  pixels=np.tile(np.linspace(300, 3300, 64), (8, 1)))))
    assert display.min() == 0 and display.max() == 255
    assert 120 <= display[0, 32] <= 135
    assert (np.diff(display[0]) >= 0).all()


def test_window_from_data_ignores_a_few_outlier_pixels() -> None:
    stored = np.tile(np.linspace(0, 1000, 100), (100, 1)).astype(np.uint16)
    stored[0, 0] = 65535  # one hot pixel; plain min-max scaling would squash the ramp into 0..4
    display = grey(decode_pixels(make_dicom_bytes(pixels=stored, bits_allocated=16)))
    assert display[50, 99] == 255 and display[50, 0] == 0
    assert 120 <= display[50, 50] <= 135


def test_voi_lut_sequence_is_applied_and_its_output_range_fills_8_bits() -> None:
    # A step LUT declared 16-bit but holding 12-bit values: below 128 -> 0, from 128 -> 4095. It wins over
    # the window in the same file, as pydicom prefers the LUT.
    display = grey(decode_pixels(make_dicom_bytes(
        bits_allocated=16, bits_stored=8, voi_lut_data=[0] * 128 + [4095] * 128,
        window_center=128, window_width=256)))
    assert set(np.unique(display)) == {0, 255}
    assert display[0, 0] == 0 and display[0, -1] == 255


def test_malformed_window_falls_back_to_the_data_window() -> None:
    # Width 0 is invalid for LINEAR windowing; pydicom raises, and the image is still shown, not refused.
    display = grey(decode_pixels(make_dicom_bytes(bits_allocated=16, bits_stored=12, window_center=2048,
                                                  window_width=0)))
    assert display[0, 0] == 0 and display[0, -1] == 255
    assert 120 <= display[0, 24] <= 135


def test_unknown_presentation_lut_shape_is_ignored_not_refused() -> None:
    display = grey(decode_pixels(make_dicom_bytes(presentation_lut_shape="LIN OD")))  # hardcopy only
    assert display[0, 0] == 0 and display[0, -1] == 255


def test_presentation_lut_sequence_maps_display_values_to_its_p_values() -> None:
    # A 12-bit step over the 256 display levels: the lower half -> 0, the upper half -> 4095 (its maximum).
    stored = np.tile(np.arange(0, 256, 5, dtype=np.uint8), (4, 1))
    display = grey(decode_pixels(make_dicom_bytes(pixels=stored, presentation_lut_data=[0] * 128 + [4095] * 128)))
    assert np.array_equal(display, np.where(stored >= 128, 255, 0))


def test_monochrome1_with_a_falling_presentation_lut_sequence_is_inverted_once() -> None:
    # The falling LUT is MONOCHROME1's inversion (like INVERSE); inverting the display as well would undo it.
    stored = np.tile(np.arange(0, 256, 5, dtype=np.uint8), (4, 1))
    display = grey(decode_pixels(make_dicom_bytes(pixels=stored, photometric="MONOCHROME1",
                                                  presentation_lut_data=[4095] * 128 + [0] * 128)))
    assert np.array_equal(display, np.where(stored < 128, 255, 0))


def anatomy_in_padding(padding: int, *, dtype: type, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """A 100x100 frame of ``padding`` around a 20x20 region ramping from ``low`` to ``high``, and the
    frame's mask (True where padded)."""
    stored = np.full((100, 100), padding, dtype=dtype)
    stored[40:60, 40:60] = np.rint(np.linspace(low, high, 20))
    padded = np.ones(stored.shape, dtype=bool)
    padded[40:60, 40:60] = False
    return stored, padded


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_pixel_padding_is_left_out_of_the_data_window_and_shown_black(photometric: str) -> None:
    # CT-like: 96% of the frame is padding at stored -2000; in the percentiles it would squash the anatomy
    # into the top third. The intercept moves modality values away from the stored ones the padding names.
    stored, padded = anatomy_in_padding(-2000, dtype=np.int16, low=0, high=1000)
    display = grey(decode_pixels(make_dicom_bytes(
        pixels=stored, photometric=photometric, bits_allocated=16, signed=True, rescale_slope=1,
        rescale_intercept=-1024, pixel_padding_value=-2000)))
    anatomy = display[40:60, 40:60] if photometric == "MONOCHROME2" else 255 - display[40:60, 40:60]
    assert anatomy[0, 0] == 0 and anatomy[0, -1] == 255
    assert (np.diff(anatomy[0]) > 0).all()
    assert (display[padded] == 0).all()  # black after MONOCHROME1's inversion too


def test_pixel_padding_range_limit_makes_a_range_of_stored_values_padding() -> None:
    # Background noise 0..50 around anatomy at 500..1500: the value alone (0) would leave the noise in.
    stored, padded = anatomy_in_padding(0, dtype=np.uint16, low=500, high=1500)
    stored[padded] = np.random.default_rng(0).integers(0, 51, size=int(padded.sum()))
    display = grey(decode_pixels(make_dicom_bytes(pixels=stored, bits_allocated=16, bits_stored=12,
                                                  pixel_padding_value=0, pixel_padding_range_limit=50)))
    assert display[40, 40] == 0 and display[40, 59] == 255
    assert (np.diff(display[40, 40:60].astype(int)) > 0).all()
    assert (display[padded] == 0).all()


def test_pixel_padding_does_not_change_the_dataset_own_window() -> None:
    stored, _ = anatomy_in_padding(-2000, dtype=np.int16, low=0, high=1000)
    options = {"pixels": stored, "bits_allocated": 16, "signed": True, "window_center": 500, "window_width": 1000}
    with_padding = decode_pixels(make_dicom_bytes(pixel_padding_value=-2000, **options))
    assert np.array_equal(with_padding, decode_pixels(make_dicom_bytes(**options)))


def test_rgb_dicom_keeps_its_pixels() -> None:
    assert np.array_equal(decode_pixels(make_dicom_bytes(photometric="RGB")), rgb_ramp(48, 32))


@pytest.mark.parametrize("photometric", ["YBR_FULL", "YBR_FULL_422"])
def test_ybr_dicom_comes_out_as_rgb(photometric: str) -> None:
    pixels = decode_pixels(make_dicom_bytes(photometric=photometric)).astype(int)
    assert np.abs(pixels - rgb_ramp(48, 32)).max() <= 12  # left as YCbCr it would be far off
    assert pixels[0, -1, 0] > 240 and pixels[0, -1, 1] < 15


def test_palette_colour_with_16bit_entries_is_scaled_to_8_bits() -> None:
    levels = np.arange(256) * 257  # 0..65535
    palette = np.stack([levels, np.zeros(256), 65535 - levels], axis=1)
    pixels = decode_pixels(make_dicom_bytes(photometric="PALETTE COLOR", palette=palette,
                                            pixels=np.tile(np.arange(256, dtype=np.uint8), (16, 1))))
    assert np.array_equal(pixels[0, :, 0], np.arange(256))
    assert np.array_equal(pixels[0, :, 2], 255 - np.arange(256))


def test_multi_frame_dicom_is_unsupported_and_names_the_frame_count() -> None:
    with pytest.raises(UnsupportedDicom, match="multi-frame.*3 frames"):
        decode_image(make_dicom_bytes(number_of_frames=3), max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)


def test_dicom_without_pixel_data_is_unsupported() -> None:
    with pytest.raises(UnsupportedDicom, match="no pixel data"):
        decode_image(make_dicom_bytes(with_pixel_data=False), max_pixels=MAX_PIXELS,
                     max_aspect_ratio=MAX_ASPECT_RATIO)


def test_dicom_over_max_pixels_is_refused() -> None:
    data = make_dicom_bytes(rows=32, columns=48)
    with pytest.raises(ImageTooLarge, match="48x32"):
        decode_image(data, max_pixels=32 * 48 - 1, max_aspect_ratio=MAX_ASPECT_RATIO)


def test_dicom_with_truncated_pixel_data_is_invalid() -> None:
    data = make_dicom_bytes(bits_allocated=16)
    with pytest.raises(InvalidImage, match="Explicit VR Little Endian"):
        decode_image(data[:-500], max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)


def test_corrupt_compressed_stream_is_invalid_and_names_the_transfer_syntax() -> None:
    dataset = make_dicom_dataset(bits_allocated=16, bits_stored=12, transfer_syntax=RLELossless)
    intact = dicom_to_image(dataset, max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)
    assert np.asarray(intact).max() == 255  # intact, it decodes
    encapsulated = bytearray(dataset.PixelData)
    encapsulated[16:20] = (9).to_bytes(4, "little")  # the RLE header's segment count, after two item tags
    dataset.PixelData = bytes(encapsulated)
    with pytest.raises(InvalidImage, match="RLE Lossless"):
        dicom_to_image(dataset, max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)


def test_transfer_syntax_without_a_decoder_is_unsupported_by_name() -> None:
    dataset = make_dicom_dataset()
    dataset.file_meta.TransferSyntaxUID = MPEG2MPML
    with pytest.raises(UnsupportedDicom, match="MPEG2"):
        dicom_to_image(dataset, max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)


def test_bare_dicom_stream_decodes_like_the_part10_file() -> None:
    options = {"photometric": "MONOCHROME1", "bits_allocated": 16, "bits_stored": 12}
    bare = decode_pixels(make_dicom_bytes(preamble=False, **options))
    assert np.array_equal(bare, decode_pixels(make_dicom_bytes(**options)))


def test_dicom_to_image_renders_a_dataset_as_received_by_c_store() -> None:
    image = dicom_to_image(make_dicom_dataset(photometric="MONOCHROME1"), max_pixels=MAX_PIXELS,
                           max_aspect_ratio=MAX_ASPECT_RATIO)
    assert image.mode == "RGB" and image.size == (48, 32)
    assert image.getpixel((0, 0)) == (255, 255, 255)


# --- no patient data in messages or logs -------------------------------------------------------------------
# pydicom's and Pillow's exception texts and log records quote the file; each marker below stands for patient data.


def assert_not_echoed(error: MedzeroError, marker: str, caplog: pytest.LogCaptureFixture) -> None:
    assert marker not in error.message
    assert marker not in caplog.text
    assert error.__cause__ is not None  # the library's exception stays chained, for a debugger
    ours = [record for record in caplog.records if record.name == "app.imaging.decode"]
    assert ours and all(record.levelno == logging.DEBUG for record in ours)
    assert type(error.__cause__).__name__ in ours[-1].getMessage()


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the malformed value, too
def test_unreadable_dicom_geometry_is_refused_without_echoing_the_value(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    data = make_dicom_bytes(patient_name="SECRET^MARKER",
                            raw_elements={0x00280008: ("IS", b"SECRET-MARKER-42")})  # NumberOfFrames
    with pytest.raises(UnsupportedDicom) as caught:
        decode_image(data, max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)
    assert caught.value.message == "DICOM image geometry (Rows, Columns, NumberOfFrames) is unreadable"
    assert_not_echoed(caught.value, "SECRET", caplog)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_malformed_transfer_syntax_uid_is_not_echoed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    dataset = make_dicom_dataset(patient_name="SECRET^MARKER")
    dataset.file_meta.TransferSyntaxUID = "SECRET^MARKER"
    with pytest.raises(UnsupportedDicom) as caught:
        dicom_to_image(dataset, max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)
    assert caught.value.message == "DICOM transfer syntax (malformed UID) is not supported"
    assert "SECRET" not in caplog.text


@pytest.mark.parametrize(("image_format", "data", "marker"), [
    ("PNG", png_with_bad_chunk_bytes(b"S#42"), "S#42"),  # Pillow's error quotes the chunk type
    ("JPEG", jpeg_bytes(comment="SECRET^MARKER")[:600], "SECRET"),
    ("TIFF", tiff_bytes(description="SECRET^MARKER")[:-500], "SECRET"),  # Pillow logs tag values at debug
], ids=["png", "jpeg", "tiff"])
def test_corrupt_images_are_refused_without_echoing_file_content(
        image_format: str, data: bytes, marker: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InvalidImage) as caught:
        decode_image(data, max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)
    assert caught.value.message == f"corrupt or truncated {image_format} image"
    assert_not_echoed(caught.value, marker, caplog)


# --- real files from shared/data ----------------------------------------------------------------------------


def _real_dicom_rows() -> list[dict[str, str]]:
    data_dir = shared_data_dir()
    manifest = data_dir / "dicom" / "manifest.csv" if data_dir else None
    if manifest is None or not manifest.is_file():
        return []
    with manifest.open(newline="") as rows:
        return list(csv.DictReader(rows))


REAL_DICOMS = _real_dicom_rows()
NO_REAL_DICOMS = "shared/data/dicom is not present in this checkout"


def _real_dicom_path(file_name: str) -> Path:
    data_dir = shared_data_dir()
    if data_dir is None or not (data_dir / "dicom" / file_name).is_file():
        pytest.skip(NO_REAL_DICOMS)
    return data_dir / "dicom" / file_name


@pytest.mark.skipif(not REAL_DICOMS, reason=NO_REAL_DICOMS)
def test_manifest_and_folder_name_the_same_real_dicoms() -> None:
    # The tests below take their files from the manifest and skip a file that is missing: a file added
    # without a row, or a row whose file is gone, would go untested without anything failing.
    on_disk = {path.name for path in (shared_data_dir() / "dicom").glob("*.dcm")}
    assert {row["file"] for row in REAL_DICOMS} == on_disk


@pytest.mark.skipif(not REAL_DICOMS, reason=NO_REAL_DICOMS)
@pytest.mark.parametrize("row", REAL_DICOMS, ids=[row["file"] for row in REAL_DICOMS])
def test_every_real_dicom_decodes_with_a_real_dynamic_range(row: dict[str, str]) -> None:
    decoded = decode_image(_real_dicom_path(row["file"]).read_bytes(), max_pixels=MAX_PIXELS,
                           max_aspect_ratio=MAX_ASPECT_RATIO)
    pixels = np.asarray(decoded.image)
    assert decoded.format == "dicom" and decoded.image.mode == "RGB"
    assert decoded.image.size == (int(row["columns"]), int(row["rows"]))
    assert pixels.std() > 10
    assert len(np.unique(pixels)) > 50


@pytest.mark.parametrize("file_name", ["RG1_J2KI.dcm", "RG1_JLSN.dcm", "966_fixed.dcm",
                                       "nih_cxr14_dx_no_finding.dcm"])
def test_real_chest_radiographs_show_dark_lungs_beside_a_bright_mediastinum(file_name: str) -> None:
    # RG1_* are MONOCHROME1, 966_fixed MONOCHROME1 + PresentationLUTShape INVERSE, the NIH file MONOCHROME2:
    # all PA chests, so correctly displayed their lung fields are darker than the spine between them.
    display = grey(decode_pixels(_real_dicom_path(file_name).read_bytes()))
    height, width = display.shape

    def box_mean(centre_x: float, centre_y: float) -> float:
        half = 0.06
        return float(display[int((centre_y - half) * height):int((centre_y + half) * height),
                             int((centre_x - half) * width):int((centre_x + half) * width)].mean())

    lungs = (box_mean(0.3, 0.4) + box_mean(0.7, 0.4)) / 2
    mediastinum = box_mean(0.5, 0.4)
    assert mediastinum - lungs > 25


def _real_pngs() -> list[Path]:
    data_dir = shared_data_dir()
    if data_dir is None:
        return []
    return [min((data_dir / "datasets").glob(f"{dataset}/*/*.png"))
            for dataset in ("pneumonia_cxr", "covid_cxr", "ham10000", "aptos_dr", "busi")
            if any((data_dir / "datasets").glob(f"{dataset}/*/*.png"))]


REAL_PNGS = _real_pngs()


@pytest.mark.skipif(not REAL_PNGS, reason="shared/data/datasets is not present in this checkout")
@pytest.mark.parametrize("path", REAL_PNGS, ids=[f"{path.parts[-3]}/{path.name}" for path in REAL_PNGS])
def test_real_dataset_pngs_decode_to_rgb_of_their_size(path: Path) -> None:
    data = path.read_bytes()
    with Image.open(BytesIO(data)) as original:
        expected_size = original.size
    decoded = decode_image(data, max_pixels=MAX_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO)
    assert decoded.format == "png" and decoded.image.mode == "RGB"
    assert decoded.image.size == expected_size
    assert np.asarray(decoded.image).std() > 10
