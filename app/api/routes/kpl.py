"""/labels/{name}/kpl: fit KPL proxies for a label set on a pool of unlabelled images (admin), show, delete.
/kb: what the description index holds."""
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status
from starlette.concurrency import run_in_threadpool

from app.api.deps import BODY_ERRORS, AdminDep, RuntimeDep
from app.api.schemas import BatchItem, ErrorBody, ErrorDetail, EvidenceDescription, KPLFitPublic, parse_class_prior
from app.errors import InvalidInput
from app.methods.kpl import KPLFit
from app.services.kpl_fits import FitReport
from app.services.uploads import uploaded

router = APIRouter(tags=["kpl"])
ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 413, 422, 503)}


@router.post("/labels/{name}/kpl", status_code=status.HTTP_201_CREATED, responses={**ERRORS, **BODY_ERRORS},
              dependencies=[AdminDep])
async def fit_kpl(name: str, runtime: RuntimeDep,
                  # a plain file array in the schema (not anyOf null), so clients send its items as files
                  files: Annotated[list[UploadFile], File(default_factory=list, description="Unlabelled pool images.")],
                  folder: Annotated[str | None, Form(description="A folder under MEDZERO_KPL_POOL_ROOT.")] = None,
                  class_prior: Annotated[str | None, Form(
                      description='Expected class shares as JSON, e.g. {"normal": 0.7, "pneumonia": 0.3}; '
                                  'uniform when absent.')] = None,
                  ) -> KPLFitPublic:
    """Fit KPL text and vision proxies on a pool of unlabelled images (uploads, or a server-side folder) and
    store them as the label set's current fit under the loaded model. Files that cannot be used are skipped
    and listed."""
    service = runtime.kpl_fits
    if bool(files) == bool(folder):
        raise InvalidInput("send the pool as `files` (multipart) or name a server-side `folder`, not both")
    prior = parse_class_prior(class_prior) if class_prior else None
    pool = (await run_in_threadpool(service.pool_folder_files, folder) if folder else
            [uploaded(upload, upload.filename, runtime.settings.max_upload_bytes) for upload in files])
    return to_public(await service.fit(name, pool, class_prior=prior))


@router.get("/labels/{name}/kpl", responses=ERRORS)
async def get_kpl_fit(name: str, runtime: RuntimeDep) -> KPLFitPublic:
    """The current KPL fit of this label set's current version under the loaded model."""
    return to_public(FitReport(await runtime.kpl_fits.current(name), []))


@router.delete("/labels/{name}/kpl", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS,
               dependencies=[AdminDep])
async def delete_kpl_fit(name: str, runtime: RuntimeDep) -> None:
    """Remove every KPL fit of this label set under the loaded model (classification falls back to per-image)."""
    await runtime.kpl_fits.delete(name)


@router.get("/kb", tags=["knowledge"])
def knowledge_base_status(runtime: RuntimeDep) -> dict:
    """The description index of the loaded model: model id, corpus hash, count, dimension, build time."""
    manifest = runtime.knowledge.manifest
    return {key: manifest.get(key) for key in ("model_id", "corpus_hash", "count", "dim", "built_at", "prompt")}


def to_public(report: FitReport) -> KPLFitPublic:
    fit: KPLFit = report.fit
    return KPLFitPublic(
        label_set=fit.label_set, label_set_version=fit.label_set_version, model=fit.model_id,
        fit_version=fit.version, pool_size=fit.pool_size, class_balance=fit.class_balance,
        fit_seconds=fit.fit_seconds, created_at=fit.created_at, config=fit.config,
        evidence={name: [EvidenceDescription(text=e.text, source=e.source, similarity=e.score) for e in entries]
                  for name, entries in zip(fit.class_names, fit.evidence)},
        skipped=[BatchItem(filename=filename, error=ErrorDetail(code=exc.code, message=str(exc)))
                 for filename, exc in report.skipped])
