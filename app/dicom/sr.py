"""The AI Results SR: one classified DICOM instance's result, sent back into the instance's own study.

What a result becomes (IHE Radiology AI Results, AIR, as far as highdicom allows):

    Comprehensive 3D SR, root TID 1500 "Imaging Measurement Report" (DCM 126000)
      observer context   the model as a Device observer (TID 1004): UID from the model id, name, manufacturer, model
      procedure reported from Modality / BodyPartExamined / SOP class (table below)
      Imaging Measurements (DCM 126010)
        one TID 1501 group per class of the label set, in the result's (ranked) order:
          tracking identifier      the class name + a UID derived from the SR's SOP Instance UID and the class name
          Finding (DCM 121071)     finding_code(class name)
          Probability (DCM 122157) the probability, unit (UCUM, "1", "no units"); calibrated when the method is
          In calibrated prediction set (99MEDZERO in_pred_set) = SCT Yes / No; only when the method gives a set
          Algorithm Identification (TID 4019), on the group and on the probability: name "medzero", version
              "<model id> | <method> | v<label set version>", parameters label_set=, label_set_version=, method=,
              calibrated=, pretrained_weights=
          source image             the classified instance (SOP class + SOP instance), as "Source of Measurement"
      Qualitative Evaluations (UMLS C0034375), TID 1500's report-level evaluations:
          medzero decision (99MEDZERO decision) = finding_code(decided class), or 99MEDZERO "uncertain" when the
              service abstained; Model weights (99MEDZERO model_weights) TEXT when the weights were random (demo)
    Contributing Equipment: highdicom's own items (the source's acquisition equipment when it names a
      manufacturer; highdicom as Processing Equipment) and AIR's item: purpose (Newcode1, 99IHE, "Processing
      Algorithm"), Manufacturer "medzero", Manufacturer's Model Name = model id, Software Versions = medzero's version
      and "<method>; <label set> v<version>", Device UID = the observer's UID, Contribution DateTime / Description.

Probability is DCM 122157 "Probability" (DICOM's own code; no SNOMED CT observable for a bare probability could be
confirmed) with UCUM "1". A reader finds the decided class by matching the decision's code to a group's Finding;
the prediction set is the classes whose group says Yes, and absent (no item in any group) for uncalibrated methods.

Codes. SNOMED CT codes are used only where a public source confirmed them: the DICOM PS3.16 dictionary that
pydicom ships (D), or several independent public code tables that agree (P: FHIR value sets, eCQM value set
"Level of Severity of Retinopathy Findings", EU Digital COVID Certificate value sets). Everything else is in the
local scheme.

    class (aliases)                   code                      meaning                                     source
    normal, no_finding                SCT 17621005              Normal                                      D
    pneumonia                         SCT 233604007             Pneumonia                                   P
    covid19 (covid_19)                SCT 840539006             COVID-19                                    P
    mel (melanoma)                    SCT 1162635006            Malignant melanoma                          D
    bcc (basal_cell_carcinoma)        SCT 254701007             Basal cell carcinoma of skin                P
    akiec (actinic_keratosis)         SCT 201101007             Actinic keratosis                           D
    1_mild                            SCT 312903003             Mild nonproliferative diabetic retinopathy  P
    2_moderate                        SCT 312904009             Moderate nonproliferative diabetic ret...   P
    3_severe                          SCT 312905005             Severe nonproliferative diabetic ret...     P
    4_proliferative                   SCT 59276001              Proliferative diabetic retinopathy          P
    benign / malignant                SCT 30807003 / 21594007   Benign / Malignant                          D
    cardiomegaly, edema               SCT 287272002 / 79654002  Cardiomegaly / Edema                        D
    pleural_effusion, pneumothorax    SCT 60046008 / 36118008   Pleural effusion / Pneumothorax             D
    nv, bkl, df, vasc, 0_no_dr, other_pneumonia, atelectasis, consolidation, and any other class: 99MEDZERO

HAM10000's akiec also holds Bowen's disease, so "Actinic keratosis" names its main member, not all of it; "edema"
is coded as Edema, not Pulmonary edema, because finding_code sees only the class name.

The local scheme 99MEDZERO (declared in the Coding Scheme Identification Sequence): a class's code value is its
class name exactly (a Long Code Value when over 16 characters, as highdicom's CodedConcept does; a backslash, the
DICOM value delimiter, becomes "/"), its meaning a readable name or the class name (at most 64 characters). Concept
names of our own: decision "medzero decision", uncertain "Uncertain (no class decided)", in_pred_set "In
calibrated prediction set", model_weights "Model weights". The tracking identifier carries the class name, so a
reader recovers the class even where two classes share a code (normal and no_finding do; no built-in label set has
both).

Procedure reported: CR/DX (by Modality or SOP class) of the CHEST/THORAX → SCT 399208008 "Plain chest X-ray" (P),
other CR/DX → SCT 168537006 "Plain radiography" (D); US of the BREAST → SCT 47079000 "Ultrasonography of breast" (D),
other US → SCT 16310003 "Diagnostic ultrasonography" (D); Dermoscopic Photography SOP class → SCT 446078004
"Dermoscopic photography" (D); anything else (ophthalmic, VL photographs, secondary captures without a radiographic
Modality) → SCT 363679005 "Imaging procedure" (D, CID 100), since a finer code would claim more than we know.

Where highdicom forces a deviation, and what we do:
- highdicom's ContributingEquipment accepts only CID 7005 purposes, so AIR's (Newcode1, 99IHE, "Processing
  Algorithm") item is appended with pydicom after highdicom has built the dataset. That code is AIR's interim one
  (AIR Rev 1.1 §6.5.3.1, as MONAI Deploy encodes it); DCM 113961 is "Reconstruction Algorithm", not this.
- highdicom's MeasurementReport builds only Imaging Measurements; TID 1500's report-level Qualitative Evaluations
  container is appended to its root content (with highdicom content items) before the SR is built. highdicom reads
  such a document back; its accessors simply do not look at that container.
- highdicom reads PatientID, PatientName, PatientBirthDate, PatientSex, AccessionNumber, StudyID, StudyDate and
  StudyTime from the evidence as attributes: the evidence is a pixel-free copy of the source where those that are
  missing or invalid are empty (all are Type 2 in the SR, so empty is valid). highdicom copies the source's Patient
  and Study modules as they are, so values invalid for their VR (a PatientAge of "81") are left out of the copy.
- The SR is PRELIMINARY, COMPLETE and UNVERIFIED: an unreviewed machine result.

UIDs: result_sr_uids derives them (pydicom's generate_uid with entropy sources) so a retry re-sends the same
instance: one medzero series per study, one SR per (source instance, label set, version, method). The series has a
constant number and description; the instance number is a hash of the SOP Instance UID, stable across retries.
Nothing here writes patient data into errors or logs.
"""
import hashlib
import warnings
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM, validate_value

