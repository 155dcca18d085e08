"""The AI Results SR, written with dcmwrite and read back: in the source's study, one coded TID 1501 group per class
with its probability (unit "1"), the algorithm, the source reference and AIR's Processing Algorithm equipment; the
decision, an abstention and the prediction set as the module documents; highdicom parses it; dciodvfy finds no
errors; the UIDs are the same for the same result. Sources: real instances from the shared data folder, and
hand-built sparse and dirty ones (so the tests also run without that folder)."""
import logging
import shutil
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, Comprehensive3DSRStorage, ComputedRadiographyImageStorage, generate_uid

from app.dicom.sr import AIResult, ReportedClass, build_result_sr, finding_code, result_sr_uids
from app.errors import InvalidInput, UnsupportedDicom

SHARED_DICOM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"
LONG_UNKNOWN = "weird_class_name_longer_than_sixteen"
MODEL_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
YES, NO = ("373066001", "SCT"), ("373067005", "SCT")
SOURCES = ["sparse CR", "dirty CR", "nih_cxr14_dx_no_finding.dcm", "US1_J2KR.dcm"]


def hand_built_source(*, modality: str = "CR", body_part: str = "CHEST") -> Dataset:
    """A CR instance with only its UIDs, patient id / name, modality and body part: no birth date, accession
    number, referring physician, study id / date / time or manufacturer, as a sparse PACS may send."""
    source = Dataset()
    source.PatientID = "SR-TEST-1"
    source.PatientName = "Test^Patient"
    source.StudyInstanceUID = generate_uid()
    source.SeriesInstanceUID = generate_uid()
    source.SOPInstanceUID = generate_uid()
    source.SOPClassUID = ComputedRadiographyImageStorage
    source.Modality = modality
    if body_part:
        source.BodyPartExamined = body_part
    return source


def dirty_source() -> Dataset:
    """Values a real PACS sends that are invalid for their VR or for highdicom."""
    source = hand_built_source()
    with warnings.catch_warnings():        # pydicom warns of the invalid values, which are the point here
        warnings.simplefilter("ignore")
        source.PatientAge = "81"           # AS needs "081Y"
        source.PatientSex = "MALE"         # highdicom takes M, F, O or empty
        source.StudyDate = "2004"          # not a DA
    source.Manufacturer = "Acme"           # highdicom adds its acquisition equipment item
    return source


def shared_source(name: str) -> Dataset:
    path = SHARED_DICOM / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (no shared data folder here)")
    return pydicom.dcmread(path, stop_before_pixels=True)


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest) -> Dataset:
    if request.param == "sparse CR":
        return hand_built_source()
    if request.param == "dirty CR":
        return dirty_source()
    return shared_source(request.param)


def chest_result(**changes: object) -> AIResult:
    fields: dict = {"classes": [ReportedClass("pneumonia", 0.8125, True), ReportedClass("normal", 0.15, True),
                                ReportedClass(LONG_UNKNOWN, 0.0375, False)],
                    "decision": "pneumonia", "label_set": "chest-xray-pneumonia", "label_set_version": 3,
                    "method": "kpl", "model_id": MODEL_ID, "calibrated": True}
    return AIResult(**{**fields, **changes})


def write_sr(tmp_path: Path, source: Dataset, result: AIResult, name: str = "sr.dcm") -> Path:
    series_uid, sop_uid = result_sr_uids(source.SOPInstanceUID, source.StudyInstanceUID, result.label_set,
                                         result.label_set_version, result.method)
    report = build_result_sr(source, result, series_instance_uid=series_uid, sop_instance_uid=sop_uid,
                             institution_name="Test Hospital")
    path = tmp_path / name
    pydicom.dcmwrite(path, report, enforce_file_format=True)
    return path


def code(coded: Dataset) -> tuple[str, str]:
    """(code value, scheme) of a code sequence item, whichever value attribute holds it."""
    value = coded.get("CodeValue") or coded.get("LongCodeValue") or coded.get("URNCodeValue")
    return str(value), str(coded.CodingSchemeDesignator)


def children(item: Dataset, concept: tuple[str, str]) -> list[Dataset]:
    return [child for child in item.get("ContentSequence", [])
            if code(child.ConceptNameCodeSequence[0]) == concept]


