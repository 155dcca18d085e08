"""Routing rules: first match wins on Modality, BodyPartExamined, SOP Class UID and a SeriesDescription regex;
unmatched instances are skipped with a reason that holds no free text; bad rule files are one clear error."""
from pathlib import Path

import pytest
from pydicom.uid import DigitalXRayImageStorageForPresentation, SecondaryCaptureImageStorage, UltrasoundImageStorage

from app.dicom.routing import Route, Skip, load_routes
from app.errors import InvalidInput
from tests.factories import make_dicom_dataset

RULES = f"""
rules:
  - name: breast-us
    modality: [US]
    series_description: "(?i)breast"
    label_set: breast-ultrasound
  - name: chest
    modality: [CR, DX]
    body_part: [chest]
    sop_class_uid: ["{DigitalXRayImageStorageForPresentation}"]
    label_set: chest-xray-pneumonia
    method: kpl
  - name: any-dx
    modality: [DX]
    label_set: chest-xray-findings
"""


def dataset(**tags):
    ds = make_dicom_dataset(modality=tags.pop("Modality", "DX"))
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture
def table(tmp_path: Path):
    (tmp_path / "routes.yaml").write_text(RULES)
    return load_routes(tmp_path / "routes.yaml")


def test_first_matching_rule_wins(table) -> None:
    chest = dataset(BodyPartExamined="CHEST", SOPClassUID=DigitalXRayImageStorageForPresentation)
    assert table.route(chest) == Route("chest", "chest-xray-pneumonia", "kpl")
    knee = dataset(BodyPartExamined="KNEE", SOPClassUID=DigitalXRayImageStorageForPresentation)
    assert table.route(knee) == Route("any-dx", "chest-xray-findings", "zeroshot")
    breast = dataset(Modality="US", SeriesDescription="Left BREAST lesion", SOPClassUID=UltrasoundImageStorage)
    assert table.route(breast).rule == "breast-us"


def test_unmatched_instances_are_skipped_with_coded_facts_only(table) -> None:
    liver = dataset(Modality="US", SeriesDescription="Liver, patient Jane Doe", BodyPartExamined="ABDOMEN",
                    SOPClassUID=SecondaryCaptureImageStorage)
    skipped = table.route(liver)
    assert isinstance(skipped, Skip)
    assert "Modality=US" in skipped.reason and "BodyPartExamined=ABDOMEN" in skipped.reason
    assert "Secondary Capture Image Storage" in skipped.reason
    assert "Jane" not in skipped.reason and "Liver" not in skipped.reason


def test_no_rules_says_where_they_come_from(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    assert "MEDZERO_DICOM_ROUTES_FILE" in load_routes(tmp_path / "empty.yaml").route(dataset()).reason


@pytest.mark.parametrize("text, message", [
    ("rules: [{name: a, label_set: x, series_description: '('}]", "not a regex"),
    ("rules: [{name: a, label_set: x, colour: red}]", "colour"),
    ("rules: [{name: a, label_set: x}, {name: a, label_set: y}]", "repeated: a"),
    ("rules: [{label_set: x}]", "rules.0.name"),
    ("rules: [unclosed", "not YAML"),
])
def test_bad_rule_files_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "routes.yaml").write_text(text)
    with pytest.raises(InvalidInput, match=message) as raised:
        load_routes(tmp_path / "routes.yaml")
    assert str(tmp_path / "routes.yaml") in str(raised.value)


def test_a_missing_rule_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read routing rules"):
        load_routes(tmp_path / "nowhere.yaml")