from app.errors import InvalidInput, UnsupportedDicom

LOCAL_SCHEME = "99MEDZERO"
IHE_SCHEME = "99IHE"
MANUFACTURER = "medzero"
SERIES_DESCRIPTION = "medzero AI results"
SERIES_NUMBER = 990                  # one medzero series per study; high, so it sorts after the acquired series
PROBABILITY_SLACK = 1e-6             # float32 softmax rounding may step just past 0 or 1; clamped when written
MAX_LONG_STRING = 64                 # LO (Manufacturer's Model Name, Software Versions) and code meanings
RANDOM_WEIGHTS_NOTE = "Model with random weights: a demonstration output, not a clinical result."
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})   # Float / Double Float / Pixel Data

DERMOSCOPIC_PHOTOGRAPHY_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.7"
RADIOGRAPHY_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.1",          # CR Image Storage
                                     "1.2.840.10008.5.1.4.1.1.1.1",        # DX for Presentation
                                     "1.2.840.10008.5.1.4.1.1.1.1.1"})     # DX for Processing

# (code value, scheme, meaning), keyed by the normalised class name (see _table_key); the module docstring says
# where each SNOMED CT code was confirmed.
FINDING_CODES: dict[str, tuple[str, str, str]] = {
    "normal": ("17621005", "SCT", "Normal"),
    "no_finding": ("17621005", "SCT", "Normal"),
    "pneumonia": ("233604007", "SCT", "Pneumonia"),
    "covid19": ("840539006", "SCT", "COVID-19"),
    "covid_19": ("840539006", "SCT", "COVID-19"),
    "mel": ("1162635006", "SCT", "Malignant melanoma"),
    "melanoma": ("1162635006", "SCT", "Malignant melanoma"),
    "bcc": ("254701007", "SCT", "Basal cell carcinoma of skin"),
    "basal_cell_carcinoma": ("254701007", "SCT", "Basal cell carcinoma of skin"),
    "akiec": ("201101007", "SCT", "Actinic keratosis"),
    "actinic_keratosis": ("201101007", "SCT", "Actinic keratosis"),
    "1_mild": ("312903003", "SCT", "Mild nonproliferative diabetic retinopathy"),
    "2_moderate": ("312904009", "SCT", "Moderate nonproliferative diabetic retinopathy"),
    "3_severe": ("312905005", "SCT", "Severe nonproliferative diabetic retinopathy"),
    "4_proliferative": ("59276001", "SCT", "Proliferative diabetic retinopathy"),
    "benign": ("30807003", "SCT", "Benign"),
    "malignant": ("21594007", "SCT", "Malignant"),
    "cardiomegaly": ("287272002", "SCT", "Cardiomegaly"),
    "edema": ("79654002", "SCT", "Edema"),
    "pleural_effusion": ("60046008", "SCT", "Pleural effusion"),
    "pneumothorax": ("36118008", "SCT", "Pneumothorax"),
}
# Readable meanings for built-in classes that stay in the local scheme (no SNOMED CT code could be confirmed).
LOCAL_MEANINGS: dict[str, str] = {
    "nv": "Melanocytic nevus",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "vasc": "Vascular lesion",
    "0_no_dr": "No diabetic retinopathy",
    "other_pneumonia": "Other pneumonia",
    "atelectasis": "Atelectasis",
    "consolidation": "Consolidation",
}

PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
DECISION = hd.sr.CodedConcept("decision", LOCAL_SCHEME, "medzero decision")
UNCERTAIN = hd.sr.CodedConcept("uncertain", LOCAL_SCHEME, "Uncertain (no class decided)")
IN_PREDICTION_SET = hd.sr.CodedConcept("in_pred_set", LOCAL_SCHEME, "In calibrated prediction set")
MODEL_WEIGHTS = hd.sr.CodedConcept("model_weights", LOCAL_SCHEME, "Model weights")
PROCESSING_ALGORITHM = ("Newcode1", IHE_SCHEME, "Processing Algorithm")   # IHE AIR Rev 1.1 §6.5.3.1

PLAIN_CHEST_XRAY = ("399208008", "SCT", "Plain chest X-ray")
PLAIN_RADIOGRAPHY = ("168537006", "SCT", "Plain radiography")
BREAST_ULTRASOUND = ("47079000", "SCT", "Ultrasonography of breast")
ULTRASOUND = ("16310003", "SCT", "Diagnostic ultrasonography")
DERMOSCOPIC_PHOTOGRAPHY = ("446078004", "SCT", "Dermoscopic photography")
IMAGING_PROCEDURE = ("363679005", "SCT", "Imaging procedure")


@dataclass(frozen=True)
class ReportedClass:
    label: str                 # the label set's class name, e.g. "pneumonia"
    probability: float         # in [0, 1]; calibrated when the method is calibrated
    in_prediction_set: bool | None = None   # None: no calibrated prediction set for this method


@dataclass(frozen=True)
class AIResult:
    classes: list[ReportedClass]     # ranked, highest probability first; every class of the label set
    decision: str | None             # the decided class, or None when the service abstained ("uncertain")
    label_set: str
    label_set_version: int
    method: str                      # "zeroshot" | "kpl" | "meduna" | ...
    model_id: str                    # an open_clip id, e.g. "hf-hub:microsoft/BiomedCLIP-..." or "medzero-tiny"
    calibrated: bool
    pretrained_weights: bool = True  # False: random weights (demo); said in the SR
    software_version: str = "0.1.0"


