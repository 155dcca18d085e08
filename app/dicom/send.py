"""Sending a DICOM instance out: C-STORE to an AE (pynetdicom SCU) or STOW-RS to a DICOMweb server (httpx).

Both raise DeliveryFailed with what the peer said (association rejected, a failure status, an HTTP status and
the response's FailedSOPSequence); the delivery service decides whether to retry.
"""
import io
import uuid
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
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
        return cls(ae_title, host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}"


def redacted(destination: str) -> str:
    """A destination fit for logs and /results: a URL without credentials, query or fragment (webhook tokens)."""
    if "://" not in destination:
        return destination                  # AET@host:port
    parts = urlsplit(destination)
    host = parts.hostname or ""
    netloc = f"{'[' + host + ']' if ':' in host else host}{f':{parts.port}' if parts.port else ''}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def part10_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def send_cstore(dataset: Dataset, destination: AEAddress, *, calling_ae_title: str, timeout_seconds: float) -> None:
    """One association, one C-STORE, released; blocking (run it in a thread). Explicit and implicit VR little
    endian are proposed (every SCP takes implicit); pynetdicom encodes the SR in whichever is accepted."""
    ae = AE(ae_title=calling_ae_title)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = ae.connection_timeout = timeout_seconds
    ae.add_requested_context(dataset.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
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
    if status.Status not in STORED_STATUSES:   # the peer's ErrorComment is free text (it may name the patient)
        raise DeliveryFailed(f"{destination} answered C-STORE status 0x{status.Status:04X}")


async def send_stow(client: httpx.AsyncClient, base_url: str, dataset: Dataset) -> None:
    """STOW-RS of one instance into its study (PS3.18 §10.5): POST <base>/studies/<study>."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part10_bytes(dataset)
            + f"\r\n--{boundary}--\r\n".encode())
    url = f"{base_url.rstrip('/')}/studies/{quote(str(dataset.StudyInstanceUID), safe='')}"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    try:
        response = await client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise DeliveryFailed(f"STOW-RS to {redacted(url)} failed: {type(exc).__name__}") from exc
    failed = _failed_instances(response)
    if response.status_code >= 300 or failed:
        raise DeliveryFailed(f"STOW-RS to {redacted(url)} answered {response.status_code}"
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
