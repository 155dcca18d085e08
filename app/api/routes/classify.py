"""/classify and /classify/batch. Parameters may come as form fields or as query parameters."""
import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile

from app.api.deps import RuntimeDep, read_bounded
from app import metrics
from app.api.schemas import (BatchItem, BatchResult, ClassifyResult, ErrorBody, ErrorDetail, EvidenceDescription,
                             EvidencePublic, PredictionPublic)
from app.methods.base import ClassEvidence
from app.errors import InvalidInput, MedzeroError, PayloadTooLarge
from app.services.classify import Classification

router = APIRouter(prefix="/classify", tags=["classify"])
ERRORS = {code: {"model": ErrorBody} for code in (404, 413, 415, 422, 503)}


class ClassifyParams:
    """label_set, method and top_k from the form or the query string (the form wins)."""

    def __init__(self,
                 label_set_form: Annotated[str | None, Form(alias="label_set")] = None,
                 method_form: Annotated[str | None, Form(alias="method")] = None,
                 top_k_form: Annotated[int | None, Form(alias="top_k", ge=1)] = None,
                 label_set: Annotated[str | None, Query(description="Name of a registered label set.")] = None,
                 method: Annotated[str | None, Query(description="zeroshot (default) or kpl.")] = None,
                 top_k: Annotated[int | None, Query(ge=1, description="How many predictions; default all.")] = None,
                 transductive_form: Annotated[bool | None, Form(alias="transductive")] = None,
                 transductive: Annotated[bool | None, Query(
                     description="/classify/batch with method=kpl: fit proxies on the batch's own images.")] = None,
                 ) -> None:
        self.label_set = label_set_form or label_set
        if not self.label_set:
            raise InvalidInput("label_set is required (a form field or query parameter); GET /labels lists them")
        self.method = method_form or method or "zeroshot"
        self.top_k = top_k_form or top_k
        self.transductive = bool(transductive_form if transductive_form is not None else transductive)


Params = Annotated[ClassifyParams, Depends()]


@router.post("", responses=ERRORS)
async def classify_image(file: Annotated[UploadFile, File(description="PNG, JPEG, TIFF or DICOM.")],
                         params: Params, runtime: RuntimeDep) -> ClassifyResult:
    """Classify one image against a registered label set. The type is detected from the content."""
    classifier = runtime.classifier
    if params.transductive:
        raise InvalidInput("transductive needs several images: use /classify/batch")
    data = await read_bounded(file, runtime.settings.max_upload_bytes)
    outcome = await classifier.classify(data, label_set=params.label_set, method=params.method, top_k=params.top_k)
    return to_result(outcome)


@router.post("/batch", responses=ERRORS)
async def classify_batch(files: Annotated[list[UploadFile], File(description="Several images.")],
                         params: Params, runtime: RuntimeDep) -> BatchResult:
    """Classify several images in one request; each file gets its own result or its own error."""
    started = time.perf_counter()
    classifier = runtime.classifier
    settings = runtime.settings
    if len(files) > settings.max_batch_files:
        raise PayloadTooLarge(f"{len(files)} files in one batch; MEDZERO_MAX_BATCH_FILES={settings.max_batch_files}")
    payloads: list[bytes | MedzeroError] = []
    for upload in files:
        try:
            payloads.append(await read_bounded(upload, settings.max_upload_bytes))
        except PayloadTooLarge as exc:
            payloads.append(exc)
    readable = [p for p in payloads if isinstance(p, bytes)]
    outcomes = iter(await classifier.classify_batch(readable, label_set=params.label_set, method=params.method,
                                                    top_k=params.top_k, transductive=params.transductive))
    items = []
    for upload, payload in zip(files, payloads):
        outcome = next(outcomes) if isinstance(payload, bytes) else payload
        items.append(BatchItem(filename=upload.filename, error=ErrorDetail(code=outcome.code, message=str(outcome)))
                     if isinstance(outcome, MedzeroError) else BatchItem(filename=upload.filename,
                                                                         result=to_result(outcome)))
    failed = sum(item.error is not None for item in items)
    for item in items:
        if item.error is not None:
            metrics.ERRORS.labels(code=item.error.code).inc()
    return BatchResult(label_set=params.label_set, method=params.method, transductive=params.transductive,
                       results=items,
                       succeeded=len(items) - failed, failed=failed,
                       elapsed_ms=round((time.perf_counter() - started) * 1000, 3))


def to_result(outcome: Classification) -> ClassifyResult:
    return ClassifyResult(
        label_set=outcome.label_set, label_set_version=outcome.label_set_version, model=outcome.model_id,
        method=outcome.method, input_format=outcome.input_format, elapsed_ms=outcome.elapsed_ms,
        method_details=outcome.details or None,
        predictions=[PredictionPublic(label=p.label, probability=p.probability, similarity=p.similarity,
                                      evidence=to_evidence(p.evidence)) for p in outcome.predictions])


def to_evidence(evidence: ClassEvidence | None) -> EvidencePublic | None:
    if evidence is None:
        return None
    return EvidencePublic(proxy=evidence.proxy, descriptions=[
        EvidenceDescription(text=d.text, source=d.source, similarity=d.similarity) for d in evidence.descriptions])