def result_sr_uids(source_sop_instance_uid: str, study_instance_uid: str, label_set: str,
                   label_set_version: int, method: str, model_id: str | None = None) -> tuple[str, str]:
    """(series_instance_uid, sop_instance_uid) of the SR for that result: the same inputs always give the same
    UIDs (pydicom.uid.generate_uid(entropy_srcs=...)); one medzero SR series per study. With `model_id`, another
    model's result on the same instance is another SR rather than a different content under the same UID."""
    series_uid = generate_uid(entropy_srcs=["medzero AI results series", study_instance_uid])
    sop_uid = generate_uid(entropy_srcs=["medzero AI results SR", study_instance_uid, source_sop_instance_uid,
                                         label_set, str(label_set_version), method]
                           + ([model_id] if model_id else []))
    return str(series_uid), str(sop_uid)


def build_result_sr(source: Dataset, result: AIResult, *, series_instance_uid: str,
                    sop_instance_uid: str, institution_name: str | None = None) -> Dataset:
    """The AI Results SR for one classified source instance (source: the received dataset, pixel data not needed)."""
    check_result(result)
    evidence = evidence_of(source)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=model_observer(result.model_id)),
        procedure_reported=procedure_code(source),
        imaging_measurements=[class_group(reported, result, evidence, sop_instance_uid)
                              for reported in result.classes])
    report[0].ContentSequence.append(report_evaluations(result))
    with warnings.catch_warnings():
        # highdicom's person-name check quotes the patient's name in its warning: no patient data in logs
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        sr = _comprehensive_3d_sr(evidence, report, result, series_instance_uid, sop_instance_uid, institution_name)
    sr.ContributingEquipmentSequence.append(processing_algorithm_equipment(result, str(source.SOPInstanceUID)))
    return sr


def _comprehensive_3d_sr(evidence: Dataset, report: hd.sr.MeasurementReport, result: AIResult,
                         series_instance_uid: str, sop_instance_uid: str,
                         institution_name: str | None) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR(
        evidence=[evidence], content=report[0], series_instance_uid=series_instance_uid,
        series_number=SERIES_NUMBER, sop_instance_uid=sop_instance_uid,
        instance_number=instance_number(sop_instance_uid), manufacturer=MANUFACTURER, is_complete=True,
        is_final=False, is_verified=False, institution_name=institution_name,
        series_description=SERIES_DESCRIPTION, manufacturer_model_name=MANUFACTURER,
        software_versions=fit_long_string(result.software_version), coding_schemes=coding_schemes())


def finding_code(label: str) -> hd.sr.CodedConcept:
    """SNOMED CT where the table knows the class, else the class name in the local scheme (99MEDZERO)."""
    key = _table_key(label)
    known = FINDING_CODES.get(key)
    if known is not None:
        return hd.sr.CodedConcept(*known)
    meaning = LOCAL_MEANINGS.get(key, label)
    return hd.sr.CodedConcept(_without_backslash(label), LOCAL_SCHEME,
                              _without_backslash(meaning)[:MAX_LONG_STRING])


def procedure_code(source: Dataset) -> hd.sr.CodedConcept:
    """The imaging procedure the source came from, as finely as Modality, BodyPartExamined and SOP class tell."""
    modality = str(source.get("Modality", "") or "").upper()
    body_part = str(source.get("BodyPartExamined", "") or "").upper()
    sop_class = str(source.get("SOPClassUID", "") or "")
    if modality in ("CR", "DX") or sop_class in RADIOGRAPHY_SOP_CLASSES:
        return hd.sr.CodedConcept(*(PLAIN_CHEST_XRAY if body_part in ("CHEST", "THORAX") else PLAIN_RADIOGRAPHY))
    if modality == "US":
        return hd.sr.CodedConcept(*(BREAST_ULTRASOUND if body_part == "BREAST" else ULTRASOUND))
    if sop_class == DERMOSCOPIC_PHOTOGRAPHY_STORAGE:
        return hd.sr.CodedConcept(*DERMOSCOPIC_PHOTOGRAPHY)
    return hd.sr.CodedConcept(*IMAGING_PROCEDURE)


