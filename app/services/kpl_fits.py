"""KPL fitting use cases: a pool of unlabelled images (uploads, a folder under MEDZERO_KPL_POOL_ROOT, or a folder
named on the command line) -> text and vision proxies for a label set, stored versioned under the loaded model.

Every pool goes through the same path as /classify (Classifier.encode_pool): bounded reads
(MEDZERO_MAX_UPLOAD_BYTES), the decode pool, the batched encoder, admission permits a chunk at a time. A file that
cannot be used is skipped and reported with its own error; a refusal of the server's own (503) fails the fit.
"""
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from app import metrics
from app.errors import InvalidInput, KPLFitNotFound, MedzeroError, PayloadTooLarge
from app.imaging.files import image_files
from app.methods.kpl import KPL, KPLFit, prior_vector
from app.services.classify import Classifier, state_key
from app.services.uploads import UploadedFile, on_disk
from app.storage.method_states import MethodStateRepository


@dataclass(frozen=True)
class FitReport:
    fit: KPLFit
    skipped: list[tuple[str, MedzeroError]]     # (file name, why) for pool files that could not be used


class KPLFitService:
    def __init__(self, classifier: Classifier, method: KPL, states: MethodStateRepository, *,
                 pool_root: Path | None, max_pool_images: int, max_upload_bytes: int) -> None:
        self._classifier = classifier
        self._method = method
        self._states = states
        self._pool_root = pool_root.resolve() if pool_root else None
        self._max_pool_images = max_pool_images
        self._max_upload_bytes = max_upload_bytes

    async def fit(self, label_set: str, files: Sequence[UploadedFile], *, class_prior: dict[str, float] | None = None,
                  progress: bool = False) -> FitReport:
        """Encode the pool (unusable files are skipped and reported), fit, and store as the label set's current fit."""
        head = await self._classifier.head(label_set)
        prior_vector(head, class_prior)                     # a bad prior is refused before any image is read
        if len(files) > self._max_pool_images:
            raise PayloadTooLarge(f"{len(files)} pool images; MEDZERO_KPL_MAX_POOL_IMAGES={self._max_pool_images}")
        pool = await self._classifier.encode_pool(files, progress=progress,
                                                  description=f"encoding the pool for {label_set}")
        features, skipped = pool.features, pool.skipped
        if len(pool.used) < 2:
            raise InvalidInput(f"a KPL fit needs at least 2 usable images; got {len(pool.used)} "
                               f"({len(skipped)} could not be used)")
        fitted = await run_in_threadpool(self._method.fit, features, head, class_prior)
        stamp = await run_in_threadpool(self._states.add, state_key(self._method, head), *fitted.to_state())
        metrics.KPL_FIT_SECONDS.observe(fitted.fit_seconds)
        metrics.KPL_FIT_IMAGES.observe(fitted.pool_size)
        return FitReport(dataclasses.replace(fitted, version=stamp.version, created_at=stamp.created_at), skipped)

    def files_in(self, folder: Path) -> list[UploadedFile]:
        """A folder's images (recursively) as pool files named by their path, for `medzero kpl fit --images`."""
        return [on_disk(path, str(path), self._max_upload_bytes) for path in image_files(folder)]

    def pool_folder_files(self, folder: str) -> list[UploadedFile]:
        """The images of `folder`, which must lie inside MEDZERO_KPL_POOL_ROOT (no escaping it by .. or links),
        named relative to the root."""
        if self._pool_root is None:
            raise InvalidInput("fitting on a server-side folder is disabled; set MEDZERO_KPL_POOL_ROOT, or upload "
                               "the images as `files`")
        resolved = (self._pool_root / folder).resolve()
        if not resolved.is_relative_to(self._pool_root):
            raise InvalidInput(f"folder {folder!r} is outside MEDZERO_KPL_POOL_ROOT")
        if not resolved.is_dir():
            raise InvalidInput(f"no folder {folder!r} under MEDZERO_KPL_POOL_ROOT")
        return [on_disk(path, str(path.relative_to(self._pool_root)), self._max_upload_bytes)
                for path in image_files(resolved) if path.resolve().is_relative_to(self._pool_root)]

    async def current(self, label_set: str) -> KPLFit:
        head = await self._classifier.head(label_set)
        fit = await self._classifier.state(self._method, head)
        if fit is None:
            raise KPLFitNotFound(f"label set {label_set!r} v{head.version} has no KPL fit under {head.model_id}; "
                                 f"POST /labels/{label_set}/kpl makes one")
        return fit

    async def delete(self, label_set: str) -> int:
        head = await self._classifier.head(label_set)
        removed = await run_in_threadpool(self._states.delete, self._method.state_kind, label_set, head.model_id)
        if removed == 0:
            raise KPLFitNotFound(f"label set {label_set!r} has no KPL fit under {head.model_id}")
        return removed
