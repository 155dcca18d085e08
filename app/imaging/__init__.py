"""Image bytes in, 8-bit RGB images out: see decode.py."""

from app.imaging.decode import ACCEPTED_FORMATS, DecodedImage, decode_image, detect_format, dicom_to_image

__all__ = ["ACCEPTED_FORMATS", "DecodedImage", "decode_image", "detect_format", "dicom_to_image"]