def check_result(result: AIResult) -> None:
    """InvalidInput when the result cannot be reported as it stands."""
    if not result.classes:
        raise InvalidInput("an AI result needs at least one class")
    labels = [reported.label for reported in result.classes]
    if any(not label.strip() for label in labels) or len(set(labels)) != len(labels):
        raise InvalidInput("the classes of an AI result need distinct, non-empty names")
    if any(not -PROBABILITY_SLACK <= reported.probability <= 1.0 + PROBABILITY_SLACK for reported in result.classes):
        raise InvalidInput("class probabilities must lie in [0, 1]")
    if result.decision is not None and result.decision not in labels:
        raise InvalidInput(f"the decision {result.decision!r} is not one of the reported classes")


def evidence_of(source: Dataset) -> Dataset:
    """What highdicom takes patient, study and references from: the source without pixel data or values invalid
    for their VR, its Type 2 patient/study attributes present (empty when missing or unusable) because highdicom
    reads them directly."""
    missing = [keyword for keyword in REQUIRED_UIDS if not str(source.get(keyword, "") or "")]
    if missing:
        raise UnsupportedDicom(f"the classified instance has no {', '.join(missing)}")
    evidence = Dataset()
    for element in source:
        # a value invalid for its VR would be copied into the SR and make it invalid too: leave it out
        if element.tag not in PIXEL_TAGS and (element.keyword in REQUIRED_UIDS or _is_valid(element)):
            evidence.add(element)
    for keyword in ("PatientID", "PatientName", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        if keyword not in evidence or evidence[keyword].value is None:
            setattr(evidence, keyword, "")
    evidence.PatientBirthDate = _valid_or_empty(DA, evidence.get("PatientBirthDate"))
    evidence.StudyDate = _valid_or_empty(DA, evidence.get("StudyDate"))
    evidence.StudyTime = _valid_or_empty(TM, evidence.get("StudyTime"))
    if str(evidence.get("PatientSex", "") or "") not in ("M", "F", "O"):
        evidence.PatientSex = ""          # highdicom refuses anything else, and Type 2 allows empty
    return evidence


def model_observer(model_id: str) -> hd.sr.ObserverContext:
    """The model as the SR's device observer (TID 1002 / 1004)."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model_device_uid(model_id), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
            model_name=model_id))


def model_device_uid(model_id: str) -> str:
    """The observer's Device Observer UID and the Processing Algorithm's Device UID: one per model id."""
    return str(generate_uid(entropy_srcs=["medzero model", model_id]))


def algorithm_identification(result: AIResult) -> hd.sr.AlgorithmIdentification:
    """TID 4019; built afresh for every place it goes, so no content item is shared between two parents."""
    return hd.sr.AlgorithmIdentification(
        name=MANUFACTURER, version=f"{result.model_id} | {result.method} | v{result.label_set_version}",
        parameters=[f"label_set={result.label_set}", f"label_set_version={result.label_set_version}",
                    f"method={result.method}", f"calibrated={str(result.calibrated).lower()}",
                    f"pretrained_weights={str(result.pretrained_weights).lower()}"])


def class_group(reported: ReportedClass, result: AIResult, source: Dataset,
                sr_sop_instance_uid: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One class's TID 1501 group: its finding code, its probability and, when there is one, its membership of
    the calibrated prediction set."""
    probability = hd.sr.Measurement(name=PROBABILITY, value=min(max(float(reported.probability), 0.0), 1.0),
                                    unit=NO_UNITS,
                                    algorithm_id=algorithm_identification(result))
    evaluations = None
    if reported.in_prediction_set is not None:
        member = codes.SCT.Yes if reported.in_prediction_set else codes.SCT.No
        evaluations = [hd.sr.QualitativeEvaluation(name=IN_PREDICTION_SET, value=member)]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(sr_sop_instance_uid, reported.label),
                                                     identifier=reported.label),
        finding_type=finding_code(reported.label), algorithm_id=algorithm_identification(result),
        measurements=[probability], qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(source.SOPClassUID), str(source.SOPInstanceUID))])


