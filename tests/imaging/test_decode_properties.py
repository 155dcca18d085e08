"""Property tests of app.imaging.decode on hostile bytes: random bytes, real and Pillow/pydicom-written files
mutated (bit flips, overwrites, truncations, insertions, splices), PNG headers with every field drawn, and DICOM
datasets whose pixel-module elements hold absurd values.

The one property: an upload either decodes to an 8-bit RGB image within the size limits, which open_clip's
preprocess turns into a finite (3, S, S) tensor, or is refused with one of the decoder's own 4xx MedzeroErrors;
never another exception, never a hang (each decode runs in a thread that must finish within HANG_SECONDS).
Targeted cases pin what each refusal is: decompression bombs, zero-sized and huge images, absurd DICOM tags.
"""

import io
import os
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from open_clip.transform import image_transform
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from app.errors import (
    ExtremeAspectRatio,
    ImageTooLarge,
    InvalidImage,
    MedzeroError,
    UnsupportedDicom,
    UnsupportedMediaType,
)
from app.imaging.decode import ACCEPTED_FORMATS, DecodedImage, decode_image
from app.imaging.files import IMAGE_SUFFIXES, image_files
from tests.factories import (
    jpeg_bytes,
    make_dicom_bytes,
    make_dicom_dataset,
    png_bytes,
    shared_data_dir,
    tiff_bytes,
)

# The Settings defaults (MEDZERO_MAX_IMAGE_PIXELS, MEDZERO_MAX_ASPECT_RATIO).
MAX_PIXELS = 64 * 2**20
MAX_ASPECT_RATIO = 20.0
HANG_SECONDS = 30           # far over any honest decode here; only a hang (or a pathological blow-up) reaches it
MODEL_IMAGE_SIZE = 64       # models/medzero-tiny.json: what the tests' encoder resizes to
DECODER_CODES = {InvalidImage.code, UnsupportedMediaType.code, UnsupportedDicom.code, ImageTooLarge.code,
                 ExtremeAspectRatio.code}
PREPROCESS = image_transform(MODEL_IMAGE_SIZE, is_train=False)

# Bounded and database-less: a few seconds per test on two shared cores, and no .hypothesis folder in the tree.
# (Pillow and pydicom run slower under a shared load, hence no per-example deadline; hangs are HANG_SECONDS.)
FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Numpy casting NaN to uint8 gives platform-dependent garbage pixels: the decoder must never do it. pydicom's own
# complaints about these files are expected (the decoder silences them; pytest's warning capture brings them back).
pytestmark = [pytest.mark.filterwarnings("error:invalid value encountered in cast:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning:pydicom"),
              pytest.mark.filterwarnings("ignore::UserWarning:PIL"), pytest.mark.timeout(300)]


