"""The C-STORE / C-ECHO SCP, against the server's own lifespan: dcmtk's echoscu and storescu (real DICOM tools)
and a pynetdicom SCU. Allowed callers only; the accepted SOP classes and transfer syntaxes; a store that cannot be
used gets a failure status with the reason and the listener keeps serving; stored instances are classified."""
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import MPEG2MPML, UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from app.dicom.scp import CANNOT_UNDERSTAND
from tests.api.test_dicomweb import ROUTES, results_for
from tests.conftest import metric, running_app, tiny_settings
from tests.factories import make_dicom_dataset, shared_data_dir

CALLER = "STORESCU"
JPEG_XL_LOSSLESS = UID("1.2.840.10008.1.2.4.110")
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None,
                                 reason="dcmtk not installed (Debian package 'dcmtk'; .ci/run installs it)")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("scp")
    (root / "routes.yaml").write_text(ROUTES)
    settings = tiny_settings(root / "data", dicom_routes_file=root / "routes.yaml", dicom_port=0,
                             dicom_allowed_ae_titles=[CALLER], dicom_network_timeout_seconds=10)
    with running_app(settings) as c:
        assert c.app.state.runtime.dicom_port, "the SCP is not listening"
        yield c


def port_of(client: TestClient) -> int:
    return client.app.state.runtime.dicom_port


def scu_store(client: TestClient, dataset: pydicom.Dataset, *, calling: str = CALLER) -> pydicom.Dataset:
    ae = AE(ae_title=calling)
    ae.add_requested_context(dataset.SOPClassUID, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", port_of(client), ae_title="MEDZERO")
    assert association.is_established
    try:
        return association.send_c_store(dataset)
    finally:
        association.release()


def dcmtk(tool: str, client: TestClient, *files: str, calling: str = CALLER) -> subprocess.CompletedProcess:
    return subprocess.run([tool, "-aet", calling, "-aec", "MEDZERO", "127.0.0.1", str(port_of(client)), *files],
                          capture_output=True, text=True, timeout=60, check=False)


@needs_dcmtk
def test_echo_from_an_allowed_caller_and_rejection_of_others(client: TestClient) -> None:
    assert dcmtk("echoscu", client).returncode == 0
    refused = dcmtk("echoscu", client, calling="INTRUDER")
    assert refused.returncode != 0
    assert "rejected" in (refused.stdout + refused.stderr).lower()


@needs_dcmtk
def test_storescu_files_are_classified(client: TestClient, tmp_path: Path) -> None:
    dataset = make_dicom_dataset(modality="DX")
    dataset.save_as(tmp_path / "dx.dcm", enforce_file_format=True)
    sent = dcmtk("storescu", client, str(tmp_path / "dx.dcm"))
    assert sent.returncode == 0, sent.stderr
    [result] = results_for(client, str(dataset.StudyInstanceUID), 1)
    assert result["sop_instance_uid"] == str(dataset.SOPInstanceUID)
    [entry] = client.get("/dicom/instances", params={"study": str(dataset.StudyInstanceUID)}).json()["data"]
    assert entry["source"] == f"c-store:{CALLER}" and entry["state"] == "done"
    assert metric(client, "medzero_dicom_instances_total", source="c-store", outcome="queued") >= 1


@needs_dcmtk
def test_real_compressed_dicoms_over_storescu(client: TestClient) -> None:
    shared = shared_data_dir()
    if shared is None:
        pytest.skip("no ../shared/data on this machine")
    proposals = {"RG1_J2KI.dcm": "--propose-j2k-lossy", "RG2_JPLL.dcm": "--propose-lossless",
                 "RG1_JLSN.dcm": "--propose-jls-lossy", "US1_J2KR.dcm": "--propose-j2k-lossless"}
    paths = [shared / "dicom" / name for name in proposals]
    for path in paths:                # each in the transfer syntax it is stored in (storescu proposes one family)
        sent = dcmtk("storescu", client, proposals[path.name], "--required", str(path))
        assert sent.returncode == 0, sent.stderr
    for path in paths:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        entry = client.app.state.runtime.inbox.entry_for(str(dataset.SOPInstanceUID))
        assert entry is not None and entry.source == f"c-store:{CALLER}"
    radiograph = pydicom.dcmread(paths[0], stop_before_pixels=True)
    results_for(client, str(radiograph.StudyInstanceUID), 1)    # CR: routed, decoded from JPEG 2000, classified


@needs_dcmtk
def test_a_sop_class_outside_the_list_is_refused_at_negotiation(client: TestClient, tmp_path: Path) -> None:
    dataset = make_dicom_dataset(modality="CT")
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
    dataset.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    refused = dcmtk("storescu", client, str(tmp_path / "ct.dcm"))
    assert refused.returncode != 0
    assert client.app.state.runtime.inbox.entry_for(str(dataset.SOPInstanceUID)) is None


def test_an_unsupported_transfer_syntax_is_refused_at_negotiation(client: TestClient) -> None:
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(SecondaryCaptureImageStorage, [MPEG2MPML, JPEG_XL_LOSSLESS])
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", port_of(client), ae_title="MEDZERO")
    try:
        assert association.is_established
        assert [c.abstract_syntax for c in association.accepted_contexts] == [Verification]
        assert [c.abstract_syntax for c in association.rejected_contexts] == [SecondaryCaptureImageStorage]
    finally:
        association.release()


def test_unusable_stores_get_a_failure_status_and_the_scp_keeps_serving(client: TestClient) -> None:
    no_pixels = make_dicom_dataset(with_pixel_data=False)
    status = scu_store(client, no_pixels)
    assert status.Status == CANNOT_UNDERSTAND and "no pixel data" in status.ErrorComment
    no_uid = make_dicom_dataset()
    del no_uid.StudyInstanceUID
    status = scu_store(client, no_uid)
    assert status.Status == CANNOT_UNDERSTAND and "StudyInstanceUID" in status.ErrorComment
    assert metric(client, "medzero_dicom_instances_total", source="c-store", outcome="refused") >= 2
    fine = make_dicom_dataset(modality="CR")
    assert scu_store(client, fine).Status == 0x0000
    results_for(client, str(fine.StudyInstanceUID), 1)


def test_a_resent_instance_is_acknowledged_and_classified_once(client: TestClient) -> None:
    dataset = make_dicom_dataset(modality="DX")
    assert scu_store(client, dataset).Status == 0 and scu_store(client, dataset).Status == 0
    results_for(client, str(dataset.StudyInstanceUID), 1)
    time.sleep(0.5)
    assert len(client.get("/results", params={"study": str(dataset.StudyInstanceUID)}).json()["data"]) == 1


def test_echo_over_pynetdicom_and_the_study_uid_is_kept(client: TestClient) -> None:
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", port_of(client), ae_title="MEDZERO")
    try:
        assert association.send_c_echo().Status == 0
    finally:
        association.release()
    study = generate_uid()
    dataset = make_dicom_dataset(modality="DX")
    dataset.StudyInstanceUID = study
    assert scu_store(client, dataset).Status == 0
    assert results_for(client, study, 1)[0]["study_instance_uid"] == study
