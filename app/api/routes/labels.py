"""/labels: label sets managed at run time. Sync handlers: FastAPI runs them on its thread pool, which is
where the text encoder and the store belong."""
from fastapi import APIRouter, status

from app.api.deps import RuntimeDep
from app.api.schemas import ErrorBody, LabelSetCreate, LabelSetPublic, LabelSetsPublic

router = APIRouter(prefix="/labels", tags=["labels"])
NOT_FOUND = {404: {"model": ErrorBody, "description": "No label set of that name."}}


@router.get("")
def list_label_sets(runtime: RuntimeDep) -> LabelSetsPublic:
    """Every registered label set, built-in ones included."""
    label_sets = runtime.repository.list()
    return LabelSetsPublic(data=[LabelSetPublic.from_domain(ls) for ls in label_sets], count=len(label_sets))


@router.post("", status_code=status.HTTP_201_CREATED,
             responses={409: {"model": ErrorBody, "description": "The name is taken."},
                        503: {"model": ErrorBody, "description": "Model still loading."}})
def create_label_set(body: LabelSetCreate, runtime: RuntimeDep) -> LabelSetPublic:
    """Register a label set; its class text embeddings are computed now and cached under the model id."""
    return LabelSetPublic.from_domain(runtime.label_sets.create(body))


@router.get("/{name}", responses=NOT_FOUND)
def get_label_set(name: str, runtime: RuntimeDep) -> LabelSetPublic:
    return LabelSetPublic.from_domain(runtime.repository.get(name))


@router.put("/{name}", responses=NOT_FOUND)
def replace_label_set(name: str, body: LabelSetCreate, runtime: RuntimeDep) -> LabelSetPublic:
    """Replace a label set with a new version (embeddings recomputed; the old version stays until this commits)."""
    return LabelSetPublic.from_domain(runtime.label_sets.replace(name, body))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND)
def delete_label_set(name: str, runtime: RuntimeDep) -> None:
    """Delete a label set, its cached embeddings, KPL fits and indexed descriptions."""
    if runtime.ready:
        runtime.label_sets.delete(name)
    else:   # the model is still loading: the store alone; the description index catches up at start-up
        runtime.repository.delete(name)