def decode_or_refusal(data: bytes, *, max_pixels: int = MAX_PIXELS) -> DecodedImage | MedzeroError:
    """decode_image(data) in a thread that must end within HANG_SECONDS: the checked image, or the decoder's 4xx
    refusal. Anything else it raises is re-raised here, failing the test."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = decode_image(data, max_pixels=max_pixels, max_aspect_ratio=MAX_ASPECT_RATIO)
        except MedzeroError as exc:
            outcome["value"] = exc
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which re-raises it
            outcome["unexpected"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(HANG_SECONDS)
    assert not worker.is_alive(), f"decode_image did not finish within {HANG_SECONDS} s on {len(data)} bytes"
    if "unexpected" in outcome:
        raise outcome["unexpected"]  # type: ignore[misc]
    value = outcome["value"]
    if isinstance(value, MedzeroError):
        assert 400 <= value.status_code < 500, f"{value.code} is a {value.status_code}, not a refusal"
        assert value.code in DECODER_CODES, f"decoder refused with an unexpected code {value.code}"
        assert value.message and len(value.message) < 500
        return value
    assert isinstance(value, DecodedImage)
    check_decoded(value, max_pixels=max_pixels)
    return value


def check_decoded(decoded: DecodedImage, *, max_pixels: int = MAX_PIXELS) -> None:
    """What the service hands the encoder: an RGB image inside the limits, a finite (3, S, S) tensor."""
    assert decoded.format in ACCEPTED_FORMATS
    image = decoded.image
    assert image.mode == "RGB"
    width, height = image.size
    assert width > 0 and height > 0
    assert width * height <= max_pixels
    assert max(width, height) / min(width, height) <= MAX_ASPECT_RATIO
    pixels = np.asarray(image)
    assert pixels.shape == (height, width, 3) and pixels.dtype == np.uint8
    tensor = PREPROCESS(image)
    assert tuple(tensor.shape) == (3, MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE)
    assert bool(torch.isfinite(tensor).all())


# --- seeds: small valid files of every kind the decoder takes ----------------------------------------------


def _seed_files() -> dict[str, bytes]:
    size = {"width": 24, "height": 16}
    seeds = {f"png-{mode}": png_bytes(mode=mode, **size) for mode in ("RGB", "L", "LA", "RGBA", "P", "1", "I;16")}
    seeds |= {f"jpeg-{mode}": jpeg_bytes(mode=mode, **size) for mode in ("RGB", "L", "CMYK")}
    seeds |= {f"tiff-{mode}": tiff_bytes(mode=mode, **size) for mode in ("RGB", "I", "CMYK")}
    seeds["tiff-pages"] = tiff_bytes(pages=2, **size)
    seeds["dicom-mono8"] = make_dicom_bytes(rows=16, columns=24)
    seeds["dicom-mono1-16bit-window"] = make_dicom_bytes(rows=16, columns=24, photometric="MONOCHROME1",
                                                         bits_allocated=16, bits_stored=12, window_center=2000,
                                                         window_width=1000)
    seeds["dicom-signed-rescale"] = make_dicom_bytes(rows=16, columns=24, bits_allocated=16, signed=True,
                                                     rescale_slope=2, rescale_intercept=-1024)
    seeds["dicom-rgb"] = make_dicom_bytes(rows=16, columns=24, photometric="RGB")
    palette = np.stack([np.arange(256) * 257] * 3, axis=-1)
    seeds["dicom-palette"] = make_dicom_bytes(rows=16, columns=24, photometric="PALETTE COLOR", palette=palette)
    seeds["dicom-rle"] = make_dicom_bytes(rows=16, columns=24, bits_allocated=16, transfer_syntax=RLELossless)
    seeds["dicom-voi-lut"] = make_dicom_bytes(rows=16, columns=24, voi_lut_data=list(range(0, 4096, 16)))
    seeds["dicom-bare"] = make_dicom_bytes(rows=16, columns=24, preamble=False)
    return seeds


SEEDS = _seed_files()
SEED_NAMES = sorted(SEEDS)


def test_every_seed_decodes() -> None:
    """The mutation tests start from files that decode: otherwise they would only ever test refusals."""
    for name in SEED_NAMES:
        decoded = decode_or_refusal(SEEDS[name])
        assert isinstance(decoded, DecodedImage), f"seed {name} does not decode: {decoded!r}"
        assert decoded.image.size == (24, 16), name


# --- mutations ----------------------------------------------------------------------------------------------


def _position(length: int) -> st.SearchStrategy[int]:
    """A byte offset in a file of `length` bytes, drawn near the headers as often as anywhere."""
    if length <= 1:
        return st.just(0)
    return st.one_of(st.integers(0, min(length, 512) - 1), st.integers(0, length - 1))


@st.composite
def mutated(draw: st.DrawFn, original: bytes, *, splice_with: Callable[[], bytes] | None = None) -> bytes:
    """`original` after one to four edits: bit flip, byte overwrite, run of random bytes, deletion, insertion,
    duplicated range, truncation, or a splice with another file's tail."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "byte", "overwrite", "delete", "insert", "duplicate", "truncate",
                                     "splice"]))
        at = draw(_position(len(data)))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif kind == "overwrite":
            run = draw(st.binary(min_size=1, max_size=16))
            data[at:at + len(run)] = run
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 256))]
        elif kind == "truncate":
            del data[at:]
        elif splice_with is not None:
            other = splice_with()
            data[at:] = other[draw(_position(len(other))):]
    return bytes(data)


@st.composite
def mutated_seed(draw: st.DrawFn) -> bytes:
    original = SEEDS[draw(st.sampled_from(SEED_NAMES))]
    return draw(mutated(original, splice_with=lambda: SEEDS[draw(st.sampled_from(SEED_NAMES))]))


# --- the property, on every kind of hostile bytes ----------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_decode_or_are_refused(data: bytes) -> None:
    decode_or_refusal(data)


MAGIC_PREFIXES = [
    b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"II*\x00", b"MM\x00*",
    b"\x00" * 128 + b"DICM", b"\x02\x00\x00\x00UL\x04\x00", b"\x08\x00\x05\x00CS", b"\x08\x00\x16\x00UI",
    b"GIF89a", b"%PDF-", b"PK\x03\x04", b"\x1f\x8b", b"\xff\x4f\xff\x51", b"8BPS", b"II+\x00", b"BM",
    b"RIFF\x00\x00\x00\x00WEBP",
]
REFUSED_PREFIXES = {b"GIF89a", b"%PDF-", b"PK\x03\x04", b"\x1f\x8b", b"\xff\x4f\xff\x51", b"8BPS", b"II+\x00",
                    b"RIFF\x00\x00\x00\x00WEBP"}


@FUZZ
@given(prefix=st.sampled_from(MAGIC_PREFIXES), rest=st.binary(max_size=2048))
def test_random_bytes_behind_a_known_signature(prefix: bytes, rest: bytes) -> None:
    """Past the magic bytes the parsers themselves run on garbage; a refused format stays a 415."""
    data = prefix + rest
    outcome = decode_or_refusal(data)
    if prefix in REFUSED_PREFIXES and data[128:132] != b"DICM":
        assert isinstance(outcome, UnsupportedMediaType)


