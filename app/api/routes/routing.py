"""The DICOM routing table: read it, or replace it as a whole (admin). Stored in the database, so a change
survives restarts; MEDZERO_DICOM_ROUTES_FILE is imported again only when its content changes."""
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import BODY_ERRORS, AdminDep, RuntimeDep
from app.api.schemas import ErrorBody, RoutesPublic, RoutesUpdate
from app.dicom.routing import RoutingTable
from app.errors import UnknownMethod
from app.services.routing import RoutingService

router = APIRouter(prefix="/routes", tags=["dicom"])
ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409, 422, 503)}


@router.get("", responses=ERRORS)
async def get_routes(runtime: RuntimeDep) -> RoutesPublic:
    await run_in_threadpool(runtime.routing.refresh)      # another replica may have replaced it
    return routes_public(runtime.routing)


@router.put("", dependencies=[AdminDep], responses={**ERRORS, **BODY_ERRORS})
async def put_routes(update: RoutesUpdate, runtime: RuntimeDep) -> RoutesPublic:
    """Replace the rules; instances received from now on are routed by them (queued ones keep their route)."""
    routing, label_sets, methods = runtime.routing, runtime.label_sets, runtime.classifier.method_names
    for rule in update.rules:
        await run_in_threadpool(label_sets.get, rule.label_set)     # LabelSetNotFound (404) names it
        if rule.method not in methods:
            raise UnknownMethod(f"rule {rule.name!r}: method {rule.method!r} is not one of {', '.join(methods)}")
    await run_in_threadpool(routing.replace, RoutingTable(rules=update.rules), update.version)
    return routes_public(routing)


def routes_public(routing: RoutingService) -> RoutesPublic:
    stored = routing.stored
    return RoutesPublic(version=stored.version if stored else 0, source=stored.source if stored else None,
                        routes_file=str(routing.routes_file) if routing.routes_file else None,
                        updated_at=stored.updated_at if stored else None, rules=routing.table.rules)
