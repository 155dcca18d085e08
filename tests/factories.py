"""Builders of real image bytes for tests: PNG, JPEG and TIFF written by Pillow, DICOM Part 10 written by pydicom.

Every builder draws a known pattern (a left-to-right ramp) so a test can check where pixel values went,
not only that something decoded. ``shared_data_dir()`` finds the real images under /work/shared/data.
"""

import struct
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def shared_data_dir() -> Path | None:
    """The project's shared real data (``<work>/shared/data``), or None where this checkout has none."""
    data_dir = Path(__file__).resolve().parents[2] / "shared" / "data"
    return data_dir if data_dir.is_dir() else None


def ramp(width: int, height: int, *, low: int = 0, high: int = 255, dtype: Any = np.uint8) -> np.ndarray:
    """A (height, width) array rising linearly from ``low`` (left column) to ``high`` (right column)."""
    row = np.rint(np.linspace(low, high, width))
    return np.tile(row, (height, 1)).astype(dtype)


def rgb_ramp(width: int, height: int) -> np.ndarray:
    """A (height, width, 3) uint8 image: red rises left to right, green falls, blue is a constant 128."""
    red = ramp(width, height)
    return np.stack([red, 255 - red, np.full_like(red, 128)], axis=-1)


def pil_image(*, width: int = 64, height: int = 48, mode: str = "RGB") -> Image.Image:
    """A ramp image in ``mode``: "L", "RGB", "RGBA", "LA", "P", "CMYK", "1", or 16/32-bit "I;16" / "I".

    Colour modes hold ``rgb_ramp``; "RGBA" adds alpha falling from 255 (left) to 0 (right).
    The 16- and 32-bit modes ramp from 1000 to 3000, so truncating them to 8 bits would show.
    """
    if mode == "I;16":
        return Image.fromarray(ramp(width, height, low=1000, high=3000, dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(ramp(width, height, low=1000, high=3000, dtype=np.int32))
    if mode in ("L", "LA", "1"):
        return Image.fromarray(ramp(width, height)).convert(mode)
    rgb = Image.fromarray(rgb_ramp(width, height))
    if mode == "RGBA":
        rgb.putalpha(Image.fromarray(ramp(width, height, low=255, high=0)))  # opaque left, transparent right
        return rgb
    return rgb.convert(mode)


def png_bytes(*, width: int = 64, height: int = 48, mode: str = "RGB") -> bytes:
    """A PNG of ``pil_image(width, height, mode)``; "I;16" gives a 16-bit greyscale PNG ("I" has no PNG form)."""
    return _save(pil_image(width=width, height=height, mode=mode), "PNG")


def jpeg_bytes(*, width: int = 64, height: int = 48, mode: str = "RGB", quality: int = 90,
               comment: str | None = None) -> bytes:
    """A baseline JPEG of ``pil_image(width, height, mode)`` ("RGB", "L" or "CMYK"), with ``comment`` in a
    COM segment if given."""
    options = {"comment": comment} if comment is not None else {}
    return _save(pil_image(width=width, height=height, mode=mode), "JPEG", quality=quality, **options)


def tiff_bytes(*, width: int = 64, height: int = 48, mode: str = "RGB", pages: int = 1,
               description: str | None = None) -> bytes:
    """A TIFF of ``pil_image(width, height, mode)``; extra pages are twice as large, so a test can tell
    which page was decoded. ``description`` goes into the ImageDescription tag."""
    first = pil_image(width=width, height=height, mode=mode)
    later = [pil_image(width=2 * width, height=2 * height, mode=mode) for _ in range(pages - 1)]
    options = {"description": description} if description is not None else {}
    return _save(first, "TIFF", save_all=bool(later), append_images=later, **options)


def png_header_bytes(*, width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` (8-bit RGB) whose IDAT holds only a few bytes and no IEND:
    decoding it fails, so only a size check made before decoding can refuse it as too large."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)))


def png_with_bad_chunk_bytes(chunk_type: bytes, *, width: int = 64, height: int = 48) -> bytes:
    """A greyscale PNG whose image data is split over two IDAT chunks, the second one's type replaced by the
    four bytes ``chunk_type`` (not all letters): the header opens, and decoding fails on reaching that chunk."""
    scanlines = b"".join(b"\x00" + bytes(ramp(width, 1)[0]) for _ in range(height))  # filter byte 0 per row
    compressed = zlib.compress(scanlines)
    first, second = compressed[: len(compressed) // 2], compressed[len(compressed) // 2:]
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", first) + struct.pack(">I", len(second)) + chunk_type + second
            + struct.pack(">I", zlib.crc32(chunk_type + second)) + _png_chunk(b"IEND", b""))


def _png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    body = chunk_type + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def make_dicom_dataset(
    *,
    pixels: np.ndarray | None = None,
    rows: int = 32,
    columns: int = 48,
    photometric: str = "MONOCHROME2",
    bits_allocated: int = 8,
    bits_stored: int | None = None,
    signed: bool = False,
    number_of_frames: int = 1,
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
    window_center: float | list[float] | None = None,
    window_width: float | list[float] | None = None,
    voi_lut_data: list[int] | None = None,
    voi_lut_first_mapped: int = 0,
    voi_lut_bits: int = 16,
    presentation_lut_shape: str | None = None,
    presentation_lut_data: list[int] | None = None,
    presentation_lut_bits: int = 12,
    pixel_padding_value: int | None = None,
    pixel_padding_range_limit: int | None = None,
    palette: np.ndarray | None = None,
    with_pixel_data: bool = True,
    modality: str = "DX",
    patient_name: str | None = None,
    raw_elements: dict[int, tuple[str, bytes]] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> FileDataset:
    """A single-image DICOM dataset (Secondary Capture SOP class) with the given pixel module.

    pixels: stored values, shape (rows, columns) for greyscale and palette or (rows, columns, 3) in RGB for
        colour; for "YBR_FULL"/"YBR_FULL_422" they are converted from RGB by pydicom before storing. Default:
        a left-to-right ramp over the whole stored range (so the leftmost column is the stored minimum).
    bits_allocated/bits_stored/signed: 8 or 16 bits allocated; bits_stored defaults to bits_allocated.
    number_of_frames > 1 repeats the frame. voi_lut_data adds a VOI LUT Sequence item whose descriptor is
    [len, voi_lut_first_mapped, voi_lut_bits]; presentation_lut_data likewise a Presentation LUT Sequence
    item, [len, 0, presentation_lut_bits]. pixel_padding_value / pixel_padding_range_limit: stored values,
    written as SS when signed, else US. palette: (entries, 3) uint16 LUT for "PALETTE COLOR" (16-bit
    entries, first mapped value 0). raw_elements: {tag: (VR, value bytes)} written byte for byte, unchecked,
    for malformed values pydicom would refuse to set. transfer_syntax: a compressed one (e.g. RLE Lossless)
    is produced with pydicom's own encoder.
    """
    bits_stored = bits_stored or bits_allocated
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")
    if pixels is None:
        pixels = _default_pixels(rows, columns, photometric, bits_stored, signed, dtype)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        pixels = convert_color_space(pixels, "RGB", "YBR_FULL")
    pixels = np.asarray(pixels, dtype=dtype)
    if number_of_frames > 1:
        pixels = np.stack([pixels] * number_of_frames)

    dataset = _empty_dataset(modality)
    dataset.set_pixel_data(pixels, photometric, bits_stored)
    if rescale_slope is not None or rescale_intercept is not None:
        dataset.RescaleSlope = rescale_slope if rescale_slope is not None else 1
        dataset.RescaleIntercept = rescale_intercept if rescale_intercept is not None else 0
    if window_center is not None and window_width is not None:
        dataset.WindowCenter, dataset.WindowWidth = window_center, window_width
    if voi_lut_data is not None:
        dataset.VOILUTSequence = [_lut_item(voi_lut_data, voi_lut_first_mapped, voi_lut_bits)]
    if presentation_lut_shape is not None:
        dataset.PresentationLUTShape = presentation_lut_shape
    if presentation_lut_data is not None:
        dataset.PresentationLUTSequence = [_lut_item(presentation_lut_data, 0, presentation_lut_bits)]
    for tag, value in ((0x00280120, pixel_padding_value), (0x00280121, pixel_padding_range_limit)):
        if value is not None:  # "US or SS" in the dictionary: the pixel representation decides
            dataset.add_new(tag, "SS" if signed else "US", value)
    if patient_name is not None:
        dataset.PatientName = patient_name
    for tag, (vr, value) in (raw_elements or {}).items():
        dataset[tag] = RawDataElement(Tag(tag), vr, len(value), value, value_tell=0, is_implicit_VR=False,
                                      is_little_endian=True)
    if palette is not None:
        _set_palette(dataset, palette)
    if transfer_syntax != ExplicitVRLittleEndian:
        dataset.compress(transfer_syntax)
    if not with_pixel_data:
        del dataset.PixelData
    return dataset


def make_dicom_bytes(*, preamble: bool = True, **dataset_options: Any) -> bytes:
    """``make_dicom_dataset(**dataset_options)`` written as bytes.

    preamble=True: a DICOM Part 10 file (128-byte preamble, "DICM", file meta). preamble=False: the bare
    dataset as sent over the network, Explicit VR Little Endian, without preamble or file meta.
    """
    dataset = make_dicom_dataset(**dataset_options)
    buffer = BytesIO()
    if preamble:
        dataset.save_as(buffer, enforce_file_format=True)
    else:
        dataset.preamble = None
        dataset.file_meta = FileMetaDataset()
        pydicom.dcmwrite(buffer, dataset, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def _save(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _default_pixels(rows: int, columns: int, photometric: str, bits_stored: int, signed: bool,
                    dtype: np.dtype) -> np.ndarray:
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        return rgb_ramp(columns, rows)
    low = -(2 ** (bits_stored - 1)) if signed else 0
    high = 2 ** (bits_stored - 1) - 1 if signed else 2**bits_stored - 1
    return ramp(columns, rows, low=low, high=high, dtype=dtype)


def _empty_dataset(modality: str) -> FileDataset:
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(None, {}, file_meta=file_meta, preamble=b"\x00" * 128)
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.Modality = modality
    dataset.PatientID = "TEST"
    return dataset


def _lut_item(lut_data: list[int], first_mapped: int, bits: int) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.LUTDescriptor = [len(lut_data), first_mapped, bits]
    item.add_new(0x00283006, "US", list(lut_data))  # LUTData
    return item


def _set_palette(dataset: pydicom.Dataset, palette: np.ndarray) -> None:
    entries = np.asarray(palette, dtype="<u2")
    for channel, colour in enumerate(("Red", "Green", "Blue")):
        setattr(dataset, f"{colour}PaletteColorLookupTableDescriptor", [len(entries), 0, 16])
        setattr(dataset, f"{colour}PaletteColorLookupTableData", entries[:, channel].tobytes())


def labelled_folder(root: Path, per_class: dict[str, int], *, seed: int = 0) -> Path:
    """An ImageFolder tree root/<class>/<i>.png of varied real PNGs (sizes, grey or colour, noise over a ramp), so
    each class's images differ from each other and from the other classes'. Returns root."""
    rng = np.random.default_rng(seed)
    for class_index, (name, count) in enumerate(per_class.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            width, height = int(rng.integers(48, 96)), int(rng.integers(48, 96))
            base = ramp(width, height, low=20 * class_index, high=255 - 20 * class_index).astype(np.int16)
            noisy = np.clip(base + rng.integers(-60, 60, size=(height, width)), 0, 255).astype(np.uint8)
            image = Image.fromarray(noisy) if i % 2 else Image.fromarray(noisy).convert("RGB")
            image.save(folder / f"{name}_{i:03d}.png")
    return root
