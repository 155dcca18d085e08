"""Which files on disk are images medzero reads: by suffix, recursively, in a stable order."""
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"}


def image_files(folder: Path) -> list[Path]:
    """The images under `folder` (recursively, by suffix), in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
