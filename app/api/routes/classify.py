"""/classify and /classify/batch. Parameters may come as form fields or as query parameters."""
import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, UploadFile

from app import metrics
from app.api.deps import BODY_ERRORS, RuntimeDep
from app.api.schemas import (
    BatchItem,
    BatchResult,
    ClassifyParams,
    ClassifyResult,
    ErrorBody,
    ErrorDetail,
    EvidenceDescription,
    EvidencePublic,
    PredictionPublic,
)
from app.errors import InvalidInput, MedzeroError, PayloadTooLarge
from app.methods.base import ClassEvidence
from app.services.classify import UNCERTAIN, Classification
from app.services.uploads import uploaded

router = APIRouter(prefix="/classify", tags=["classify"])
ERRORS = {**{code: {"model": ErrorBody} for code in (404, 409, 415, 422, 503)}, **BODY_ERRORS}
Params = Annotated[ClassifyParams, Depends()]


@router.post("", responses=ERRORS)
async def classify_image(file: Annotated[UploadFile, File(description="PNG, JPEG, TIFF or DICOM.")],
                         params: Params, runtime: RuntimeDep) -> ClassifyResult:
    """Classify one image against a registered label set. The type is detected from the content."""
    classifier = runtime.classifier
    if params.transductive:
        raise InvalidInput("transductive needs several images: use /classify/batch")
    outcome = await classifier.classify(uploaded(file, file.filename, runtime.settings.max_upload_bytes),
                                        label_set=params.label_set, method=params.method, top_k=params.top_k,
                                        abstain_threshold=params.abstain_threshold, options=params.method_options)
    return to_result(outcome)


@router.post("/batch", responses=ERRORS)
async def classify_batch(files: Annotated[list[UploadFile], File(description="Several images.")],
                         params: Params, runtime: RuntimeDep) -> BatchResult:
    """Classify several images in one request; each file gets its own result or its own error (a transductive
    batch is refused whole when any file cannot be used)."""
    started = time.perf_counter()
    classifier = runtime.classifier
    settings = runtime.settings
    if len(files) > settings.max_batch_files:
        raise PayloadTooLarge(f"{len(files)} files in one batch; MEDZERO_MAX_BATCH_FILES={settings.max_batch_files}")
    outcomes = await classifier.classify_batch(
        [uploaded(upload, upload.filename, settings.max_upload_bytes) for upload in files],
        label_set=params.label_set, method=params.method, top_k=params.top_k, transductive=params.transductive,
        abstain_threshold=params.abstain_threshold, options=params.method_options)
    items = []
    for upload, outcome in zip(files, outcomes):
        if isinstance(outcome, MedzeroError):
            metrics.ERRORS.labels(code=outcome.code).inc()
            error = ErrorDetail(code=outcome.code, message=str(outcome))
            items.append(BatchItem(filename=upload.filename, error=error))
        else:
            items.append(BatchItem(filename=upload.filename, result=to_result(outcome)))
    failed = sum(item.error is not None for item in items)
    return BatchResult(label_set=params.label_set, method=params.method, transductive=params.transductive,
                       results=items, succeeded=len(items) - failed, failed=failed,
                       elapsed_ms=round((time.perf_counter() - started) * 1000, 3))


def to_result(outcome: Classification) -> ClassifyResult:
    decision, calibration = outcome.decision, outcome.calibration
    return ClassifyResult(
        label_set=outcome.label_set, label_set_version=outcome.label_set_version, model=outcome.model_id,
        method=outcome.method, input_format=outcome.input_format, elapsed_ms=outcome.elapsed_ms,
        decision=UNCERTAIN if decision.label is None else decision.label, abstained=decision.label is None,
        decision_rule=decision.rule, abstain_threshold=decision.abstain_threshold,
        calibrated=calibration is not None, temperature=calibration.temperature if calibration else None,
        prediction_set=outcome.prediction_set, prediction_set_coverage=calibration.coverage if calibration else None,
        method_details=outcome.details or None,
        predictions=[PredictionPublic(label=p.label, probability=p.probability, similarity=p.similarity,
                                      evidence=to_evidence(p.evidence)) for p in outcome.predictions])


def to_evidence(evidence: ClassEvidence | None) -> EvidencePublic | None:
    if evidence is None:
        return None
    return EvidencePublic(proxy=evidence.proxy, descriptions=[
        EvidenceDescription(text=d.text, source=d.source, similarity=d.similarity) for d in evidence.descriptions])
