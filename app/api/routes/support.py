"""/labels/{name}/support: the few-shot support set of a label set (method=fewshot) -- labelled images uploaded
(admin; multipart `files` plus one `classes` field per file, in order), counted per class, or removed."""
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status

from app.api.deps import BODY_ERRORS, AdminDep, RuntimeDep
from app.api.schemas import BatchItem, ErrorBody, ErrorDetail, SupportPublic, SupportUploadPublic
from app.errors import PayloadTooLarge
from app.methods.base import ClassHead
from app.methods.fewshot import SupportSet
from app.services.uploads import uploaded

router = APIRouter(tags=["fewshot"])
ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 503)}


@router.post("/labels/{name}/support", dependencies=[AdminDep], responses={**ERRORS, **BODY_ERRORS})
async def add_support(name: str, runtime: RuntimeDep,
                      files: Annotated[list[UploadFile], File(description="Labelled images (PNG, JPEG, TIFF, DICOM).")],
                      classes: Annotated[list[str], Form(description="The class of each file, in the same order.")],
                      replace: Annotated[bool, Form(description="Drop the support images stored before.")] = False,
                      ) -> SupportUploadPublic:
    """Embed labelled images into the label set's support set (added to what is there, unless `replace`)."""
    settings = runtime.settings
    if len(files) > settings.max_batch_files:
        raise PayloadTooLarge(f"{len(files)} files in one upload; MEDZERO_MAX_BATCH_FILES={settings.max_batch_files}")
    report = await runtime.support_sets.add(
        name, [uploaded(f, f.filename, settings.max_upload_bytes) for f in files], classes, replace=replace)
    return SupportUploadPublic(**to_public(await runtime.classifier.head(name), report.support).model_dump(),
                               added=report.added,
                               skipped=[BatchItem(filename=filename, error=ErrorDetail(code=exc.code, message=str(exc)))
                                        for filename, exc in report.skipped])


@router.get("/labels/{name}/support", responses=ERRORS)
async def get_support(name: str, runtime: RuntimeDep) -> SupportPublic:
    """Support images per class under the loaded model (all 0 when none were uploaded)."""
    head, support = await runtime.support_sets.current(name)
    return to_public(head, support)


@router.delete("/labels/{name}/support", status_code=status.HTTP_204_NO_CONTENT, dependencies=[AdminDep],
               responses=ERRORS)
async def delete_support(name: str, runtime: RuntimeDep) -> None:
    await runtime.support_sets.delete(name)


def to_public(head: ClassHead, support: SupportSet | None) -> SupportPublic:
    counts = support.counts if support is not None else dict.fromkeys(head.class_names, 0)
    return SupportPublic(label_set=head.label_set, label_set_version=head.version, model=head.model_id,
                         support_version=support.version if support else None, counts=counts,
                         images=sum(counts.values()), created_at=support.created_at if support else None)