@FUZZ
@given(data=mutated_seed())
def test_mutated_files_decode_or_are_refused(data: bytes) -> None:
    decode_or_refusal(data)


@FUZZ
@given(name=st.sampled_from(SEED_NAMES), data=st.data())
def test_every_truncation_decodes_or_is_refused(name: str, data: st.DataObject) -> None:
    original = SEEDS[name]
    cut = data.draw(_position(len(original)), label="cut")
    decode_or_refusal(original[:cut])


@FUZZ
@given(first=st.sampled_from(SEED_NAMES), second=st.sampled_from(SEED_NAMES), data=st.data())
def test_spliced_files_decode_or_are_refused(first: str, second: str, data: st.DataObject) -> None:
    """The head of one format on the tail of another: a PNG signature on a DICOM body, a DICOM preamble on a
    JPEG's scan data, ..."""
    head, tail = SEEDS[first], SEEDS[second]
    cut_head = data.draw(_position(len(head)), label="cut head")
    cut_tail = data.draw(_position(len(tail)), label="cut tail")
    decode_or_refusal(head[:cut_head] + tail[cut_tail:])


# --- real DICOM files from ../shared/data/dicom, mutated ----------------------------------------------------

# The smaller of the shared files (a full decode of each stays well under a second): JPEG 2000, JPEG extended,
# palette colour, uncompressed signed CT, the 8-bit NIH radiograph.
REAL_DICOM_NAMES = ("US1_J2KR.dcm", "RG2_JPLY_fixed.dcm", "OBXXXX1A.dcm", "693_UNCR.dcm",
                    "nih_cxr14_dx_no_finding.dcm")


def _real_dicom_folder() -> Path | None:
    data_dir = shared_data_dir()
    folder = data_dir / "dicom" if data_dir is not None else None
    return folder if folder is not None and folder.is_dir() else None


@pytest.fixture(scope="module")
def real_dicoms() -> dict[str, bytes]:
    folder = _real_dicom_folder()
    if folder is None:
        pytest.skip("no ../shared/data/dicom in this checkout (the real DICOM files live outside the project)")
    files = {name: (folder / name).read_bytes() for name in REAL_DICOM_NAMES if (folder / name).is_file()}
    if not files:
        pytest.skip(f"none of {', '.join(REAL_DICOM_NAMES)} in {folder}")
    return files


def test_real_dicoms_decode_unmutated(real_dicoms: dict[str, bytes]) -> None:
    for name, data in real_dicoms.items():
        decoded = decode_or_refusal(data)
        assert isinstance(decoded, DecodedImage), f"{name} no longer decodes: {decoded!r}"
        assert decoded.format == "dicom"


@settings(FUZZ, max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_real_dicoms_decode_or_are_refused(real_dicoms: dict[str, bytes], data: st.DataObject) -> None:
    names = sorted(real_dicoms)
    original = real_dicoms[data.draw(st.sampled_from(names), label="file")]
    hostile = data.draw(mutated(original, splice_with=lambda: real_dicoms[data.draw(st.sampled_from(names))]),
                        label="mutated")
    decode_or_refusal(hostile)


# --- PNG headers with every field drawn (CRCs right, so the parser goes past them) --------------------------


def png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    body = chunk_type + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def png_file(width: int, height: int, *, bit_depth: int = 8, colour_type: int = 2, interlace: int = 0,
             idat: bytes = b"", extra_chunks: bytes = b"") -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra_chunks + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


SIDES = st.one_of(st.sampled_from([0, 1, 2, 3, 20, 21, 60000, 65535, 2**31 - 1, 2**32 - 1]), st.integers(0, 64))


@FUZZ
@given(width=SIDES, height=SIDES, bit_depth=st.sampled_from([0, 1, 2, 3, 4, 8, 16, 255]),
       colour_type=st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]), interlace=st.sampled_from([0, 1, 2]),
       scanlines=st.binary(max_size=512), compress=st.booleans(),
       palette=st.one_of(st.none(), st.binary(max_size=800)))
def test_png_headers_with_drawn_fields(width: int, height: int, bit_depth: int, colour_type: int, interlace: int,
                                       scanlines: bytes, compress: bool, palette: bytes | None) -> None:
    """Whatever IHDR declares, the answer is an image of exactly that size or a refusal; a size the limits
    forbid is never decoded."""
    idat = zlib.compress(scanlines) if compress else scanlines
    extra = png_chunk(b"PLTE", palette) if palette is not None else b""
    outcome = decode_or_refusal(png_file(width, height, bit_depth=bit_depth, colour_type=colour_type,
                                         interlace=interlace, idat=idat, extra_chunks=extra))
    if isinstance(outcome, DecodedImage):
        assert outcome.image.size == (width, height)
    if width * height > MAX_PIXELS:
        assert isinstance(outcome, (ImageTooLarge, InvalidImage))


