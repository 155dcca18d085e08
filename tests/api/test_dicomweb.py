"""STOW-RS into the durable inbox: the standard response dataset, routing, one result per instance (also when
re-sent), refusals with their failure reason; the worker classifies real DICOMs from ../shared/data."""
import io
import time
import uuid
import zlib
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from tests.conftest import running_app, tiny_settings
from tests.factories import make_dicom_bytes, make_dicom_dataset, shared_data_dir

REFERENCED, FAILED, FAILURE_REASON = "00081199", "00081198", "00081197"
ROUTES = """
rules:
  - name: radiographs
    modality: [DX, CR]
    label_set: chest-xray-pneumonia
"""


def multipart(parts: list[bytes], content_type: str = "application/dicom") -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + part + b"\r\n"
                    for part in parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


def in_study(study: str, **options) -> bytes:
    dataset = make_dicom_dataset(**options)
    dataset.StudyInstanceUID = study
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def results_for(client: TestClient, study: str, expected: int, timeout_seconds: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        data = client.get("/results", params={"study": study}).json()["data"]
        if len(data) >= expected:
            return data
        time.sleep(0.1)
    raise AssertionError(f"{expected} results for {study} did not appear in {timeout_seconds} s")


@pytest.fixture
def client(tmp_path: Path):
    (tmp_path / "routes.yaml").write_text(ROUTES)
    with running_app(tiny_settings(tmp_path / "data", dicom_routes_file=tmp_path / "routes.yaml")) as c:
        yield c


def test_stored_instances_are_classified_once(client: TestClient) -> None:
    study = generate_uid()
    instances = [in_study(study, modality="DX"), in_study(study, modality="CR", rows=40, columns=30)]
    body, headers = multipart(instances)
    stored = client.post("/dicomweb/studies", content=body, headers=headers)
    assert stored.status_code == 200 and stored.headers["content-type"].startswith("application/dicom+json")
    referenced = stored.json()[REFERENCED]["Value"]
    uids = {pydicom.dcmread(io.BytesIO(i)).SOPInstanceUID for i in instances}
    assert {item["00081155"]["Value"][0] for item in referenced} == uids
    results = results_for(client, study, 2)
    assert {r["sop_instance_uid"] for r in results} == uids
    assert all(r["label_set"] == "chest-xray-pneumonia" and r["method"] == "zeroshot" for r in results)
    assert all(r["decision"] in ("normal", "pneumonia") and len(r["predictions"]) == 2 for r in results)
    assert client.get(f"/results/{results[0]['id']}").json()["sop_instance_uid"] == results[0]["sop_instance_uid"]
    again = client.post(f"/dicomweb/studies/{study}", content=body, headers=headers)   # a re-send
    assert again.status_code == 200
    time.sleep(1)
    assert len(client.get("/results", params={"study": study}).json()["data"]) == 2


def test_refused_parts_get_their_failure_reason(client: TestClient) -> None:
    study = generate_uid()
    good = in_study(study)
    body, headers = multipart([good, b"not dicom at all", in_study(study, with_pixel_data=False),
                               in_study(generate_uid())])
    stored = client.post(f"/dicomweb/studies/{study}", content=body, headers=headers)
    assert stored.status_code == 202
    reasons = [item[FAILURE_REASON]["Value"][0] for item in stored.json()[FAILED]["Value"]]
    assert reasons == [0xC000, 0xC000, 0xA900]          # unreadable, no pixel data, another study
    assert len(stored.json()[REFERENCED]["Value"]) == 1
    assert len(results_for(client, study, 1)) == 1
    only_bad, headers = multipart([b"garbage"])
    assert client.post("/dicomweb/studies", content=only_bad, headers=headers).status_code == 409
    assert client.post("/dicomweb/studies", content=b"x",
                       headers={"Content-Type": "application/json"}).status_code == 415


def test_unrouted_instances_are_acknowledged_and_skipped(client: TestClient) -> None:
    study = generate_uid()
    body, headers = multipart([in_study(study, modality="US")])
    assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
    time.sleep(0.5)
    assert client.get("/results", params={"study": study}).json()["data"] == []
    sop = pydicom.dcmread(io.BytesIO(body.split(b"\r\n\r\n", 1)[1])).SOPInstanceUID
    entry = client.app.state.runtime.inbox.entry_for(sop)
    assert entry.state == "skipped" and "Modality=US" in entry.reason


def test_real_dicoms_from_the_shared_data(client: TestClient) -> None:
    shared = shared_data_dir()
    if shared is None:
        pytest.skip("no ../shared/data on this machine")
    path = shared / "dicom" / "nih_cxr14_dx_no_finding.dcm"
    dataset = pydicom.dcmread(path)
    body, headers = multipart([path.read_bytes()])
    assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
    [result] = results_for(client, str(dataset.StudyInstanceUID), 1)
    assert result["sop_instance_uid"] == str(dataset.SOPInstanceUID)


def test_without_routes_everything_is_skipped(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path)) as client:
        data = make_dicom_bytes()
        body, headers = multipart([data])
        assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
        entry = client.app.state.runtime.inbox.entry_for(str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID))
        assert entry.state == "skipped" and "MEDZERO_DICOM_ROUTES_FILE" in entry.reason


