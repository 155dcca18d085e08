"""What became of received DICOM instances: their results (with the SR / webhook deliveries), the instances
themselves (skipped and failed ones with their reason), and a retry of a result's dead-letter deliveries."""
from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from app.api.deps import AdminDep, RuntimeDep
from app.api.schemas import (
    DeliveryPublic,
    ErrorBody,
    InstancePublic,
    InstancesPublic,
    ResultPublic,
    ResultsPublic,
    RetryPublic,
)
from app.dicom.send import redacted
from app.errors import ResultNotFound
from app.storage.deliveries import DeliveryRecord
from app.storage.inbox import STATES, InboxEntry, ResultRecord

router = APIRouter(tags=["dicom"])
ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 503)}
Limit = Annotated[int, Query(ge=1, le=1000)]
ResultId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.get("/results", responses=ERRORS)
async def list_results(runtime: RuntimeDep, study: str | None = None, limit: Limit = 100) -> ResultsPublic:
    """Classification results of received instances, newest first; `study` filters by StudyInstanceUID."""
    records = await run_in_threadpool(runtime.inbox.results, study_instance_uid=study, limit=limit)
    return ResultsPublic(data=[to_public(r) for r in records], count=len(records))


@router.get("/results/{result_id}", responses=ERRORS)
async def get_result(result_id: ResultId, runtime: RuntimeDep) -> ResultPublic:
    record = await run_in_threadpool(runtime.inbox.result, result_id)
    if record is None:
        raise ResultNotFound(f"no result {result_id}")
    return to_public(record)


@router.post("/results/{result_id}/retry", dependencies=[AdminDep], responses=ERRORS)
async def retry_result(result_id: ResultId, runtime: RuntimeDep) -> RetryPublic:
    """Send a result's dead-letter deliveries again (after fixing the destination, say)."""
    return RetryPublic(retried=await run_in_threadpool(runtime.deliveries.retry, result_id))


@router.get("/dicom/instances", responses=ERRORS)
async def list_instances(runtime: RuntimeDep, study: str | None = None,
                         state: Annotated[str | None, Query(pattern="^(" + "|".join(STATES) + ")$")] = None,
                         limit: Limit = 100) -> InstancesPublic:
    """Received instances, newest first; skipped and failed ones carry the reason."""
    entries = await run_in_threadpool(runtime.inbox.entries, study_instance_uid=study, state=state, limit=limit)
    return InstancesPublic(data=[instance_public(e) for e in entries], count=len(entries))


def to_public(record: ResultRecord) -> ResultPublic:
    return ResultPublic(**record.document(), deliveries=[delivery_public(d) for d in record.deliveries])


def delivery_public(delivery: DeliveryRecord) -> DeliveryPublic:
    due = delivery.due_at if delivery.state == "pending" else None
    return DeliveryPublic(target=delivery.target, destination=redacted(delivery.destination), state=delivery.state,
                          attempts=delivery.attempts, last_error=delivery.last_error, next_attempt_at=due,
                          sent_at=delivery.sent_at, sr_sop_instance_uid=delivery.sr_sop_instance_uid)


def instance_public(entry: InboxEntry) -> InstancePublic:
    return InstancePublic(sop_instance_uid=entry.sop_instance_uid, study_instance_uid=entry.study_instance_uid,
                          series_instance_uid=entry.series_instance_uid, sop_class_uid=entry.sop_class_uid,
                          source=entry.source, label_set=entry.label_set, method=entry.method, state=entry.state,
                          reason=entry.reason, attempts=entry.attempts, received_at=entry.created_at)