def child(item: Dataset, concept: tuple[str, str]) -> Dataset:
    found = children(item, concept)
    assert len(found) == 1, f"{concept}: {len(found)} items"
    return found[0]


def class_groups(report: Dataset) -> list[Dataset]:
    return children(child(report, ("126010", "DCM")), ("125007", "DCM"))


def decision_of(report: Dataset) -> tuple[str, str]:
    evaluations = child(report, ("C0034375", "UMLS"))
    return code(child(evaluations, ("decision", "99MEDZERO")).ConceptCodeSequence[0])


def test_sr_reads_back_into_the_source_study_with_one_group_per_class(tmp_path: Path, source: Dataset) -> None:
    result = chest_result()
    report = pydicom.dcmread(write_sr(tmp_path, source, result))

    assert report.SOPClassUID == Comprehensive3DSRStorage
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert report.PatientID == source.get("PatientID", "")
    assert (report.SeriesInstanceUID, report.SOPInstanceUID) == result_sr_uids(
        source.SOPInstanceUID, source.StudyInstanceUID, "chest-xray-pneumonia", 3, "kpl")
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert code(report.ConceptNameCodeSequence[0]) == ("126000", "DCM")
    assert (report.CompletionFlag, report.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert (report.Manufacturer, report.SeriesDescription, report.InstitutionName) == (
        "medzero", "medzero AI results", "Test Hospital")
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    groups = class_groups(report)
    assert len(groups) == len(result.classes)
    for group, reported in zip(groups, result.classes, strict=True):
        assert child(group, ("112039", "DCM")).TextValue == reported.label
        assert code(child(group, ("121071", "DCM")).ConceptCodeSequence[0]) == code(finding_code(reported.label))
        probability = child(group, ("122157", "DCM"))
        measured = probability.MeasuredValueSequence[0]
        assert float(measured.NumericValue) == pytest.approx(reported.probability)
        assert code(measured.MeasurementUnitsCodeSequence[0]) == ("1", "UCUM")
        for holder in (group, probability):        # TID 4019 on the group and on the probability
            assert child(holder, ("111001", "DCM")).TextValue == "medzero"
            assert child(holder, ("111003", "DCM")).TextValue == f"{MODEL_ID} | kpl | v3"
        image = child(group, ("121112", "DCM")).ReferencedSOPSequence[0]
        assert (image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID) == (
            source.SOPClassUID, source.SOPInstanceUID)
    assert code(child(groups[0], ("121071", "DCM")).ConceptCodeSequence[0]) == ("233604007", "SCT")
    unknown = child(groups[2], ("121071", "DCM")).ConceptCodeSequence[0]
    assert (unknown.LongCodeValue, unknown.CodingSchemeDesignator) == (LONG_UNKNOWN, "99MEDZERO")
    assert "CodeValue" not in unknown

    observer_uid = child(report, ("121012", "DCM")).UID
    assert code(child(report, ("121005", "DCM")).ConceptCodeSequence[0]) == ("121007", "DCM")
    algorithm = [item for item in report.ContributingEquipmentSequence
                 if code(item.PurposeOfReferenceCodeSequence[0]) == ("Newcode1", "99IHE")]
    assert len(algorithm) == 1
    assert algorithm[0].PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    assert (algorithm[0].Manufacturer, algorithm[0].ManufacturerModelName) == ("medzero", MODEL_ID)
    assert algorithm[0].DeviceUID == observer_uid
    assert algorithm[0].ContributionDateTime and "chest-xray-pneumonia" in algorithm[0].ContributionDescription
    schemes = {item.CodingSchemeDesignator for item in report.CodingSchemeIdentificationSequence}
    assert {"99MEDZERO", "99IHE"} <= schemes


def test_highdicom_parses_the_sr_back(tmp_path: Path, source: Dataset) -> None:
    result = chest_result()
    document = hd.sr.srread(write_sr(tmp_path, source, result))

    assert isinstance(document, hd.sr.Comprehensive3DSR)
    content = document.content
    assert isinstance(content, hd.sr.MeasurementReport)
    groups = content.get_image_measurement_groups(referenced_sop_instance_uid=source.SOPInstanceUID)
    assert [group.tracking_identifier for group in groups] == [reported.label for reported in result.classes]
    assert [group.finding_type for group in groups] == [finding_code(r.label) for r in result.classes]
    probabilities = [group.get_measurements(name=codes.DCM.Probability)[0].value for group in groups]
    assert probabilities == pytest.approx([reported.probability for reported in result.classes])
    assert groups[0].source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
    (observer,) = content.get_observer_contexts(observer_type=codes.DCM.Device)
    assert observer.observer_identifying_attributes.model_name == MODEL_ID


def test_dciodvfy_reports_no_errors(tmp_path: Path, source: Dataset) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    path = write_sr(tmp_path, source, chest_result(decision=None, pretrained_weights=False))
    checked = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True,
                             timeout=60)
    lines = (checked.stdout + checked.stderr).splitlines()
    assert [line for line in lines if line.startswith("Error")] == []


