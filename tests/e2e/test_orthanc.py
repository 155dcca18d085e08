"""Behind a real PACS: Orthanc (Debian packages orthanc + orthanc-dicomweb) on free loopback ports with a
generated configuration, medzero as a server process.

- DIMSE both ways: Orthanc sends a study to medzero through its REST /modalities/{id}/store (C-STORE); medzero
  classifies it and C-STOREs the AI Results SR back; the SR is found in Orthanc in the same study and read with
  pydicom (codes, probability, references) and checked with dciodvfy.
- DICOMweb both ways: Orthanc's DICOMweb client STOWs the study to medzero (/dicom-web/servers/{id}/stow);
  medzero STOWs the SR into Orthanc's /dicom-web.
"""
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.conftest import free_port, server_env, wait_ready
from tests.factories import shared_data_dir

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("Orthanc") is None,
                                 reason="Orthanc not installed (Debian packages 'orthanc orthanc-dicomweb'; "
                                        ".ci/run installs them)")]
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ROUTES = "rules: [{name: radiographs, modality: [DX, CR], label_set: chest-xray-pneumonia}]\n"
SOURCE_FILE = "nih_cxr14_dx_no_finding.dcm"
CLASSES = {"normal", "pneumonia"}


@dataclass(frozen=True)
class Orthanc:
    http: str
    dicom_port: int

    def post(self, path: str, **kwargs) -> httpx.Response:
        response = httpx.post(f"{self.http}{path}", timeout=60, **kwargs)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:500]}"
        return response

    def put(self, path: str, body: dict) -> None:
        response = httpx.put(f"{self.http}{path}", json=body, timeout=30)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:500]}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.http}{path}", timeout=30)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip(f"the Orthanc DICOMweb plugin is not at {DICOMWEB_PLUGIN} (Debian package orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port = free_port(), free_port()
    config = {"Name": "medzero-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
              "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomCheckModalityHost": False, "DicomAlwaysAllowStore": True,
              "DicomScuTimeout": 30, "Plugins": [str(DICOMWEB_PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Servers": {}}}
    (root / "orthanc.json").write_text(json.dumps(config))
    with open(root / "orthanc.log", "wb") as log:
        process = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    server = Orthanc(f"http://127.0.0.1:{http_port}", dicom_port)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (root / "orthanc.log").read_text()[-2000:]
            try:
                if server.get("/system").status_code == 200 and server.get("/dicom-web/studies").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Orthanc did not start in 60 s"
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def medzero(tmp_path: Path, **env: str) -> Iterator[tuple[str, int]]:
    (tmp_path / "routes.yaml").write_text(ROUTES)
    port, dicom_port = free_port(), free_port()
    environment = server_env(tmp_path / "data", port, MEDZERO_DICOM_ROUTES_FILE=str(tmp_path / "routes.yaml"),
                             MEDZERO_DICOM_PORT=str(dicom_port), MEDZERO_DICOM_ALLOWED_AE_TITLES="ORTHANC",
                             MEDZERO_DELIVERY_RETRY_SECONDS="0.5", **env)
    with open(tmp_path / "medzero.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "app", "serve"], env=environment, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        yield wait_ready(f"http://127.0.0.1:{port}", process, timeout_seconds=120), dicom_port
    finally:
        process.terminate()
        process.wait(timeout=30)


def source_dicom(tmp_path: Path) -> Path:
    """The real chest radiograph as a new study of its own (so each test finds only its own SR)."""
    shared = shared_data_dir()
    if shared is None:
        pytest.skip("no ../shared/data on this machine")
    dataset = pydicom.dcmread(shared / "dicom" / SOURCE_FILE)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(dataset, keyword, pydicom.uid.generate_uid())
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.save_as(tmp_path / "source.dcm", enforce_file_format=True)
    return tmp_path / "source.dcm"


def upload(orthanc: Orthanc, path: Path) -> tuple[str, str]:
    """(Orthanc instance id, Orthanc study id) of a file stored into Orthanc."""
    stored = orthanc.post("/instances", content=path.read_bytes()).json()
    return stored["ID"], stored["ParentStudy"]


def wait_for_sent_result(base: str, study_uid: str, timeout_seconds: float = 120) -> dict:
    deadline = time.monotonic() + timeout_seconds
    results: list[dict] = []
    while time.monotonic() < deadline:
        results = httpx.get(f"{base}/results", params={"study": study_uid}, timeout=10).json()["data"]
        if results and results[0]["deliveries"] and results[0]["deliveries"][0]["state"] in ("sent", "dead_letter"):
            return results[0]
        time.sleep(0.3)
    raise AssertionError(f"no delivered result for {study_uid}: {results}")


def sr_in_study(orthanc: Orthanc, study_id: str, timeout_seconds: float = 60) -> pydicom.Dataset:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        for series in orthanc.get(f"/studies/{study_id}/series").json():
            if series["MainDicomTags"].get("Modality") == "SR":
                [instance] = series["Instances"]
                return pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.get(f"/instances/{instance}/file")
                                                                     .content))
        time.sleep(0.3)
    raise AssertionError(f"no SR in Orthanc study {study_id}")


def content_items(items: pydicom.Sequence) -> Iterator[pydicom.Dataset]:
    for item in items:
        yield item
        yield from content_items(item.get("ContentSequence", []))


def check_report(report: pydicom.Dataset, source: pydicom.Dataset, result: dict, tmp_path: Path) -> None:
    """What a viewer and a downstream system read from the SR matches the result medzero stored."""
    assert report.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert report.StudyInstanceUID == source.StudyInstanceUID and report.PatientID == source.PatientID
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    items = list(content_items(report.ContentSequence))
    numbers = [item for item in items if item.ValueType == "NUM"]
    assert numbers and all(item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "1"
                           for item in numbers)
    probabilities = sorted(float(item.MeasuredValueSequence[0].NumericValue) for item in numbers)
    expected = sorted(p["probability"] for p in result["predictions"])
    assert probabilities == pytest.approx(expected, abs=1e-4)
    findings = [item.ConceptCodeSequence[0] for item in items if item.ValueType == "CODE"
                and item.ConceptNameCodeSequence[0].CodeMeaning == "Finding"]
    assert {code.CodeValue for code in findings if code.CodingSchemeDesignator == "SCT"} >= {"233604007"}  # pneumonia
    references = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in items
                  if item.ValueType == "IMAGE"}
    assert references == {source.SOPInstanceUID}
    equipment = report.ContributingEquipmentSequence[-1]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    if shutil.which("dciodvfy"):
        report.save_as(tmp_path / "report.dcm", enforce_file_format=True)
        checked = subprocess.run(["dciodvfy", str(tmp_path / "report.dcm")], capture_output=True, text=True,
                                 timeout=60, check=False)
        errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
        assert errors == []


def test_dimse_both_ways(orthanc: Orthanc, tmp_path: Path) -> None:
    path = source_dicom(tmp_path)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    with medzero(tmp_path, MEDZERO_SR_DESTINATION=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}") as (base, port):
        orthanc.put("/modalities/medzero", {"AET": "MEDZERO", "Host": "127.0.0.1", "Port": port})
        assert orthanc.post("/modalities/medzero/echo", json={}).status_code == 200
        instance_id, study_id = upload(orthanc, path)
        orthanc.post("/modalities/medzero/store", json={"Resources": [instance_id], "Synchronous": True})
        result = wait_for_sent_result(base, str(source.StudyInstanceUID))
        [delivery] = result["deliveries"]
        assert delivery["state"] == "sent", delivery
        report = sr_in_study(orthanc, study_id)
        assert report.SOPInstanceUID == delivery["sr_sop_instance_uid"]
        check_report(report, source, result, tmp_path)
        [instance] = httpx.get(f"{base}/dicom/instances", params={"study": str(source.StudyInstanceUID)}).json()["data"]
        assert instance["source"] == "c-store:ORTHANC"


def test_dicomweb_both_ways(orthanc: Orthanc, tmp_path: Path) -> None:
    path = source_dicom(tmp_path)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    with medzero(tmp_path, MEDZERO_SR_STOW_URL=f"{orthanc.http}/dicom-web") as (base, _):
        orthanc.put("/dicom-web/servers/medzero", {"Url": f"{base}/dicomweb"})
        _, study_id = upload(orthanc, path)
        orthanc.post("/dicom-web/servers/medzero/stow", json={"Resources": [study_id], "Synchronous": True})
        result = wait_for_sent_result(base, str(source.StudyInstanceUID))
        [delivery] = result["deliveries"]
        assert delivery["target"] == "stow" and delivery["state"] == "sent", delivery
        report = sr_in_study(orthanc, study_id)
        check_report(report, source, result, tmp_path)
        [instance] = httpx.get(f"{base}/dicom/instances", params={"study": str(source.StudyInstanceUID)}).json()["data"]
        assert instance["source"] == "stow-rs"
