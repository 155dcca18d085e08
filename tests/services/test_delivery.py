"""Results go back: the SR by C-STORE to a real pynetdicom storage SCP, a JSON webhook to a real HTTP server;
an unreachable destination is retried with back-off, then a dead letter (in /results and the metric) that
POST /results/{id}/retry sends once the destination is back."""
import http.server
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage

from app.services.delivery import backoff_seconds
from tests.api.test_dicomweb import ROUTES, in_study, multipart, results_for
from tests.conftest import free_port, metric, running_app, tiny_settings
from tests.factories import make_dicom_dataset


class StorageReceiver:
    """A real storage SCP (pynetdicom) that keeps what it is sent."""

    def __init__(self, port: int, ae_title: str = "PACS") -> None:
        self.received: list[pydicom.Dataset] = []
        self.ae = AE(ae_title=ae_title)
        self.ae.add_supported_context(Comprehensive3DSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = self.ae.start_server(("127.0.0.1", port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        self.received.append(dataset)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


class WebhookReceiver(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        super().__init__(("127.0.0.1", 0), WebhookHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class WebhookHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def deliveries_of(client: TestClient, study: str, *, until: str, timeout_seconds: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        [result] = results_for(client, study, 1)
        if result["deliveries"] and all(d["state"] == until for d in result["deliveries"]):
            return result["deliveries"]
        time.sleep(0.1)
    raise AssertionError(f"deliveries of {study} not all {until}: {result['deliveries']}")


def stow_one(client: TestClient, study: str) -> None:
    body, headers = multipart([in_study(study, modality="DX")])
    assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 200


@pytest.fixture
def routes(tmp_path: Path) -> Path:
    (tmp_path / "routes.yaml").write_text(ROUTES)
    return tmp_path / "routes.yaml"


@pytest.fixture
def receiver() -> Iterator[StorageReceiver]:
    receiving = StorageReceiver(free_port())
    yield receiving
    receiving.close()


def test_the_sr_reaches_the_destination_and_the_webhook_gets_the_result(tmp_path: Path, routes: Path,
                                                                       receiver: StorageReceiver) -> None:
    webhook = WebhookReceiver()
    settings = tiny_settings(tmp_path / "data", dicom_routes_file=routes,
                             sr_destination=f"PACS@127.0.0.1:{receiver.server.server_address[1]}",
                             result_webhook_url=webhook.url)
    try:
        with running_app(settings) as client:
            study = pydicom.uid.generate_uid()
            stow_one(client, study)
            deliveries = deliveries_of(client, study, until="sent")
            assert {d["target"] for d in deliveries} == {"cstore", "webhook"}
            [sr] = receiver.received
            assert sr.StudyInstanceUID == study and sr.Modality == "SR"
            assert [d["sr_sop_instance_uid"] for d in deliveries if d["target"] == "cstore"] == [sr.SOPInstanceUID]
            [hook] = webhook.bodies
            assert hook["event"] == "result" and hook["result"]["study_instance_uid"] == study
            assert hook["result"]["predictions"][0]["label"] in {"normal", "pneumonia"}
            assert metric(client, "medzero_result_deliveries_total", target="cstore", outcome="sent") == 1
    finally:
        webhook.shutdown()


def test_an_unreachable_destination_ends_as_a_dead_letter_and_retry_sends_it(tmp_path: Path, routes: Path) -> None:
    port = free_port()                  # nothing listens here yet
    settings = tiny_settings(tmp_path / "data", dicom_routes_file=routes, sr_destination=f"PACS@127.0.0.1:{port}",
                             delivery_max_attempts=2, delivery_retry_seconds=0.05, dicom_network_timeout_seconds=2)
    with running_app(settings) as client:
        study = pydicom.uid.generate_uid()
        stow_one(client, study)
        [dead] = deliveries_of(client, study, until="dead_letter")
        assert dead["attempts"] == 2 and "PACS@127.0.0.1" in dead["last_error"]
        assert metric(client, "medzero_result_dead_letters", target="cstore") == 1
        assert metric(client, "medzero_result_deliveries_total", target="cstore", outcome="retry") == 1
        receiver = StorageReceiver(port)
        try:
            result_id = results_for(client, study, 1)[0]["id"]
            assert client.post(f"/results/{result_id}/retry").json() == {"retried": 1}
            [sent] = deliveries_of(client, study, until="sent")
            assert sent["last_error"] is None and len(receiver.received) == 1
            assert metric(client, "medzero_result_dead_letters", target="cstore") == 0
        finally:
            receiver.close()
        assert client.post("/results/999999/retry").status_code == 404


def test_backoff_doubles_up_to_an_hour() -> None:
    assert [backoff_seconds(5, n) for n in (1, 2, 3)] == [5, 10, 20]
    assert backoff_seconds(5, 40) == 3600


def test_no_patient_data_in_logs_or_metrics_along_the_whole_path(tmp_path: Path, routes: Path,
                                                                 receiver: StorageReceiver,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    settings = tiny_settings(tmp_path / "data", dicom_routes_file=routes, dicom_port=0,
                             sr_destination=f"PACS@127.0.0.1:{receiver.server.server_address[1]}")
    secrets = ("Doe^Secretname", "MRN-424242", "19450817")
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="app")
    with running_app(settings) as client:
        dataset = make_dicom_dataset(modality="DX", patient_name=secrets[0])
        dataset.PatientID, dataset.PatientBirthDate = secrets[1], secrets[2]
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(dataset.SOPClassUID, ExplicitVRLittleEndian)
        association = ae.associate("127.0.0.1", client.app.state.runtime.dicom_port, ae_title="MEDZERO")
        assert association.send_c_store(dataset).Status == 0
        association.release()
        unroutable = make_dicom_dataset(modality="US", patient_name=secrets[0])   # skipped: its reason too
        buffer = io.BytesIO()
        unroutable.save_as(buffer, enforce_file_format=True)
        body, headers = multipart([buffer.getvalue()])
        assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
        deliveries_of(client, str(dataset.StudyInstanceUID), until="sent")
        [sr] = receiver.received
        assert sr.PatientID == secrets[1]                       # the SR carries the patient, as it must
        said = "\n".join(record.getMessage() for record in caplog.records)
        exposed = (said + client.get("/metrics").text + client.get("/results").text
                   + client.get("/dicom/instances").text)
        assert "received" in said                              # the log was captured at all
        assert not [secret for secret in secrets if secret in exposed]


def test_an_implicit_only_pacs_gets_the_sr_and_urls_show_no_secrets(tmp_path: Path, routes: Path) -> None:
    implicit = AE(ae_title="OLDPACS")
    implicit.add_supported_context(Comprehensive3DSRStorage, ImplicitVRLittleEndian)
    got: list[pydicom.Dataset] = []
    port = free_port()
    server = implicit.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_C_STORE, lambda event: got.append(event.dataset) or 0)])
    webhook = WebhookReceiver()
    settings = tiny_settings(tmp_path / "data", dicom_routes_file=routes, sr_destination=f"OLDPACS@127.0.0.1:{port}",
                             result_webhook_url=f"{webhook.url}?token=s3cr3t")
    try:
        with running_app(settings) as client:
            study = pydicom.uid.generate_uid()
            stow_one(client, study)
            deliveries = deliveries_of(client, study, until="sent")
            assert len(got) == 1 and got[0].StudyInstanceUID == study
            assert "s3cr3t" not in client.get("/results").text
            assert {d["destination"] for d in deliveries} == {f"OLDPACS@127.0.0.1:{port}", webhook.url}
    finally:
        server.shutdown()
        webhook.shutdown()
