"""Labelled images from an ImageFolder tree or a CSV manifest, mapped onto a label set's classes."""
from pathlib import Path

import pytest

from app.errors import InvalidInput
from app.evaluation.dataset import dataset_hash, load_labelled, parse_mapping, relative_name
from tests.factories import labelled_folder, shared_data_dir

CLASSES = ("normal", "pneumonia")


def test_image_folder_with_a_mapped_folder(tmp_path: Path) -> None:
    root = labelled_folder(tmp_path, {"NORMAL": 2, "pneumonia": 3})
    images = load_labelled(root, CLASSES, {"NORMAL": "normal"})
    assert images.counts() == {"normal": 2, "pneumonia": 3}
    assert relative_name(images, images.paths[0]) == "NORMAL/NORMAL_000.png"


def test_csv_manifest_paths_are_relative_to_it(tmp_path: Path) -> None:
    labelled_folder(tmp_path / "imgs", {"a": 2})
    (tmp_path / "list.csv").write_text("path,label,source_id\n"
                                       "imgs/a/a_000.png,normal,x\nimgs/a/a_001.png,pneumonia,y\n")
    images = load_labelled(tmp_path / "list.csv", CLASSES)
    assert images.labels == ["normal", "pneumonia"] and images.paths[0] == tmp_path / "imgs/a/a_000.png"


@pytest.mark.parametrize("manifest, message", [
    ("file,label\nx.png,normal\n", "path and label columns"),
    ("path,label\n", "lists no images"),
    ("path,label\nmissing.png,normal\n", "do not exist"),
    ("path,label\nimgs/a/a_000.png,effusion\n", "effusion"),
])
def test_manifest_problems_are_named(tmp_path: Path, manifest: str, message: str) -> None:
    labelled_folder(tmp_path / "imgs", {"a": 1})
    (tmp_path / "list.csv").write_text(manifest)
    with pytest.raises(InvalidInput, match=message):
        load_labelled(tmp_path / "list.csv", CLASSES)


def test_mapping_parsing_and_mapping_onto_a_non_class(tmp_path: Path) -> None:
    assert parse_mapping(["NORMAL=normal,PNEUMONIA=pneumonia", "x = y"]) == {
        "NORMAL": "normal", "PNEUMONIA": "pneumonia", "x": "y"}
    with pytest.raises(InvalidInput, match="folder=class"):
        parse_mapping(["NORMAL"])
    root = labelled_folder(tmp_path, {"NORMAL": 1, "pneumonia": 1})
    with pytest.raises(InvalidInput, match="not classes of the label set"):
        load_labelled(root, CLASSES, {"NORMAL": "healthy"})
    with pytest.raises(InvalidInput, match="no class folders"):
        load_labelled(tmp_path / "NORMAL", CLASSES)


def test_dataset_hash_follows_content_and_labels(tmp_path: Path) -> None:
    root = labelled_folder(tmp_path, {"normal": 2, "pneumonia": 2})
    first = dataset_hash(load_labelled(root, CLASSES))
    assert dataset_hash(load_labelled(root, CLASSES)) == first
    (root / "normal" / "normal_000.png").write_bytes((root / "pneumonia" / "pneumonia_000.png").read_bytes())
    assert dataset_hash(load_labelled(root, CLASSES)) != first


def test_the_shared_datasets_load_as_they_are() -> None:
    shared = shared_data_dir()
    if shared is None:
        pytest.skip("no ../shared/data on this machine")
    images = load_labelled(shared / "datasets" / "covid_cxr", ("covid19", "other_pneumonia", "no_finding"))
    assert images.counts() == {"covid19": 25, "no_finding": 8, "other_pneumonia": 17}
    via_manifest = load_labelled(shared / "datasets" / "covid_cxr" / "manifest.csv",
                                 ("covid19", "other_pneumonia", "no_finding"))
    assert sorted(via_manifest.paths) == sorted(images.paths)
