"""DICOMweb STOW-RS (`POST /dicomweb/studies[/{study}]`, multipart/related of application/dicom parts) into the
durable inbox, answered with the standard response dataset (application/dicom+json)."""
from email.parser import BytesParser
from email.policy import HTTP

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool

from app.api.deps import RuntimeDep
from app.api.schemas import ErrorBody
from app.errors import InvalidInput, MedzeroError, PayloadTooLarge, UnsupportedMediaType
from app.services.ingest import Receipt

router = APIRouter(tags=["dicom"])


class DicomJSONResponse(JSONResponse):
    media_type = "application/dicom+json"


# what the answer is, documented by hand: `response_class=Response` keeps FastAPI from also listing application/json
# for 200 (the errors still are application/json, the one error shape)
RESPONSE_DATASET = {"application/dicom+json": {"schema": {"type": "object", "description": "PS3.18 response "
                                                          "dataset: ReferencedSOPSequence, FailedSOPSequence."}}}
RESPONSES = {200: {"description": "Every instance stored (ReferencedSOPSequence).", "content": RESPONSE_DATASET},
             202: {"description": "Some instances stored, some failed (FailedSOPSequence, Warning headers).",
                   "content": RESPONSE_DATASET},
             409: {"description": "No instance stored (FailedSOPSequence, Warning headers).",
                   "content": RESPONSE_DATASET},
             **{code: {"model": ErrorBody} for code in (400, 404, 408, 413, 415, 422, 503)}}
# the body is read raw, so FastAPI cannot describe it by itself
STOW_BODY = {"requestBody": {"required": True, "content": {"multipart/related": {"schema": {
    "type": "string", "format": "binary",
    "description": 'Parts of type application/dicom; Content-Type: multipart/related; type="application/dicom"; '
                   "boundary=..."}}}}}
# PS3.4 / PS3.18 failure reasons in FailedSOPSequence
CANNOT_UNDERSTAND, NOT_THIS_STUDY, PROCESSING_FAILURE, SOP_CLASS_NOT_SUPPORTED = 0xC000, 0xA900, 0x0110, 0x0122
MAX_WARNINGS = 20                        # Warning headers naming why instances failed (PS3.18 §8.6.2: code 299)


@router.post("/dicomweb/studies", responses=RESPONSES, response_class=Response, openapi_extra=STOW_BODY)
async def store_instances(request: Request, runtime: RuntimeDep) -> JSONResponse:
    """STOW-RS: store instances for classification (routed by MEDZERO_DICOM_ROUTES_FILE)."""
    return await _store(request, runtime, None)


@router.post("/dicomweb/studies/{study}", responses=RESPONSES, response_class=Response, openapi_extra=STOW_BODY)
async def store_study_instances(study: str, request: Request, runtime: RuntimeDep) -> JSONResponse:
    """STOW-RS into one study: instances of another study are refused (FailedSOPSequence)."""
    return await _store(request, runtime, study)


async def _store(request: Request, runtime: RuntimeDep, study: str | None) -> JSONResponse:
    ingest, limit = runtime.ingest, runtime.settings.max_upload_bytes
    # parsing a large body takes seconds: off the event loop, which serves every other request meanwhile
    parts = await run_in_threadpool(dicom_parts, request.headers.get("content-type", ""), await request.body())
    stored, failed = [], []
    for data in parts:
        try:
            if len(data) > limit:          # the SCP's limit too: one instance, not the whole request
                raise PayloadTooLarge(f"an instance of {len(data)} bytes is over MEDZERO_MAX_UPLOAD_BYTES={limit}")
            receipt: Receipt = await run_in_threadpool(ingest.receive, data, "stow-rs", study)
            stored.append(receipt)
        except MedzeroError as exc:
            if exc.status_code == 503:
                raise                            # the store is busy: the whole request is retried
            failed.append((data, exc))
    response = Dataset()
    response.ReferencedSOPSequence = [_referenced(r.entry.sop_class_uid, r.entry.sop_instance_uid) for r in stored]
    response.FailedSOPSequence = [_failed(data, exc) for data, exc in failed]
    status = 200 if not failed else 202 if stored else 409
    warnings = [f'299 medzero "{_header_text(str(exc))}"' for _, exc in failed[:MAX_WARNINGS]]
    return DicomJSONResponse(response.to_json_dict(), status_code=status,
                             headers={"Warning": ", ".join(warnings)} if warnings else None)


def dicom_parts(content_type: str, body: bytes) -> list[bytes]:
    """The application/dicom parts of a multipart/related body (PS3.18 §10.5)."""
    if not content_type.lower().startswith("multipart/related"):
        raise UnsupportedMediaType(f"STOW-RS takes multipart/related; type=\"application/dicom\", not "
                                   f"{content_type.split(';')[0] or 'no content type'}")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                                  + body)
    if not message.is_multipart():
        raise InvalidInput("the multipart/related body has no parts (check the boundary)")
    parts = [part.get_payload(decode=True) for part in message.iter_parts()
             if part.get_content_type() == "application/dicom"]
    if not parts:
        raise UnsupportedMediaType("no application/dicom part in the request (application/dicom+json and bulk data "
                                   "are not accepted)")
    return parts


def _referenced(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class_uid, sop_instance_uid
    return item


def _failed(data: bytes, exc: MedzeroError) -> Dataset:
    item = Dataset()
    uids = getattr(exc, "uids", None)
    if uids:
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = uids
    item.FailureReason = {"wrong_study": NOT_THIS_STUDY, "unsupported_sop_class": SOP_CLASS_NOT_SUPPORTED}.get(
        exc.code, CANNOT_UNDERSTAND if exc.status_code < 500 else PROCESSING_FAILURE)
    return item


def _header_text(reason: str) -> str:
    """A reason as a quoted-string header value: printable ASCII, no quotes or backslashes."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in reason)[:300]
