"""Liveness, readiness and Prometheus metrics."""
from dataclasses import asdict

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import RuntimeDep
from app.api.schemas import Health, Readiness
from app.encoders.engines import ImageEngine

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Health:
    """The process is alive and serving HTTP (the model may still be loading)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """200 once the model is loaded and warm; 503 while loading, after a failed start, or while stopping."""
    if not runtime.ready:
        body = Readiness(status=runtime.state, detail=runtime.failure)
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    encoder, classifier = runtime.encoder, runtime.classifier
    return JSONResponse(Readiness(status="ready", model=encoder.model_id, device=str(encoder.device),
                                  pretrained_weights=encoder.has_pretrained_weights,
                                  methods=classifier.method_names,
                                  transductive_methods=classifier.transductive_method_names,
                                  engine=engine_public(encoder.image_engine, runtime.max_batch_size),
                                  startup_seconds=runtime.startup_seconds).model_dump())


def engine_public(engine: ImageEngine | None, max_batch_size: int | None) -> dict | None:
    if engine is None:
        return None
    return {"engine": engine.choice.engine, "precision": engine.choice.precision, "reason": engine.reason,
            "max_batch_size": max_batch_size,
            "setup_seconds": round(engine.seconds, 2), "probe": [asdict(result) for result in engine.probe]}


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