@pytest.mark.parametrize(("modality", "body_part", "procedure"), [
    ("CR", "CHEST", ("399208008", "SCT")),      # Plain chest X-ray
    ("DX", "KNEE", ("168537006", "SCT")),       # Plain radiography
    ("US", "BREAST", ("47079000", "SCT")),      # Ultrasonography of breast
    ("US", "", ("16310003", "SCT")),            # Diagnostic ultrasonography
    ("OP", "", ("363679005", "SCT")),           # Imaging procedure
])
def test_procedure_reported_follows_modality_and_body_part(tmp_path: Path, modality: str, body_part: str,
                                                           procedure: tuple[str, str]) -> None:
    source = hand_built_source(modality=modality, body_part=body_part)
    if modality not in ("CR", "DX"):
        source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"      # Secondary Capture: only Modality decides
    report = pydicom.dcmread(write_sr(tmp_path, source, chest_result()))
    assert code(child(report, ("121058", "DCM")).ConceptCodeSequence[0]) == procedure


def test_decision_abstention_and_prediction_set_are_reported(tmp_path: Path) -> None:
    source = hand_built_source()
    decided = pydicom.dcmread(write_sr(tmp_path, source, chest_result()))
    assert decision_of(decided) == ("233604007", "SCT")
    in_set = [code(child(group, ("in_pred_set", "99MEDZERO")).ConceptCodeSequence[0])
              for group in class_groups(decided)]
    assert in_set == [YES, YES, NO]

    abstained = pydicom.dcmread(write_sr(tmp_path, source, chest_result(decision=None)))
    assert decision_of(abstained) == ("uncertain", "99MEDZERO")

    no_set = chest_result(classes=[ReportedClass("pneumonia", 0.6), ReportedClass("normal", 0.4)],
                          method="zeroshot", calibrated=False)
    uncalibrated = pydicom.dcmread(write_sr(tmp_path, source, no_set))
    assert all(children(group, ("in_pred_set", "99MEDZERO")) == [] for group in class_groups(uncalibrated))


def test_random_weights_are_said_in_the_sr(tmp_path: Path) -> None:
    demo = pydicom.dcmread(write_sr(tmp_path, hand_built_source(), chest_result(pretrained_weights=False)))
    note = child(child(demo, ("C0034375", "UMLS")), ("model_weights", "99MEDZERO")).TextValue
    algorithm = [item for item in demo.ContributingEquipmentSequence if item.Manufacturer == "medzero"]
    assert "random weights" in note and "random weights" in algorithm[0].ContributionDescription
    parameters = [item.TextValue for item in children(class_groups(demo)[0], ("111002", "DCM"))]
    assert "pretrained_weights=false" in parameters

    real = pydicom.dcmread(write_sr(tmp_path, hand_built_source(), chest_result()))
    assert children(child(real, ("C0034375", "UMLS")), ("model_weights", "99MEDZERO")) == []


