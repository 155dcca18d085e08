"""Image bytes in, 8-bit RGB images out: see decode.py."""

from app.imaging.decode import (
    ACCEPTED_FORMATS,
    DecodedImage,
    decode_image,
    detect_format,
    dicom_to_image,
    read_dicom,
    read_part10,
)

__all__ = ["ACCEPTED_FORMATS", "DecodedImage", "decode_image", "detect_format", "dicom_to_image", "read_dicom", "read_part10"]
