"""/adapters: trained bundles (`medzero train meduna`, `medzero train hica`), loaded as method state (admin
writes)."""
from typing import Annotated

from fastapi import APIRouter, File, UploadFile, status
from starlette.concurrency import run_in_threadpool

from app.api.deps import BODY_ERRORS, AdminDep, RuntimeDep
from app.api.schemas import AdapterPublic, AdaptersPublic, ErrorBody
from app.errors import InvalidAdapter
from app.methods.bundle import Adapter
from app.services.uploads import read_bounded

router = APIRouter(prefix="/adapters", tags=["adapters"])
ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 503)}


@router.post("", status_code=status.HTTP_201_CREATED, responses={**ERRORS, **BODY_ERRORS}, dependencies=[AdminDep])
async def upload_adapter(files: Annotated[list[UploadFile], File(
        description="adapter.safetensors and manifest.json, or one .tar.gz / .zip holding them.")],
                         runtime: RuntimeDep) -> AdapterPublic:
    """Check a bundle against the loaded model, the label set's current version and class order and the
    description corpus, then make it the label set's adapter of its method (replacing the previous one); refused bundles change
    nothing (409 for a bundle made for something else, 422 for one that is not a bundle)."""
    if len(files) > 2:
        raise InvalidAdapter(f"{len(files)} files; a bundle is adapter.safetensors + manifest.json, or one archive")
    limit = runtime.settings.max_upload_bytes
    bundle = {upload.filename or "(unnamed)": await read_bounded(upload, upload.filename or "(unnamed)", limit)
              for upload in files}
    return to_public(await run_in_threadpool(runtime.adapters.install, bundle))


@router.get("", responses=ERRORS)
async def list_adapters(runtime: RuntimeDep) -> AdaptersPublic:
    """The adapter of every label set and method that has one, under the loaded model."""
    adapters = await run_in_threadpool(runtime.adapters.list_loaded)
    return AdaptersPublic(data=[to_public(a) for a in adapters], count=len(adapters))


@router.get("/{adapter_id}", responses=ERRORS)
async def get_adapter(adapter_id: str, runtime: RuntimeDep) -> AdapterPublic:
    return to_public(await run_in_threadpool(runtime.adapters.get, adapter_id))


@router.delete("/{adapter_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS, dependencies=[AdminDep])
async def delete_adapter(adapter_id: str, runtime: RuntimeDep) -> None:
    """Unload the adapter (method=meduna answers 409 for its label set until another is loaded). A bundle still
    under MEDZERO_ADAPTERS_DIR comes back at the next start."""
    await run_in_threadpool(runtime.adapters.delete, adapter_id)


def to_public(adapter: Adapter) -> AdapterPublic:
    manifest = adapter.manifest
    prompts = getattr(adapter, "prompt_tokens", None)
    tuned = getattr(adapter, "tower_variant", None)
    return AdapterPublic(id=adapter.adapter_id, method=manifest.get("method", "meduna"), label_set=adapter.label_set,
                         label_set_version=adapter.label_set_version, model=adapter.model_id,
                         class_names=list(adapter.class_names),
                         prompt_tokens=None if prompts is None else int(prompts.shape[0]),
                         tuned_weights=sorted(getattr(tuned, "weights", {})) or None,
                         version=adapter.version, created_at=adapter.created_at,
                         metrics=manifest.get("metrics", {}), config=manifest.get("config", {}))
