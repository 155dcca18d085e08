"""Uploaded bytes -> one 8-bit RGB PIL image, ready for an open_clip preprocess.

Accepts PNG, JPEG, TIFF (Pillow) and DICOM (pydicom 3 and its pylibjpeg plugins). The format comes from
the content's magic bytes, never from a file name. The pixel count is checked against ``max_pixels`` before
any pixel data is decoded, so a small file declaring a huge image (a decompression bomb) is refused
cheaply; a deflated DICOM dataset is inflated only as far as an image within that count could need.
Every way of failing ends as a MedzeroError: empty or corrupt input -> InvalidImage, a known format we do
not take -> UnsupportedMediaType, a DICOM we cannot render -> UnsupportedDicom, too many pixels (or
inflated bytes) -> ImageTooLarge, one side over ``max_aspect_ratio`` times the other -> ExtremeAspectRatio
(open_clip resizes the short side to the model's input, so a 10 x 200000 strip would become gigabytes; the
ratio is checked from the header, like the pixel count).

Messages and log lines never carry what Pillow or pydicom said: their exception texts quote the file (element
values, chunk bytes), which can be patient data. Each failure kind has a fixed message; the exception's type
name is logged at debug level, and the exception itself stays chained for a debugger.

DICOM greyscale follows the standard's display pipeline: modality LUT (rescale), then pydicom's choice of VOI
(the VOI LUT, else the first window), else a robust 0.5-99.5 percentile window that leaves Pixel Padding
Value pixels out (and shows them black); then the Presentation LUT. MONOCHROME1 is shown inverted so that
every radiograph reads the usual way (air dark, bone bright).
"""

import logging
import math
import struct
import warnings
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Literal

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_presentation_lut,
    apply_voi_lut,
    as_pixel_options,
    get_decoder,
)
from pydicom.pixels.common import PhotometricInterpretation
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from app.errors import ExtremeAspectRatio, ImageTooLarge, InvalidImage, UnsupportedDicom, UnsupportedMediaType

log = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("png", "jpeg", "tiff", "dicom")
_ACCEPTED_NAMES = "PNG, JPEG, TIFF or DICOM"
_LIMIT_SETTING = "MEDZERO_MAX_IMAGE_PIXELS"
_ASPECT_SETTING = "MEDZERO_MAX_ASPECT_RATIO"

_PILLOW_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
_PILLOW_FORMAT_NAMES = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}

# (offset, magic, name) of formats people plausibly upload that we refuse with 415 rather than "not an image".
_REFUSED_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"%PDF-", "PDF"),
    (0, b"PK\x03\x04", "ZIP"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000 (JP2)"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (0, b"II+\x00", "BigTIFF"),
    (0, b"MM\x00+", "BigTIFF"),
    (0, b"8BPS", "Photoshop PSD"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypavif", "AVIF"),
    (344, b"n+1\x00", "NIfTI"),
    (344, b"ni1\x00", "NIfTI"),
)

# Pillow's plugins signal a corrupt or truncated file with any of these, not one base class.
_PILLOW_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError,
                         ZeroDivisionError)
# Likewise pydicom's parser and its decoding plugins on malformed datasets.
_PYDICOM_ERRORS = (InvalidDicomError, BytesLengthException, OSError, EOFError, ValueError, KeyError, IndexError,
                   TypeError, AttributeError, NotImplementedError, RuntimeError, OverflowError, struct.error,
                   zlib.error)
# A deflated DICOM dataset is inflated at most to this many bytes per allowed pixel (16-bit RGB needs 6, 64-bit
# greyscale 8), plus room for the elements around the pixel data; past that it can only be a bomb.
_INFLATED_BYTES_PER_PIXEL = 8
_INFLATED_HEADROOM_BYTES = 16 << 20
_INFLATE_PIECE_BYTES = 16 << 20

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# The standard's defined terms: only these are ever named back; anything else in the element is the file's text.
_STANDARD_PHOTOMETRICS = frozenset(term.value for term in PhotometricInterpretation)
_ROBUST_PERCENTILES = (0.5, 99.5)   # ignores burnt-in labels and collimator edges when no window is given
_DISPLAY_LEVELS = np.arange(256, dtype=np.uint8)   # every 8-bit display value, for tabulating a presentation LUT
_DISPLAY_LEVELS.setflags(write=False)               # shared by every decode thread