def relabelled(data: bytes, transfer_syntax: str) -> bytes:
    """The same pixels encapsulated under another (compressed) Transfer Syntax UID, as a sender of, say, MPEG-2
    video would send them."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.PixelData = pydicom.encaps.encapsulate([dataset.PixelData])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def test_bad_dicom_is_refused_with_its_reason(client: TestClient) -> None:
    study = generate_uid()
    good = in_study(study, rows=64, columns=64)
    truncated = good[: len(good) - 2000]                   # the pixel data cut short
    ct = make_dicom_dataset()
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    ct.StudyInstanceUID = study
    buffer = io.BytesIO()
    ct.save_as(buffer, enforce_file_format=True)
    body, headers = multipart([truncated, relabelled(in_study(study), pydicom.uid.MPEG2MPML), buffer.getvalue(),
                               in_study(study, with_pixel_data=False)])
    stored = client.post(f"/dicomweb/studies/{study}", content=body, headers=headers)
    assert stored.status_code == 409
    reasons = [item[FAILURE_REASON]["Value"][0] for item in stored.json()[FAILED]["Value"]]
    assert reasons == [0xC000, 0xC000, 0x0122, 0xC000]
    warning = stored.headers["warning"]
    for said in ("truncated pixel data", "MPEG2", "CT Image Storage", "no pixel data"):
        assert said in warning
    assert client.get("/dicom/instances", params={"study": study}).json()["count"] == 0


def test_malformed_instances_never_make_a_500(client: TestClient) -> None:
    study = generate_uid()
    bad_uid = make_dicom_dataset()
    bad_uid.StudyInstanceUID = "1.2/../../admin?x="
    buffer = io.BytesIO()
    bad_uid.save_as(buffer, enforce_file_format=True)
    deflated_dataset = pydicom.dcmread(io.BytesIO(in_study(study)))
    deflated_dataset.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    deflated = io.BytesIO()
    deflated_dataset.save_as(deflated, enforce_file_format=True)
    truncated_deflate = deflated.getvalue()[: len(deflated.getvalue()) // 2]     # zlib fails mid-stream
    body, headers = multipart([buffer.getvalue(), truncated_deflate])
    stored = client.post("/dicomweb/studies", content=body, headers=headers)
    assert stored.status_code == 409, stored.text
    assert "not a valid UID" in stored.headers["warning"]
    assert client.get("/results/99999999999999999999").status_code == 422
    assert client.get("/results/0").status_code == 422


def test_a_deflated_bomb_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    """64 MB of zeros deflated to ~64 KB behind a Deflated Explicit VR file meta: pydicom alone would inflate it
    whole in memory; STOW-RS refuses it once past what an image within MEDZERO_MAX_IMAGE_PIXELS could need."""
    from pydicom.filewriter import write_file_meta_info
    dataset = make_dicom_dataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    header = pydicom.filebase.DicomBytesIO()
    write_file_meta_info(header, dataset.file_meta, enforce_standard=True)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb_body = b"".join(compressor.compress(bytes(1 << 20)) for _ in range(64)) + compressor.flush()
    bomb = b"\x00" * 128 + b"DICM" + header.getvalue() + bomb_body
    (tmp_path / "routes.yaml").write_text(ROUTES)
    with running_app(tiny_settings(tmp_path, dicom_routes_file=tmp_path / "routes.yaml",
                                   max_image_pixels=64 * 64)) as client:
        body, headers = multipart([bomb])
        stored = client.post("/dicomweb/studies", content=body, headers=headers)
        assert stored.status_code == 409, stored.text
        assert "inflates past" in stored.headers["warning"]
        assert client.get("/healthz").status_code == 200