# --- DICOM datasets with absurd pixel-module elements -------------------------------------------------------


def _us(values: list[int]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(values), st.integers(0, 65535)).map(lambda v: struct.pack("<H", v))


def _text(values: list[str]) -> st.SearchStrategy[bytes]:
    def encode(text: str) -> bytes:
        raw = text.encode("latin-1")
        return raw + b" " * (len(raw) % 2)
    return st.sampled_from(values).map(encode)


NUMBERS = ["0", "1", "-1", "-1e9", "1e308", "1e400", "-1e400", "nan", "NaN", "inf", "-inf", "abc", "", "1\\2",
           "0.0000001", "40\\-5", " 12 ", "1" * 16, "\x00"]
# (tag, VR, raw little-endian value bytes): written byte for byte, whatever pydicom would think of them.
ABSURD_ELEMENTS: dict[str, tuple[int, str, st.SearchStrategy[bytes]]] = {
    "SamplesPerPixel": (0x00280002, "US", _us([0, 1, 2, 3, 4, 9, 65535])),
    "PhotometricInterpretation": (0x00280004, "CS", _text(
        ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT",
         "HSV", "ARGB", "CMYK", "", "monochrome2", "X" * 16, "\x00\x00"])),
    "PlanarConfiguration": (0x00280006, "US", _us([0, 1, 2])),
    "NumberOfFrames": (0x00280008, "IS", _text(["0", "1", "2", "-1", "999999999", "2147483648", "abc", "1.5", "",
                                                 " 1", "1" * 12])),
    "Rows": (0x00280010, "US", _us([0, 1, 2, 4, 16, 65535])),
    "Columns": (0x00280011, "US", _us([0, 1, 2, 4, 16, 65535])),
    "BitsAllocated": (0x00280100, "US", _us([0, 1, 7, 8, 12, 16, 24, 32, 64, 65535])),
    "BitsStored": (0x00280101, "US", _us([0, 1, 7, 8, 12, 16, 17, 32, 64])),
    "HighBit": (0x00280102, "US", _us([0, 7, 11, 15, 31, 63, 65535])),
    "PixelRepresentation": (0x00280103, "US", _us([0, 1, 2, 65535])),
    "PixelPaddingValue": (0x00280120, "US", _us([0, 1, 255, 65535])),
    "WindowCenter": (0x00281050, "DS", _text(NUMBERS)),
    "WindowWidth": (0x00281051, "DS", _text(NUMBERS)),
    "RescaleIntercept": (0x00281052, "DS", _text(NUMBERS)),
    "RescaleSlope": (0x00281053, "DS", _text(NUMBERS)),
    "VOILUTFunction": (0x00281056, "CS", _text(["LINEAR", "LINEAR_EXACT", "SIGMOID", "BOGUS", ""])),
    "PresentationLUTShape": (0x20500020, "CS", _text(["IDENTITY", "INVERSE", "LIN OD", "BOGUS", ""])),
    "RedPaletteColorLookupTableDescriptor": (0x00281101, "US", st.sampled_from(
        [struct.pack("<3H", *d) for d in ([0, 0, 0], [256, 0, 8], [65535, 0, 64], [1, 65535, 16], [3, 0, 7])])),
}
REQUIRED_PIXEL_ELEMENTS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel",
                           "PhotometricInterpretation", "PixelRepresentation"]
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                     DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEG2000Lossless, JPEGLSLossless, RLELossless,
                     "1.2.3.4", "1.2.840.10008.1.2.4.999", "not.a.uid", "", "\x00"]