def tracking_uid(sr_sop_instance_uid: str, label: str) -> str:
    """Stable per (SR, class), so a rebuilt SR carries the same tracking UIDs."""
    return str(generate_uid(entropy_srcs=["medzero tracking", sr_sop_instance_uid, label]))


def report_evaluations(result: AIResult) -> hd.sr.ContainerContentItem:
    """TID 1500's Qualitative Evaluations: the decision (a class's finding code, or "uncertain") and, for random
    weights, a note saying the result is a demonstration."""
    decided = finding_code(result.decision) if result.decision is not None else UNCERTAIN
    items: list[hd.sr.ContentItem] = [hd.sr.CodeContentItem(
        name=DECISION, value=decided, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)]
    if not result.pretrained_weights:
        items.append(hd.sr.TextContentItem(name=MODEL_WEIGHTS, value=RANDOM_WEIGHTS_NOTE,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def processing_algorithm_equipment(result: AIResult, source_sop_instance_uid: str) -> Dataset:
    """AIR's Contributing Equipment item for the algorithm (highdicom refuses its purpose code)."""
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = PROCESSING_ALGORITHM
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = fit_long_string(result.model_id)
    item.SoftwareVersions = [fit_long_string(result.software_version),
                             fit_long_string(f"{result.method}; {result.label_set} v{result.label_set_version}")]
    item.DeviceUID = model_device_uid(result.model_id)
    item.ContributionDateTime = datetime.now().astimezone().strftime("%Y%m%d%H%M%S.%f%z")
    item.ContributionDescription = contribution_description(result, source_sop_instance_uid)
    return item


def contribution_description(result: AIResult, source_sop_instance_uid: str) -> str:
    """ST (at most 1024 characters): what was classified, how; UIDs only, no patient data."""
    calibrated = "calibrated" if result.calibrated else "uncalibrated"
    text = (f"Zero-shot classification of instance {source_sop_instance_uid} with label set {result.label_set} "
            f"v{result.label_set_version}, method {result.method} ({calibrated} probabilities), "
            f"model {result.model_id}.")
    if not result.pretrained_weights:
        text += " " + RANDOM_WEIGHTS_NOTE
    return text[:1024]


def coding_schemes() -> list[CodingSchemeIdentificationItem]:
    """The private schemes the SR uses, as PS3.3 asks for schemes outside PS3.16's table."""
    return [CodingSchemeIdentificationItem(designator=LOCAL_SCHEME, name="medzero local codes",
                                           responsible_organization=MANUFACTURER),
            CodingSchemeIdentificationItem(designator=IHE_SCHEME, name="IHE interim codes",
                                           responsible_organization="IHE International")]


def instance_number(sop_instance_uid: str) -> int:
    """Stable across retries and practically unique within the one medzero series; the standard asks for no
    order, so a hash of the SOP Instance UID serves."""
    return int(hashlib.sha256(sop_instance_uid.encode("ascii")).hexdigest(), 16) % 999_999 + 1


def fit_long_string(text: str) -> str:
    """At most 64 characters (LO); the middle goes, since ids differ at their ends (hub org, file name)."""
    text = _without_backslash(text)
    if len(text) <= MAX_LONG_STRING:
        return text
    keep = MAX_LONG_STRING - 3
    return f"{text[:keep // 2]}...{text[-(keep - keep // 2):]}"


def _table_key(label: str) -> str:
    return label.strip().lower().replace("-", "_").replace(" ", "_")


def _without_backslash(text: str) -> str:
    return text.replace("\\", "/")      # the DICOM multi-value delimiter


def _is_valid(element: DataElement) -> bool:
    """Whether pydicom's writing rules accept every value of the element (sequences are taken as they are)."""
    if element.VR == "SQ" or element.value is None:
        return True
    values = element.value if isinstance(element.value, (MultiValue, list)) else [element.value]
    try:
        for value in values:
            validate_value(element.VR, value, config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _valid_or_empty(kind: type, value: object) -> object:
    """The value when pydicom parses it as `kind` (DA / TM), else empty (a PACS may send unparsable dates)."""
    if value is None or value == "":
        return ""
    try:
        kind(value)
    except (ValueError, TypeError):
        return ""
    return value
