"""Sending a DICOM instance out: C-STORE to an AE (pynetdicom SCU) or STOW-RS to a DICOMweb server (httpx).

Both raise DeliveryFailed with what the peer said (association rejected, a failure status, an HTTP status and
the response's FailedSOPSequence); the delivery service decides whether to retry.
"""
import io
import uuid
from dataclasses import dataclass

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from app.errors import DeliveryFailed

# C-STORE statuses a receiver stores the instance under: success and the warnings (coercion, elements discarded)
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
FAILED_SOP_SEQUENCE = "00081198"


@dataclass(frozen=True)
class AEAddress:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, address: str) -> "AEAddress":
        """AET@host:port (what MEDZERO_SR_DESTINATION holds)."""
        ae_title, _, location = address.partition("@")
        host, _, port = location.rpartition(":")
        if not (ae_title and host and port.isdigit()):
            raise ValueError(f"{address!r} is not AET@host:port")
        return cls(ae_title, host, int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def part10_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def send_cstore(dataset: Dataset, destination: AEAddress, *, calling_ae_title: str, timeout_seconds: float) -> None:
    """One association, one C-STORE, released; blocking (run it in a thread)."""
    ae = AE(ae_title=calling_ae_title)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = ae.connection_timeout = timeout_seconds
    file_meta = getattr(dataset, "file_meta", None)
    transfer_syntax = file_meta.TransferSyntaxUID if file_meta and "TransferSyntaxUID" in file_meta \
        else ExplicitVRLittleEndian
    ae.add_requested_context(dataset.SOPClassUID, transfer_syntax)
    association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not association.is_established:
        reason = "rejected" if association.is_rejected else "aborted" if association.is_aborted else "not established"
        raise DeliveryFailed(f"association with {destination} {reason}")
    try:
        status = association.send_c_store(dataset)
    finally:
        association.release()
    if not status or "Status" not in status:
        raise DeliveryFailed(f"{destination} did not answer the C-STORE (timeout or aborted association)")
    if status.Status not in STORED_STATUSES:
        comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
        raise DeliveryFailed(f"{destination} answered C-STORE status 0x{status.Status:04X}{comment}")


async def send_stow(client: httpx.AsyncClient, base_url: str, dataset: Dataset) -> None:
    """STOW-RS of one instance into its study (PS3.18 §10.5): POST <base>/studies/<study>."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part10_bytes(dataset)
            + f"\r\n--{boundary}--\r\n".encode())
    url = f"{base_url.rstrip('/')}/studies/{dataset.StudyInstanceUID}"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    try:
        response = await client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise DeliveryFailed(f"STOW-RS to {url} failed: {type(exc).__name__}: {exc}") from exc
    failed = _failed_instances(response)
    if response.status_code >= 300 or failed:
        raise DeliveryFailed(f"STOW-RS to {url} answered {response.status_code}"
                             + (f" with {failed} failed instance(s)" if failed else ""))


def _failed_instances(response: httpx.Response) -> int:
    try:
        document = response.json()
    except ValueError:
        return 0
    if not isinstance(document, dict):
        return 0
    return len(document.get(FAILED_SOP_SEQUENCE, {}).get("Value", []) or [])


def read_source(data: bytes) -> Dataset:
    """A received instance without its pixel data: what the SR needs of it (patient, study, references)."""
    return dcmread(io.BytesIO(data), stop_before_pixels=True)
