"""Labelled images for evaluation and calibration: an ImageFolder tree (one sub-folder per class) or a CSV manifest
(`path,label`, paths relative to the manifest), mapped onto a label set's class names.

Every problem with the data is one InvalidInput naming it (a missing folder, an empty class folder, a folder or
label that is not a class and has no --map entry), so the CLI prints one line, not a traceback.
"""
import csv
import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.errors import InvalidInput
from app.imaging.files import IMAGE_SUFFIXES, image_files


@dataclass(frozen=True)
class LabelledImages:
    source: Path                   # the folder or manifest they were read from
    paths: list[Path]
    labels: list[str]              # the label set's class name of each image (after --map)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels).items()))


def parse_mapping(items: Iterable[str]) -> dict[str, str]:
    """["folder=class", "a=b,c=d"] -> {"folder": "class", "a": "b", "c": "d"}."""
    mapping: dict[str, str] = {}
    for item in items:
        for pair in filter(None, (p.strip() for p in item.split(","))):
            name, sep, target = pair.partition("=")
            if not sep or not name.strip() or not target.strip():
                raise InvalidInput(f"--map takes folder=class pairs; got {pair!r}")
            mapping[name.strip()] = target.strip()
    return mapping


def load_labelled(source: Path, class_names: Sequence[str], mapping: dict[str, str] | None = None) -> LabelledImages:
    """The images under `source` (a folder of class folders, or a .csv manifest) with their class names."""
    mapping = mapping or {}
    if source.is_file() and source.suffix.lower() == ".csv":
        raw = _read_manifest(source)
    elif source.is_dir():
        raw = _read_image_folder(source)
    elif source.exists():
        raise InvalidInput(f"{source} is neither a folder of class folders nor a .csv manifest")
    else:
        raise InvalidInput(f"no such folder or manifest: {source}")
    unknown_targets = sorted(set(mapping.values()) - set(class_names))
    if unknown_targets:
        raise InvalidInput(f"--map names {', '.join(unknown_targets)}, not classes of the label set "
                           f"({', '.join(class_names)})")
    labels = [mapping.get(label, label) for _, label in raw]
    unmapped = sorted({label for (_, label), mapped in zip(raw, labels) if mapped not in class_names})
    if unmapped:
        raise InvalidInput(f"{', '.join(unmapped)} in {source} {'is' if len(unmapped) == 1 else 'are'} not a class "
                           f"of the label set ({', '.join(class_names)}); map with --map {unmapped[0]}=CLASS")
    return LabelledImages(source, [path for path, _ in raw], labels)


def _read_image_folder(folder: Path) -> list[tuple[Path, str]]:
    class_folders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_folders:
        raise InvalidInput(f"{folder} has no class folders (expected {folder}/<class>/<image>)")
    found: list[tuple[Path, str]] = []
    for class_folder in class_folders:
        images = image_files(class_folder)
        if not images:
            raise InvalidInput(f"class folder {class_folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        found += [(path, class_folder.name) for path in images]
    return found


def _read_manifest(manifest: Path) -> list[tuple[Path, str]]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise InvalidInput(f"{manifest} needs a header with path and label columns; got {reader.fieldnames}")
        rows = [(manifest.parent / row["path"], row["label"].strip()) for row in reader]
    if not rows:
        raise InvalidInput(f"{manifest} lists no images")
    missing = [str(path) for path, _ in rows if not path.is_file()]
    if missing:
        raise InvalidInput(f"{len(missing)} files in {manifest} do not exist, e.g. {missing[0]}")
    return rows


def dataset_hash(images: LabelledImages) -> str:
    """sha256 over every image's bytes and label, in order: two runs on the same data share it."""
    digest = hashlib.sha256()
    for path, label in zip(images.paths, images.labels):
        digest.update(label.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return f"sha256:{digest.hexdigest()}"


def relative_name(images: LabelledImages, path: Path) -> str:
    root = images.source if images.source.is_dir() else images.source.parent
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