def _withhold_decoder_logs() -> None:
    """Keep pydicom's and Pillow's own log records from being made at all.

    They quote what they parse: pydicom warns with a malformed element's value ("Invalid value for VR IS:
    '...'"), Pillow's TIFF and PNG plugins log tag values and chunk names at debug level; any of it can be
    patient data, and MEDZERO_LOG_LEVEL=debug would pass it on. Neither library logs at CRITICAL, so this
    silences both; a developer who wants them lowers the level again (pydicom.config.debug() does). pydicom
    also raises the same text as a UserWarning, which Python prints to stderr: those are ignored too.
    """
    for name in ("pydicom", "PIL"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


_withhold_decoder_logs()


@dataclass(frozen=True)
class DecodedImage:
    """What an upload decoded to, and which format it was detected as."""

    image: Image.Image  # mode "RGB", 8 bits per channel
    format: str         # "png" | "jpeg" | "tiff" | "dicom"


def detect_format(data: bytes) -> str:
    """Name the accepted format of ``data`` from its content, or raise why it is not accepted."""
    if not data:
        raise InvalidImage(f"empty upload: no image bytes received; send {_ACCEPTED_NAMES}")
    # Checked before the others: a dual-personality DICOM file may carry a TIFF header in its preamble.
    if data[128:132] == b"DICM":
        return "dicom"
    for magic, name in _PILLOW_SIGNATURES:
        if data.startswith(magic):
            return name
    if refused := _refused_format_name(data):
        raise UnsupportedMediaType(f"{refused} files are not accepted; send {_ACCEPTED_NAMES}")
    if _looks_like_bare_dicom(data):
        return "dicom"
    raise InvalidImage(f"not a recognised image; send {_ACCEPTED_NAMES}")


def decode_image(data: bytes, *, max_pixels: int, max_aspect_ratio: float) -> DecodedImage:
    """Decode uploaded bytes into an 8-bit RGB image, refusing more than ``max_pixels`` pixels and a long
    side more than ``max_aspect_ratio`` times the short one."""
    image_format = detect_format(data)
    if image_format == "dicom":
        image = dicom_to_image(read_dicom(data, max_pixels=max_pixels), max_pixels=max_pixels,
                               max_aspect_ratio=max_aspect_ratio)
    else:
        image = _decode_with_pillow(data, image_format, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
    return DecodedImage(image=image, format=image_format)


def dicom_to_image(dataset: pydicom.Dataset, *, max_pixels: int, max_aspect_ratio: float) -> Image.Image:
    """Render the single frame of a DICOM dataset as an 8-bit RGB image the way a viewer would show it."""
    _check_dicom_geometry(dataset, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
    _check_photometric_term(dataset)
    stored_pixels, photometric = _decode_dicom_pixels(dataset)
    try:
        if photometric in _MONOCHROME:
            return Image.fromarray(_greyscale_to_uint8(stored_pixels, dataset)).convert("RGB")
        if photometric == "PALETTE COLOR":
            return Image.fromarray(_palette_to_uint8(stored_pixels, dataset))
        if photometric == "RGB":
            return Image.fromarray(_colour_to_uint8(stored_pixels, int(dataset.BitsStored)))
    except _PYDICOM_ERRORS as exc:
        log.debug("rendering %s DICOM pixel data failed: %s", photometric, type(exc).__name__)
        raise UnsupportedDicom(f"cannot render {photometric} DICOM pixel data") from exc
    if photometric in _STANDARD_PHOTOMETRICS:
        raise UnsupportedDicom(f"photometric interpretation {photometric} is not supported")
    raise UnsupportedDicom("the DICOM photometric interpretation (0028,0004) is not a standard one")


# --- format detection -------------------------------------------------------------------------------------


def _refused_format_name(data: bytes) -> str | None:
    for offset, magic, name in _REFUSED_SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    # "BM" alone is too weak (plain text may start with it); the BMP header's reserved bytes must be zero.
    if data[:2] == b"BM" and len(data) >= 26 and data[6:10] == b"\x00\x00\x00\x00":
        return "BMP"
    return None


def _looks_like_bare_dicom(data: bytes) -> bool:
    """A DICOM stream without preamble: starts with a group 0x0002/0x0008 tag and parses to a real dataset.

    force=True makes pydicom read almost anything, so a parse alone proves nothing: we also want a
    well-formed SOP Class UID, or pixel data with its Rows and Columns.
    """
    if data[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x08"):
        return False
    try:
        dataset = pydicom.dcmread(BytesIO(data), force=True)
        sop_class = dataset.get("SOPClassUID")
        if sop_class and UID(str(sop_class)).is_valid:
            return True
        return all(keyword in dataset for keyword in ("PixelData", "Rows", "Columns"))
    except Exception:  # noqa: BLE001 - sniffing: whatever pydicom raises on these bytes means "not DICOM"
        return False


# --- PNG, JPEG, TIFF --------------------------------------------------------------------------------------


def _decode_with_pillow(data: bytes, image_format: str, *, max_pixels: int, max_aspect_ratio: float) -> Image.Image:
    try:
        # `formats` pins the plugin to what the magic bytes said; Pillow must not guess another one.
        with Image.open(BytesIO(data), formats=[_PILLOW_FORMAT_NAMES[image_format]]) as opened:
            # Open is lazy: only the header is read so far. Multi-page TIFF and animated PNG: the first
            # frame is the one Pillow has open and the only one we decode, so its size is what counts.
            _check_image_size(opened.width, opened.height, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
            opened.load()
            return _pillow_to_rgb(opened)
    # Pillow's own global limit can fire inside open() before our check; either way it is a bomb, not a 500.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge("image refused as a decompression bomb by Pillow's own size limit") from exc
    except _PILLOW_DECODE_ERRORS as exc:
        log.debug("Pillow could not decode a %s upload: %s", image_format.upper(), type(exc).__name__)
        raise InvalidImage(f"corrupt or truncated {image_format.upper()} image") from exc


def _pillow_to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB copy of ``image`` (the caller closes the original)."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]   # a float TIFF may hold NaN or infinities: left out of the range
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        scaled = _rescale_to_uint8(values, low=low, high=high)
        return Image.fromarray(scaled).convert("RGB")
    # Alpha (RGBA, LA, PA, P with transparency) is dropped, not composited: open_clip's own preprocess does
    # image.convert("RGB") too, so a file scores the same whether or not it went through this service.
    return image.convert("RGB")


def _check_image_size(width: int, height: int, *, max_pixels: int, max_aspect_ratio: float) -> None:
    """Refuse, from the header's size alone, what must not be decoded or handed to the model's resize."""
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image is {width}x{height}: a side of zero pixels leaves nothing to show")
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels, over the limit of "
                            f"{max_pixels} ({_LIMIT_SETTING})")
    aspect_ratio = max(width, height) / min(width, height)
    if aspect_ratio > max_aspect_ratio:
        raise ExtremeAspectRatio(f"image is {width}x{height}, an aspect ratio of {aspect_ratio:.2f} (long side / "
                                 f"short side), over the limit of {max_aspect_ratio:g} ({_ASPECT_SETTING})")


def _rescale_to_uint8(values: np.ndarray, *, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255 (float64 arithmetic, clipped, rounded)."""
    # A constant image has no contrast to stretch, and a range that is not finite none to map: keep it black
    # rather than divide by 0 or infinity.
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        return np.zeros(values.shape, dtype=np.uint8)
    unit = (values.astype(np.float64) - low) / (high - low)
    # NaN pixels show black: casting NaN to uint8 would give whatever the platform makes of it.
    return np.rint(np.nan_to_num(np.clip(unit, 0.0, 1.0), nan=0.0) * 255.0).astype(np.uint8)


# --- DICOM ------------------------------------------------------------------------------------------------


def read_dicom(data: bytes, *, max_pixels: int) -> Dataset:
    """Parse uploaded DICOM bytes (Part 10 or a bare dataset); a deflated dataset is inflated within a bound
    derived from ``max_pixels`` (ImageTooLarge past it), and every parse failure is InvalidImage."""
    try:
        dataset = _read_deflated(data, max_pixels=max_pixels)
        if dataset is None:
            dataset = pydicom.dcmread(BytesIO(data), force=True)
    except _PYDICOM_ERRORS as exc:
        log.debug("pydicom could not read a DICOM upload: %s", type(exc).__name__)
        raise InvalidImage("corrupt DICOM file") from exc
    if not dataset.file_meta.get("TransferSyntaxUID"):
        # A bare dataset stream has no file meta; the encoding pydicom read it with is the transfer syntax.
        dataset.file_meta.TransferSyntaxUID = _transfer_syntax_from_encoding(*dataset.original_encoding)
    return dataset


def read_part10(data: bytes, *, max_pixels: int) -> Dataset:
    """A DICOM Part 10 file as STOW-RS and C-STORE deliver it (preamble and file meta required, nothing forced);
    a deflated dataset is inflated within the bound read_dicom uses (ImageTooLarge past it). pydicom's errors
    propagate for the caller to name."""
    dataset = _read_deflated(data, max_pixels=max_pixels)
    return dataset if dataset is not None else pydicom.dcmread(BytesIO(data))


def _read_deflated(data: bytes, *, max_pixels: int) -> Dataset | None:
    """A Deflated Explicit VR Little Endian file, inflated here within a bound; None for any other file.

    pydicom inflates such a dataset whole, in memory, before it reads one element: 50 MB of deflated zeros
    would become 50 GB. No frame within ``max_pixels`` needs more than _INFLATED_BYTES_PER_PIXEL bytes a pixel,
    so inflating stops past that (plus headroom), and the file is refused as the decompression bomb it is.
    """
    stream = BytesIO(data)
    try:
        if read_preamble(stream, force=True) is None:
            return None
        file_meta = FileMetaDataset(read_dataset(stream, is_implicit_VR=False, is_little_endian=True,
                                                 stop_when=lambda tag, vr, length: tag >> 16 != 2))
        if file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return None
    except _PYDICOM_ERRORS:   # file meta this peek cannot read (implicit VR, say): pydicom's own reader decides
        return None
    limit = max_pixels * _INFLATED_BYTES_PER_PIXEL + _INFLATED_HEADROOM_BYTES
    inflater, pending = zlib.decompressobj(-zlib.MAX_WBITS), memoryview(data)[stream.tell():]
    pieces, size = [], 0
    while True:   # in pieces, so a bomb costs at most `limit` bytes of memory before it is refused
        piece = inflater.decompress(pending, _INFLATE_PIECE_BYTES)
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            raise ImageTooLarge(f"deflated DICOM dataset inflates past {limit} bytes, more than an image within "
                                f"the limit of {max_pixels} pixels needs ({_LIMIT_SETTING})")
        pending = inflater.unconsumed_tail
        if inflater.eof or not (pending or piece):
            break
    if not inflater.eof:
        raise InvalidImage("corrupt DICOM file: its deflated dataset is truncated")
    dataset = pydicom.dcmread(BytesIO(b"".join(pieces)), force=True)
    dataset.file_meta = file_meta
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian   # what the bytes read are now
    return dataset


def _transfer_syntax_from_encoding(is_implicit_vr: bool | None, is_little_endian: bool | None) -> UID:
    if is_implicit_vr:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if is_little_endian is not False else ExplicitVRBigEndian


def _check_dicom_geometry(dataset: Dataset, *, max_pixels: int, max_aspect_ratio: float) -> None:
    """Refuse what we cannot or must not decode, reading only header elements (never PixelData)."""
    if "PixelData" not in dataset:
        raise UnsupportedDicom("DICOM has no pixel data (7FE0,0010); send an image object, not a report")
    try:
        frame_count = int(dataset.get("NumberOfFrames") or 1)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except _PYDICOM_ERRORS as exc:
        log.debug("DICOM geometry elements unreadable: %s", type(exc).__name__)
        raise UnsupportedDicom("DICOM image geometry (Rows, Columns, NumberOfFrames) is unreadable") from exc
    # Frames first: we never decode more than one, so a multi-frame object is refused for that reason.
    if frame_count > 1:
        raise UnsupportedDicom(f"multi-frame DICOM is not supported yet (this one has {frame_count} frames)")
    _check_image_size(columns, rows, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)


def _check_photometric_term(dataset: Dataset) -> None:
    """Refuse a photometric interpretation that is no term of the standard before a decoder calls it corrupt."""
    try:
        declared = dataset.get("PhotometricInterpretation")
    except _PYDICOM_ERRORS as exc:
        raise UnsupportedDicom("the DICOM photometric interpretation (0028,0004) is unreadable") from exc
    if declared is not None and str(declared) not in _STANDARD_PHOTOMETRICS:
        raise UnsupportedDicom("the DICOM photometric interpretation (0028,0004) is not a standard one")


def _decode_dicom_pixels(dataset: Dataset) -> tuple[np.ndarray, str]:
    """The first frame's stored values and the photometric interpretation they are in after decoding.

    pydicom 3 converts YBR_FULL and YBR_FULL_422 to RGB by default, and its JPEG 2000 decoder undoes the
    YBR_RCT/YBR_ICT component transform; the decoder's reported interpretation says which happened.
    """
    file_meta = getattr(dataset, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not transfer_syntax:
        raise UnsupportedDicom("DICOM has no transfer syntax UID (0002,0010), so its pixel data cannot be decoded")
    transfer_syntax = UID(transfer_syntax)
    syntax_name = _transfer_syntax_name(transfer_syntax)
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as exc:
        raise UnsupportedDicom(f"DICOM transfer syntax {syntax_name} is not supported") from exc
    if not decoder.is_available:
        raise UnsupportedDicom(f"no decoder installed for DICOM transfer syntax {syntax_name} "
                               f"(missing: {', '.join(decoder.missing_dependencies) or 'a plugin'})")
    try:
        pixels, properties = decoder.as_array(dataset, index=0, **as_pixel_options(dataset))
    except _PYDICOM_ERRORS as exc:
        log.debug("decoding %s DICOM pixel data failed: %s", syntax_name, type(exc).__name__)
        raise InvalidImage(f"corrupt DICOM pixel data ({syntax_name})") from exc
    return pixels, str(properties.get("photometric_interpretation", dataset.PhotometricInterpretation))


def _transfer_syntax_name(transfer_syntax: UID) -> str:
    """pydicom's name for a known UID, the dotted UID for an unknown one; never a malformed value's text."""
    return transfer_syntax.name if transfer_syntax.is_valid else "(malformed UID)"


def _greyscale_to_uint8(stored_pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Modality LUT, VOI, then presentation (MONOCHROME1 inverted): a (rows, columns) uint8 display image."""
    if stored_pixels.ndim != 2:
        raise UnsupportedDicom(f"greyscale DICOM frame has shape {stored_pixels.shape}, expected (rows, columns)")
    modality_values = apply_modality_lut(stored_pixels, dataset)
    if not np.isfinite(modality_values).all():   # a NaN or infinite slope, or one that overflows float64
        raise UnsupportedDicom("the DICOM rescale slope and intercept (0028,1053 / 0028,1052) do not map the "
                               "stored values to finite numbers")
    display = _apply_dataset_voi(modality_values, dataset)
    if display is not None:
        return _apply_presentation(display, dataset)
    # Without a VOI of its own, the window comes from the data, and padding is no part of the data: left
    # out of the percentiles (a large padded frame would otherwise squash the anatomy into a few levels)
    # and shown black, after any inversion.
    padding = _padding_mask(stored_pixels, dataset)
    display = _apply_presentation(_apply_data_window(modality_values, dataset, padding), dataset)
    return display if padding is None else np.where(padding, np.uint8(0), display)


def _apply_dataset_voi(modality_values: np.ndarray, dataset: Dataset) -> np.ndarray | None:
    """The dataset's own VOI mapped to 0..255 by that VOI's output range; None without a usable one."""
    try:
        voi_kind = _voi_kind(dataset)
        if voi_kind == "lut":
            # A LUT is indexed by integers. Its own output range maps to 0..255, not 2**bits - 1 from its
            # descriptor: vendors often declare 16-bit entries holding 12-bit values, which would render nearly black.
            voi_values = apply_voi_lut(np.rint(modality_values).astype(np.int64), dataset, index=0, prefer_lut=True)
            low, high = _voi_lut_output_range(dataset)
        elif voi_kind == "window":
            voi_values = apply_voi_lut(modality_values, dataset, index=0, prefer_lut=True)
            low, high = _window_output_range(dataset)
        else:
            return None
    except _PYDICOM_ERRORS as exc:  # a malformed window (width 0, unknown VOI function) is no reason to refuse
        log.debug("DICOM VOI unusable, windowing from the data instead: %s", type(exc).__name__)
        return None
    if not (np.isfinite(voi_values).all() and math.isfinite(low) and math.isfinite(high)):
        log.debug("DICOM VOI gives values that are not finite (NaN or infinite window), windowing from the data")
        return None   # pydicom lets a NaN centre or an infinite width through; it would render a black frame
    return _rescale_to_uint8(voi_values, low=low, high=high)


def _voi_kind(dataset: Dataset) -> Literal["lut", "window"] | None:
    """Which VOI pydicom's apply_voi_lut applies to this dataset: "lut", "window" or None.

    Asked of pydicom on one value rather than re-derived here (prefer_lut: the VOI LUT Sequence wins over
    the window, as in pydicom's own pipeline): a LUT answers with its integer entries, a window in float64,
    and without either the input comes back untouched.
    """
    probe = np.zeros(1, dtype=np.int64)
    answer = apply_voi_lut(probe, dataset, index=0, prefer_lut=True)
    if answer is probe:
        return None
    return "lut" if np.issubdtype(answer.dtype, np.integer) else "window"


def _voi_lut_output_range(dataset: Dataset) -> tuple[float, float]:
    first_mapped, entry_count = _lut_domain(dataset.VOILUTSequence[0].LUTDescriptor)
    lut_outputs = apply_voi_lut(np.arange(first_mapped, first_mapped + entry_count), dataset, index=0,
                                prefer_lut=True)
    return float(lut_outputs.min()), float(lut_outputs.max())


def _lut_domain(descriptor: list[int]) -> tuple[int, int]:
    entry_count, first_mapped = int(descriptor[0]) or 2**16, int(descriptor[1])
    return first_mapped, entry_count


def _window_output_range(dataset: Dataset) -> tuple[float, float]:
    # pydicom's windowing outputs into a range it derives from BitsStored and the rescale; probing it at
    # -inf and +inf reads that range back instead of re-deriving it here (works for LINEAR and SIGMOID).
    window_range = apply_voi_lut(np.array([-np.inf, np.inf]), dataset, index=0, prefer_lut=True)
    return float(window_range[0]), float(window_range[1])


def _apply_data_window(modality_values: np.ndarray, dataset: Dataset, padding: np.ndarray | None) -> np.ndarray:
    """No VOI in the file: 8-bit data as stored, else the robust percentile window of the non-padding pixels."""
    image_values = modality_values if padding is None else modality_values[~padding]
    if image_values.size == 0:  # nothing but padding: nothing to show
        return np.zeros(modality_values.shape, dtype=np.uint8)
    if _is_display_ready_8bit(image_values, dataset):
        return modality_values.astype(np.uint8)
    low, high = np.percentile(image_values, _ROBUST_PERCENTILES)
    return _rescale_to_uint8(modality_values, low=float(low), high=float(high))


def _padding_mask(stored_pixels: np.ndarray, dataset: Dataset) -> np.ndarray | None:
    """Where the frame holds Pixel Padding Value (0028,0120), or the inclusive range it spans with Pixel
    Padding Range Limit (0028,0121); None without padding.

    Compared on the stored values, before the modality LUT, as PS3.3 C.7.5.1.1.2 defines both attributes.
    """
    if "PixelPaddingValue" not in dataset:
        return None
    try:
        limits = [int(dataset.PixelPaddingValue)]
        if "PixelPaddingRangeLimit" in dataset:
            limits.append(int(dataset.PixelPaddingRangeLimit))
    except _PYDICOM_ERRORS as exc:  # a malformed padding value pads nothing; the image itself is fine
        log.debug("DICOM pixel padding attributes unreadable, ignored: %s", type(exc).__name__)
        return None
    padding = (stored_pixels >= min(limits)) & (stored_pixels <= max(limits))
    return padding if padding.any() else None


def _apply_presentation(display: np.ndarray, dataset: Dataset) -> np.ndarray:
    """MONOCHROME1's inversion, then the Presentation LUT (Sequence or Shape), on 8-bit display values."""
    presentation = _presentation_table(dataset)
    # PS3.3 C.7.6.3.1.2: MONOCHROME1 shows its minimum white. A presentation LUT that falls from first entry
    # to last (INVERSE, which DX requires with MONOCHROME1) already is that inversion; doing both would undo it.
    already_inverted = presentation is not None and presentation[0] > presentation[-1]
    if dataset.PhotometricInterpretation == "MONOCHROME1" and not already_inverted:
        display = 255 - display
    return display if presentation is None else presentation[display]


def _presentation_table(dataset: Dataset) -> np.ndarray | None:
    """The dataset's Presentation LUT as a 256-entry uint8 table over display values; None without one.

    pydicom's apply_presentation_lut scales its input by the array's own minimum and maximum (a Sequence)
    or inverts about its maximum (INVERSE). Run once over all 256 display levels, both work on the display
    range, not on whatever range one image happens to span.
    """
    try:
        p_values = apply_presentation_lut(_DISPLAY_LEVELS, dataset)
        if p_values is _DISPLAY_LEVELS:
            return None
        if "PresentationLUTSequence" in dataset:
            # PS3.3 C.11.4.1: a Sequence's entries are P-values from 0 to 2**n - 1, n its descriptor's third value.
            p_value_max = 2 ** int(dataset.PresentationLUTSequence[0].LUTDescriptor[2]) - 1
            return _rescale_to_uint8(p_values, low=0.0, high=float(p_value_max))
        return p_values.astype(np.uint8)
    except _PYDICOM_ERRORS as exc:  # LIN OD, an unknown shape or a malformed LUT: shown as if it were absent
        log.debug("DICOM presentation LUT unusable, ignored: %s", type(exc).__name__)
        return None


def _is_display_ready_8bit(modality_values: np.ndarray, dataset: Dataset) -> bool:
    """8-bit data already within 0..255 and no window: shown as stored, as the same image saved as PNG is."""
    return (int(dataset.get("BitsStored") or 16) <= 8 and float(modality_values.min()) >= 0
            and float(modality_values.max()) <= 255)


def _palette_to_uint8(stored_pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    colours = apply_color_lut(stored_pixels, dataset)[..., :3]  # an alpha LUT, if any, is dropped as for PNG
    # Scale by the descriptor's declared entry depth: 8-bit entries may be stored in 16-bit words.
    entry_bits = int(dataset.RedPaletteColorLookupTableDescriptor[2])
    return _rescale_to_uint8(colours, low=0.0, high=float(2**entry_bits - 1))


def _colour_to_uint8(stored_pixels: np.ndarray, bits_stored: int) -> np.ndarray:
    if stored_pixels.ndim != 3 or stored_pixels.shape[-1] != 3:
        raise UnsupportedDicom(f"colour DICOM frame has shape {stored_pixels.shape}, expected (rows, columns, 3)")
    if stored_pixels.dtype == np.uint8:
        return stored_pixels
    return _rescale_to_uint8(stored_pixels, low=0.0, high=float(2**bits_stored - 1))