def _as_read(dataset: Dataset) -> Dataset:
    """`dataset` written and read back: every element raw with its VR resolved (the palette descriptors' "US or
    SS" by Pixel Representation), so elements it depends on can be deleted and the rest still written."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _set_raw(dataset: Dataset, tag: int, vr: str, value: bytes) -> None:
    dataset[tag] = RawDataElement(Tag(tag), vr, len(value), value, value_tell=0, is_implicit_VR=False,
                                  is_little_endian=True)


def dicom_file(dataset: Dataset, *, transfer_syntax: str, preamble: bool) -> bytes:
    """The dataset's body written as Explicit VR Little Endian, behind file meta naming `transfer_syntax`
    (which may say otherwise, or be no UID at all): exactly what a broken or lying sender produces."""
    body = io.BytesIO()
    dataset.preamble, dataset.file_meta = None, FileMetaDataset()
    pydicom.dcmwrite(body, dataset, implicit_vr=False, little_endian=True)
    if not preamble:
        return body.getvalue()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    _set_raw(meta, 0x00020010, "UI", transfer_syntax.encode("latin-1") + b"\x00" * (len(transfer_syntax) % 2))
    header = pydicom.filebase.DicomBytesIO()
    write_file_meta_info(header, meta, enforce_standard=False)   # lets an empty UID through
    return b"\x00" * 128 + b"DICM" + header.getvalue() + body.getvalue()


@st.composite
def absurd_dicoms(draw: st.DrawFn) -> bytes:
    photometric = draw(st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB", "PALETTE COLOR"]))
    bits = draw(st.sampled_from([8, 16]))
    palette = np.stack([np.arange(256) * 257] * 3, axis=-1) if photometric == "PALETTE COLOR" else None
    dataset = _as_read(make_dicom_dataset(rows=draw(st.sampled_from([1, 4, 16])),
                                          columns=draw(st.sampled_from([1, 4, 16])), photometric=photometric,
                                          bits_allocated=8 if palette is not None else bits, palette=palette))
    for keyword in draw(st.lists(st.sampled_from(sorted(ABSURD_ELEMENTS)), max_size=6, unique=True)):
        tag, vr, values = ABSURD_ELEMENTS[keyword]
        _set_raw(dataset, tag, vr, draw(values))
    for keyword in draw(st.lists(st.sampled_from(REQUIRED_PIXEL_ELEMENTS), max_size=2, unique=True)):
        del dataset[keyword]
    pixel_data = draw(st.sampled_from(["as is", "empty", "one byte", "short", "long", "odd", "random", "absent"]))
    stored = dataset.PixelData
    replaced = {"as is": stored, "empty": b"", "one byte": b"\x00", "short": stored[:-2], "long": stored * 3,
                "odd": stored + b"\x01", "absent": None,
                "random": draw(st.binary(max_size=1024)) if pixel_data == "random" else b""}[pixel_data]
    del dataset.PixelData
    if replaced is not None:
        _set_raw(dataset, 0x7FE00010, "OB" if bits == 8 else "OW", replaced + b"\x00" * (len(replaced) % 2))
    return dicom_file(dataset, transfer_syntax=draw(st.sampled_from(TRANSFER_SYNTAXES)),
                      preamble=draw(st.booleans()))


@settings(FUZZ, max_examples=150)
@given(data=absurd_dicoms())
def test_dicoms_with_absurd_pixel_module_elements(data: bytes) -> None:
    decode_or_refusal(data)


# --- targeted: decompression bombs and huge sizes -----------------------------------------------------------


def _deflated_zeros(total_bytes: int) -> bytes:
    compressor, chunk = zlib.compressobj(9), bytes(1 << 20)
    parts = [compressor.compress(chunk) for _ in range(total_bytes // len(chunk))]
    return b"".join(parts) + compressor.compress(bytes(total_bytes % len(chunk))) + compressor.flush()


def test_png_decompression_bomb_is_refused_before_decoding() -> None:
    """A valid 1-bit PNG of 20000 x 20000 = 400 M pixels (50 MB of scanlines) that deflates to ~50 KB."""
    side = 20000
    idat = _deflated_zeros(side * (1 + side // 8))     # per row: filter byte 0 + 2500 bytes of 1-bit pixels
    assert len(idat) < 100_000
    bomb = png_file(side, side, bit_depth=1, colour_type=0, idat=idat)
    assert isinstance(decode_or_refusal(bomb), ImageTooLarge)
    # with MEDZERO_MAX_IMAGE_PIXELS raised past Pillow's own bomb guard, that guard still refuses it as too large
    assert isinstance(decode_or_refusal(bomb, max_pixels=10**12), ImageTooLarge)


@pytest.mark.parametrize(("width", "height"), [(60000, 60000), (65535, 65535), (2**31 - 1, 2**31 - 1),
                                               (9000, 8000)])
def test_png_declaring_huge_dimensions_is_refused_as_too_large(width: int, height: int) -> None:
    tiny_idat = zlib.compress(b"\x00" * 64)
    outcome = decode_or_refusal(png_file(width, height, idat=tiny_idat))
    assert isinstance(outcome, ImageTooLarge), outcome


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 frame header is rewritten to declare `width` x `height`."""
    data = bytearray(jpeg_bytes(width=16, height=16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize(("width", "height", "refusal"), [
    (65500, 65500, ImageTooLarge), (65535, 2000, ImageTooLarge), (0, 16, InvalidImage), (16, 0, InvalidImage),
    (1, 30, ExtremeAspectRatio),
])
def test_jpeg_frame_header_sizes(width: int, height: int, refusal: type[MedzeroError]) -> None:
    outcome = decode_or_refusal(_jpeg_with_size(width, height))
    assert isinstance(outcome, refusal), outcome


def test_tiff_declaring_a_huge_size_is_refused_as_too_large() -> None:
    """A real 16 x 16 TIFF whose ImageWidth and ImageLength entries are rewritten to 60000."""
    data = bytearray(tiff_bytes(width=16, height=16, mode="L"))
    assert data[:2] == b"II"
    ifd = struct.unpack("<I", data[4:8])[0]
    rewritten = 0
    for index in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * index                # each IFD entry: tag, type, count, value (12 bytes)
        tag, field_type = struct.unpack("<HH", data[entry:entry + 4])
        if tag in (256, 257):                       # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            data[entry + 8:entry + 12] = struct.pack("<I", 60000) if field_type == 4 else struct.pack("<HH", 60000, 0)
            rewritten += 1
    assert rewritten == 2
    assert isinstance(decode_or_refusal(bytes(data)), ImageTooLarge)


# --- targeted: zero-sized images ------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(0, 0), (1, 0), (0, 1), (0, 60000)])
def test_png_with_a_zero_side_is_invalid(width: int, height: int) -> None:
    outcome = decode_or_refusal(png_file(width, height, idat=zlib.compress(b"\x00" * 16)))
    assert isinstance(outcome, InvalidImage), outcome


@pytest.mark.parametrize(("rows", "columns"), [(0, 0), (1, 0), (0, 1), (0, 65535)])
def test_dicom_with_a_zero_side_is_invalid(rows: int, columns: int) -> None:
    dataset = make_dicom_dataset(rows=4, columns=4)
    _set_raw(dataset, 0x00280010, "US", struct.pack("<H", rows))
    _set_raw(dataset, 0x00280011, "US", struct.pack("<H", columns))
    outcome = decode_or_refusal(dicom_file(dataset, transfer_syntax=ExplicitVRLittleEndian, preamble=True))
    assert isinstance(outcome, InvalidImage), outcome


def test_one_pixel_images_decode() -> None:
    for data in (png_bytes(width=1, height=1), jpeg_bytes(width=1, height=1), tiff_bytes(width=1, height=1),
                 make_dicom_bytes(rows=1, columns=1)):
        decoded = decode_or_refusal(data)
        assert isinstance(decoded, DecodedImage) and decoded.image.size == (1, 1)


# --- targeted: absurd DICOM tags, one at a time -------------------------------------------------------------


def _dicom_with(elements: dict[int, tuple[str, bytes]], *, delete: tuple[str, ...] = (),
                transfer_syntax: str = ExplicitVRLittleEndian, **options: object) -> bytes:
    dataset = _as_read(make_dicom_dataset(rows=8, columns=8, **options))
    for keyword in delete:
        del dataset[keyword]
    for tag, (vr, value) in elements.items():
        _set_raw(dataset, tag, vr, value)
    return dicom_file(dataset, transfer_syntax=transfer_syntax, preamble=True)


def _us_value(value: int) -> bytes:
    return struct.pack("<H", value)


def _ds_value(text: str) -> bytes:
    return text.encode() + b" " * (len(text) % 2)


@pytest.mark.parametrize(("elements", "refusal"), [
    ({0x00280010: ("US", _us_value(65535)), 0x00280011: ("US", _us_value(65535))}, ImageTooLarge),
    ({0x00280010: ("US", _us_value(65535)), 0x00280011: ("US", _us_value(8))}, ExtremeAspectRatio),
    ({0x00280008: ("IS", _ds_value("999999999"))}, UnsupportedDicom),
    ({0x00280008: ("IS", _ds_value("2147483648"))}, UnsupportedDicom),
    ({0x00280008: ("IS", _ds_value("abc"))}, UnsupportedDicom),
    ({0x00280002: ("US", _us_value(9))}, (UnsupportedDicom, InvalidImage)),
    ({0x00280100: ("US", _us_value(0))}, (UnsupportedDicom, InvalidImage)),
    ({0x00280100: ("US", _us_value(7))}, (UnsupportedDicom, InvalidImage)),
    ({0x00280100: ("US", _us_value(64))}, (UnsupportedDicom, InvalidImage)),
    ({0x00280004: ("CS", b"HSV ")}, UnsupportedDicom),
    ({0x00280004: ("CS", b"NOT_A_TERM")}, UnsupportedDicom),
], ids=["65535x65535", "65535x8", "frames-huge", "frames-over-int32", "frames-not-a-number", "samples-9",
        "bits-allocated-0", "bits-allocated-7", "bits-allocated-64", "photometric-HSV", "photometric-unknown"])
def test_dicom_absurd_tags_are_refused(elements: dict[int, tuple[str, bytes]],
                                       refusal: type[MedzeroError] | tuple[type[MedzeroError], ...]) -> None:
    outcome = decode_or_refusal(_dicom_with(elements))
    assert isinstance(outcome, refusal), outcome


def test_dicom_huge_size_without_pixel_data_is_refused() -> None:
    outcome = decode_or_refusal(_dicom_with({0x00280010: ("US", _us_value(65535)),
                                             0x00280011: ("US", _us_value(65535))}, with_pixel_data=False))
    assert isinstance(outcome, UnsupportedDicom), outcome


@pytest.mark.parametrize("pixel_data", [b"", b"\x00\x00", bytes(62), bytes(66), bytes(64 * 1000)],
                         ids=["empty", "two-bytes", "short", "long", "far-too-long"])
def test_dicom_pixel_data_length_mismatch(pixel_data: bytes) -> None:
    """8 x 8 x 8-bit frames need 64 bytes. pydicom tolerates extra trailing bytes; too few are corrupt data."""
    outcome = decode_or_refusal(_dicom_with({0x7FE00010: ("OB", pixel_data)}))
    if len(pixel_data) < 64:
        assert isinstance(outcome, InvalidImage), outcome
    else:
        assert isinstance(outcome, DecodedImage), outcome


@pytest.mark.parametrize("window", [("40", "-5"), ("40", "0"), ("nan", "nan"), ("1e400", "1e400"), ("abc", "x"),
                                    ("40", "-inf")])
def test_dicom_invalid_window_falls_back_to_the_data(window: tuple[str, str]) -> None:
    """A window the standard forbids (width < 1) or that is no number is ignored, as a viewer would: the frame
    renders from its own range, so the left-to-right ramp survives."""
    center, width = window
    data = _dicom_with({0x00281050: ("DS", _ds_value(center)), 0x00281051: ("DS", _ds_value(width))},
                       bits_allocated=16, bits_stored=12)
    decoded = decode_or_refusal(data)
    assert isinstance(decoded, DecodedImage), decoded
    row = np.asarray(decoded.image)[0, :, 0].astype(int)
    assert row[0] < row[-1], f"ramp lost with window {window}: {row}"


@pytest.mark.parametrize("slope", ["nan", "inf", "-inf", "1e308"])
def test_dicom_non_finite_rescale_is_refused(slope: str) -> None:
    """A slope that makes the modality values NaN or infinite (1e308 x 4095 overflows) leaves nothing to window:
    refused, where it used to render a black frame for the model to classify."""
    outcome = decode_or_refusal(_dicom_with({0x00281053: ("DS", _ds_value(slope)),
                                             0x00281052: ("DS", _ds_value("0"))}, bits_allocated=16, bits_stored=12))
    assert isinstance(outcome, UnsupportedDicom), outcome


def test_dicom_zero_rescale_slope_renders_a_constant_frame() -> None:
    decoded = decode_or_refusal(_dicom_with({0x00281053: ("DS", _ds_value("0")),
                                             0x00281052: ("DS", _ds_value("7"))}, bits_allocated=16))
    assert isinstance(decoded, DecodedImage), decoded
    assert np.ptp(np.asarray(decoded.image)) == 0


def test_dicom_truncated_at_every_byte_of_its_header() -> None:
    """Each cut inside the preamble, the file meta (whose group length then promises more than is there) and the
    first elements of the dataset."""
    data = SEEDS["dicom-mono8"]
    for cut in range(min(len(data), 700)):
        decode_or_refusal(data[:cut])


def _deflated_dicom(body: bytes | None = None) -> bytes:
    """A Deflated Explicit VR Little Endian file written by pydicom, or its file meta in front of `body`."""
    dataset = make_dicom_dataset(rows=16, columns=24)
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    if body is None:
        return buffer.getvalue()
    header = pydicom.filebase.DicomBytesIO()
    write_file_meta_info(header, dataset.file_meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + header.getvalue() + body


def test_deflated_dicom_decodes_like_the_uncompressed_one() -> None:
    deflated, plain = decode_or_refusal(_deflated_dicom()), decode_or_refusal(SEEDS["dicom-mono8"])
    assert isinstance(deflated, DecodedImage) and isinstance(plain, DecodedImage)
    assert np.array_equal(np.asarray(deflated.image), np.asarray(plain.image))


@pytest.mark.parametrize("body", ["not deflated", "truncated", "empty"])
def test_deflated_dicom_that_does_not_inflate_is_invalid(body: str) -> None:
    """Used to escape as zlib.error (a 500): pydicom inflates with zlib and lets its error through."""
    whole = _deflated_dicom()
    meta_end = len(_deflated_dicom(b""))
    bodies = {"not deflated": SEEDS["dicom-mono8"][meta_end:] or b"\x08\x00\x05\x00CS\x00\x00",
              "truncated": whole[meta_end:meta_end + (len(whole) - meta_end) // 2], "empty": b"\x00"}
    outcome = decode_or_refusal(_deflated_dicom(bodies[body]))
    assert isinstance(outcome, InvalidImage), outcome


def test_deflated_dicom_bomb_is_refused_before_inflating_it_all() -> None:
    """pydicom inflates a deflated dataset whole before reading an element: 50 MB of upload could be 50 GB.
    Here 64 MB of zeros (64 KB deflated) against a 4096-pixel limit: refused once past the bound."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    body = b"".join(compressor.compress(chunk) for _ in range(64)) + compressor.flush()
    assert len(body) < 100_000
    outcome = decode_or_refusal(_deflated_dicom(body), max_pixels=64 * 64)
    assert isinstance(outcome, ImageTooLarge), outcome


@pytest.mark.parametrize("transfer_syntax", [JPEGBaseline8Bit, JPEG2000Lossless, RLELossless, "1.2.3.4", "not.a.uid",
                                             ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_dicom_with_a_wrong_transfer_syntax(transfer_syntax: str) -> None:
    """Native pixel data behind file meta claiming a compressed, unknown or differently encoded syntax."""
    outcome = decode_or_refusal(_dicom_with({}, transfer_syntax=transfer_syntax))
    if transfer_syntax in (JPEGBaseline8Bit, JPEG2000Lossless, RLELossless, "1.2.3.4", "not.a.uid"):
        assert isinstance(outcome, (InvalidImage, UnsupportedDicom)), outcome


# --- targeted: image modes ----------------------------------------------------------------------------------


def test_sixteen_bit_png_keeps_its_range() -> None:
    """I;16 ramps from 1000 to 3000: stretched to 0..255, not truncated to its low byte."""
    decoded = decode_or_refusal(png_bytes(width=64, height=8, mode="I;16"))
    assert isinstance(decoded, DecodedImage)
    row = np.asarray(decoded.image)[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and bool(np.all(np.diff(row) >= 0))


@pytest.mark.parametrize(("mode", "image_format"), [
    ("P", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("1", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"), ("L", "JPEG"),
    ("CMYK", "TIFF"), ("I", "TIFF"), ("F", "TIFF"), ("LA", "TIFF"), ("I;16", "TIFF"), ("YCbCr", "TIFF"),
])
def test_every_pillow_mode_becomes_rgb(mode: str, image_format: str) -> None:
    source = Image.fromarray(np.tile(np.linspace(0, 255, 32).astype(np.uint8), (8, 1))).convert(mode)
    buffer = io.BytesIO()
    source.save(buffer, image_format)
    decoded = decode_or_refusal(buffer.getvalue())
    assert isinstance(decoded, DecodedImage), decoded
    assert decoded.image.size == (32, 8)


@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
def test_float_tiff_with_non_finite_pixels(special: float) -> None:
    """A 32-bit float TIFF holding NaN or infinities: the finite pixels keep their ramp, the rest no NaN cast."""
    values = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32), (8, 1))
    values[:, 16] = special
    buffer = io.BytesIO()
    Image.fromarray(values, mode="F").save(buffer, "TIFF")
    decoded = decode_or_refusal(buffer.getvalue())
    assert isinstance(decoded, DecodedImage), decoded
    row = np.asarray(decoded.image)[0, :, 0].astype(int)
    assert row[0] < row[15] < row[31], f"finite ramp lost next to {special}: {row}"


# --- app.imaging.files: hostile names on disk ---------------------------------------------------------------

NAME_PARTS = st.text(alphabet=st.sampled_from(list("aZ0._- é€") + ["\u202e", "\u200d", "\u0301"]), min_size=1,
                     max_size=8)
SUFFIXES = st.sampled_from(sorted(IMAGE_SUFFIXES) + [".PNG", ".Dcm", ".JPEG", ".txt", ".png.txt", ".gif", "", ".",
                                                     ".tiff~", ".dcm.bak"])


@settings(FUZZ, max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(names=st.lists(st.tuples(st.lists(NAME_PARTS, max_size=2), NAME_PARTS, SUFFIXES), max_size=12))
def test_image_files_are_exactly_the_files_with_image_suffixes(tmp_path_factory: pytest.TempPathFactory,
                                                                names: list[tuple[list[str], str, str]]) -> None:
    root = tmp_path_factory.mktemp("images")
    created: set[Path] = set()
    for folders, stem, suffix in names:
        folder = root.joinpath(*[f"d{part}" for part in folders])   # "d" prefix: never "." or ".."
        name = f"{stem}{suffix}"
        path = folder / name
        if name in (".", "..") or path.exists() or any(parent.is_file() for parent in path.parents):
            continue   # "." is the folder itself; a name taken, or a file where a folder would be
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        created.add(path)
    found = image_files(root)
    assert found == sorted(found)
    assert set(found) == {p for p in created if p.suffix.lower() in IMAGE_SUFFIXES}


def test_image_files_skips_folders_named_like_images_and_broken_links(tmp_path: Path) -> None:
    (tmp_path / "series.dcm").mkdir()                       # a folder with an image suffix
    (tmp_path / "series.dcm" / "one.dcm").write_bytes(b"x")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)   # must not recurse forever
    (tmp_path / "linked.jpg").symlink_to(tmp_path / "series.dcm" / "one.dcm")
    found = image_files(tmp_path)
    assert found == [tmp_path / "linked.jpg", tmp_path / "series.dcm" / "one.dcm"]


def test_image_files_on_names_that_are_not_utf8(tmp_path: Path) -> None:
    raw_name = os.fsencode(tmp_path) + b"/scan-\xff\xfe.DCM"
    with open(raw_name, "wb") as handle:
        handle.write(b"x")
    found = image_files(tmp_path)
    assert [os.fsencode(p) for p in found] == [raw_name]