def test_a_sparse_or_dirty_source_gives_empty_type2_attributes(tmp_path: Path) -> None:
    sparse = pydicom.dcmread(write_sr(tmp_path, hand_built_source(), chest_result()))
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                    "ReferringPhysicianName"):
        assert keyword in sparse and sparse[keyword].value in ("", None), keyword

    dirty = pydicom.dcmread(write_sr(tmp_path, dirty_source(), chest_result()))
    assert "PatientAge" not in dirty and dirty.PatientSex == "" and dirty.StudyDate == ""
    assert dirty.PatientName == "Test^Patient"


def test_result_sr_uids_are_stable_and_differ_by_version_and_method() -> None:
    uids = result_sr_uids("1.2.3.4.5", "1.2.3.4", "chest-xray-pneumonia", 3, "kpl")
    assert uids == result_sr_uids("1.2.3.4.5", "1.2.3.4", "chest-xray-pneumonia", 3, "kpl")
    other_version = result_sr_uids("1.2.3.4.5", "1.2.3.4", "chest-xray-pneumonia", 4, "kpl")
    other_method = result_sr_uids("1.2.3.4.5", "1.2.3.4", "chest-xray-pneumonia", 3, "zeroshot")
    other_instance = result_sr_uids("1.2.3.4.6", "1.2.3.4", "chest-xray-pneumonia", 3, "kpl")
    other_study = result_sr_uids("1.2.3.4.5", "1.2.3.9", "chest-xray-pneumonia", 3, "kpl")
    assert len({uids[1], other_version[1], other_method[1], other_instance[1], other_study[1]}) == 5
    assert uids[0] == other_version[0] == other_method[0] == other_instance[0] != other_study[0]
    for uid in (*uids, *other_study):
        assert len(uid) <= 64 and UID(uid).is_valid


def test_a_rebuilt_sr_has_the_same_uids_throughout(tmp_path: Path) -> None:
    source = hand_built_source()
    first = pydicom.dcmread(write_sr(tmp_path, source, chest_result(), "first.dcm"))
    second = pydicom.dcmread(write_sr(tmp_path, source, chest_result(), "second.dcm"))
    assert (first.SOPInstanceUID, first.InstanceNumber) == (second.SOPInstanceUID, second.InstanceNumber)
    assert ([child(group, ("112040", "DCM")).UID for group in class_groups(first)]
            == [child(group, ("112040", "DCM")).UID for group in class_groups(second)])


def test_finding_codes_use_snomed_where_known_and_the_local_scheme_otherwise() -> None:
    assert code(finding_code("pneumonia")) == ("233604007", "SCT")
    assert code(finding_code("COVID-19")) == ("840539006", "SCT")
    assert code(finding_code("no_finding")) == code(finding_code("normal")) == ("17621005", "SCT")
    nevus = finding_code("nv")
    assert (nevus.CodeValue, nevus.CodingSchemeDesignator, nevus.CodeMeaning) == (
        "nv", "99MEDZERO", "Melanocytic nevus")
    long_unknown = finding_code(LONG_UNKNOWN)
    assert long_unknown.LongCodeValue == LONG_UNKNOWN and "CodeValue" not in long_unknown
    assert len(finding_code("x" * 80).CodeMeaning) == 64


def test_what_cannot_be_reported_is_refused(tmp_path: Path) -> None:
    no_uid = hand_built_source()
    del no_uid.SOPInstanceUID
    with pytest.raises(UnsupportedDicom, match="SOPInstanceUID"):
        build_result_sr(no_uid, chest_result(), series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4")
    for bad in (chest_result(decision="effusion"), chest_result(classes=[ReportedClass("pneumonia", 1.5)]),
                chest_result(classes=[])):
        with pytest.raises(InvalidInput):
            build_result_sr(hand_built_source(), bad, series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4")


def test_building_the_sr_logs_and_warns_nothing_about_the_patient(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    patient = hand_built_source()
    patient.PatientName, patient.PatientID = "Doejane", "MRN-778899"    # a one-part name highdicom warns about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with caplog.at_level(logging.DEBUG):
            report = pydicom.dcmread(write_sr(tmp_path, patient, chest_result()))
    assert report.PatientName == "Doejane"           # in the SR, where it belongs
    said = [str(w.message) for w in caught] + [record.getMessage() for record in caplog.records]
    assert not [line for line in said if "Doejane" in line or "MRN-778899" in line]
