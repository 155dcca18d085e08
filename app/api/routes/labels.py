"""/labels: label sets managed at run time. Writes need the admin key when MEDZERO_ADMIN_API_KEY is set. Sync
handlers: FastAPI runs them on its thread pool, from where text embeddings are handed to the encoder thread."""
from fastapi import APIRouter, status

from app.api.deps import BODY_ERRORS, AdminDep, RuntimeDep
from app.api.schemas import ErrorBody, LabelSetCreate, LabelSetPublic, LabelSetsPublic

router = APIRouter(prefix="/labels", tags=["labels"])
NOT_FOUND = {404: {"model": ErrorBody, "description": "No label set of that name."}}
WRITE_ERRORS = {401: {"model": ErrorBody, "description": "MEDZERO_ADMIN_API_KEY is set and X-API-Key is not it."},
                422: {"model": ErrorBody, "description": "Invalid, or over MEDZERO_MAX_LABEL_SET_TEXTS."},
                503: {"model": ErrorBody, "description": "Model still loading, or the store is busy."}}


@router.get("")
def list_label_sets(runtime: RuntimeDep) -> LabelSetsPublic:
    """Every registered label set, built-in ones included."""
    label_sets = runtime.repository.list()
    return LabelSetsPublic(data=[LabelSetPublic.from_domain(ls) for ls in label_sets], count=len(label_sets))


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[AdminDep],
             responses={409: {"model": ErrorBody, "description": "The name is taken."}, **BODY_ERRORS,
                        **WRITE_ERRORS})
def create_label_set(body: LabelSetCreate, runtime: RuntimeDep) -> LabelSetPublic:
    """Register a label set; its class text embeddings are computed now and cached under the model id."""
    return LabelSetPublic.from_domain(runtime.label_sets.create(body))


@router.get("/{name}", responses=NOT_FOUND)
def get_label_set(name: str, runtime: RuntimeDep) -> LabelSetPublic:
    return LabelSetPublic.from_domain(runtime.repository.get(name))


@router.put("/{name}", dependencies=[AdminDep], responses={**NOT_FOUND, **BODY_ERRORS, **WRITE_ERRORS})
def replace_label_set(name: str, body: LabelSetCreate, runtime: RuntimeDep) -> LabelSetPublic:
    """Replace a label set with a new version (embeddings recomputed; the old version stays until this commits)."""
    return LabelSetPublic.from_domain(runtime.label_sets.replace(name, body))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[AdminDep],
               responses={**NOT_FOUND, **WRITE_ERRORS})
def delete_label_set(name: str, runtime: RuntimeDep) -> None:
    """Delete a label set, its cached embeddings, learned method state (KPL fits) and indexed descriptions."""
    if runtime.ready:
        runtime.label_sets.delete(name)
    else:   # the model is still loading: the store alone; the description index catches up at start-up
        runtime.repository.delete(name)
