"""KPL fitting use cases: a pool of unlabelled images (uploads or a server-side folder) -> text and vision
proxies for a label set, stored versioned under the loaded model."""
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.errors import InvalidInput, KPLFitNotFound, MedzeroError, Overloaded, PayloadTooLarge
from app.methods.base import ClassHead
from app.methods.kpl import KPL, prior_vector
from app.services.classify import Classifier
from app.storage.kpl_fits import StoredFit

POOL_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"}


@dataclass(frozen=True)
class FitReport:
    fit: StoredFit
    skipped: list[tuple[str, MedzeroError]]     # (file name, why) for pool files that could not be used


def image_files(folder: Path) -> list[Path]:
    """The images under `folder` (recursively, by suffix), in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in POOL_SUFFIXES and p.is_file())


def _already_read(files: Sequence[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], list]:
    return list(files), []


class KPLFitService:
    def __init__(self, classifier: Classifier, method: KPL, *, pool_root: Path | None, max_pool_images: int,
                 max_upload_bytes: int, chunk_images: int) -> None:
        self._classifier = classifier
        self._method = method
        self._pool_root = pool_root.resolve() if pool_root else None
        self._max_pool_images = max_pool_images
        self._max_upload_bytes = max_upload_bytes
        self._chunk_images = chunk_images          # at most this many pool images wait for the encoder at once

    async def fit(self, label_set: str, files: Sequence[tuple[str, bytes]],
                  skipped: Sequence[tuple[str, MedzeroError]] = (), *,
                  class_prior: dict[str, float] | None = None) -> FitReport:
        """Encode the pool (bad files are skipped and reported, with any `skipped` before), fit, and store as the
        label set's current fit."""
        head = await self._checked_head(label_set, len(files) + len(skipped), class_prior)
        chunks = [partial(_already_read, files[i:i + self._chunk_images])
                  for i in range(0, len(files), self._chunk_images)]
        return await self._fit(head, chunks, list(skipped), class_prior)

    async def fit_folder(self, label_set: str, folder: str, *,
                         class_prior: dict[str, float] | None = None) -> FitReport:
        """The same, on the images of a folder under MEDZERO_KPL_POOL_ROOT, read a chunk at a time."""
        paths = await run_in_threadpool(self.pool_files, folder)
        head = await self._checked_head(label_set, len(paths), class_prior)
        chunks = [partial(self._read_all, paths[i:i + self._chunk_images])
                  for i in range(0, len(paths), self._chunk_images)]
        return await self._fit(head, chunks, [], class_prior)

    async def _checked_head(self, label_set: str, n_images: int, class_prior: dict[str, float] | None) -> ClassHead:
        head = await self._classifier.head(label_set)
        prior_vector(head, class_prior)                     # a bad prior is refused before any image is read
        if n_images > self._max_pool_images:
            raise PayloadTooLarge(f"{n_images} pool images; MEDZERO_KPL_MAX_POOL_IMAGES={self._max_pool_images}")
        return head

    async def _fit(self, head: ClassHead, chunks: Sequence[Callable[[], tuple[list, list]]],
                   skipped: list[tuple[str, MedzeroError]], class_prior: dict[str, float] | None) -> FitReport:
        features = []
        for read_chunk in chunks:
            files, unreadable = await run_in_threadpool(read_chunk)
            skipped += unreadable
            outcomes = await self._classifier.encode_many([data for _, data in files])
            for (name, _), outcome in zip(files, outcomes):
                if isinstance(outcome, Overloaded):   # the server is busy: the fit fails, no image is dropped
                    raise outcome
                if isinstance(outcome, MedzeroError):
                    skipped.append((name, outcome))
                else:
                    features.append(outcome.features)
        if len(features) < 2:
            raise InvalidInput(f"a KPL fit needs at least 2 usable images; got {len(features)} "
                               f"({len(skipped)} could not be used)")
        fitted = await run_in_threadpool(self._method.fit, torch.stack(features), head, class_prior)
        stored = await run_in_threadpool(self._method.fits.add, fitted)
        metrics.KPL_FIT_SECONDS.observe(stored.fit_seconds)
        metrics.KPL_FIT_IMAGES.observe(stored.pool_size)
        return FitReport(stored, skipped)

    def pool_files(self, folder: str) -> list[Path]:
        """Image files under `folder`, which must lie inside MEDZERO_KPL_POOL_ROOT (no escaping it by .. or links)."""
        if self._pool_root is None:
            raise InvalidInput("fitting on a server-side folder is disabled; set MEDZERO_KPL_POOL_ROOT, or upload "
                               "the images as `files`")
        resolved = (self._pool_root / folder).resolve()
        if not resolved.is_relative_to(self._pool_root):
            raise InvalidInput(f"folder {folder!r} is outside MEDZERO_KPL_POOL_ROOT")
        if not resolved.is_dir():
            raise InvalidInput(f"no folder {folder!r} under MEDZERO_KPL_POOL_ROOT")
        return [p for p in image_files(resolved) if p.resolve().is_relative_to(self._pool_root)]

    def _read_all(self, paths: Sequence[Path]) -> tuple[list[tuple[str, bytes]], list[tuple[str, MedzeroError]]]:
        """The files' bytes; a file over MEDZERO_MAX_UPLOAD_BYTES is skipped like an upload that size would be."""
        files, too_large = [], []
        for path in paths:
            name = str(path.relative_to(self._pool_root))
            if path.stat().st_size > self._max_upload_bytes:
                too_large.append((name, PayloadTooLarge(f"{name} is larger than MEDZERO_MAX_UPLOAD_BYTES="
                                                        f"{self._max_upload_bytes} bytes")))
            else:
                files.append((name, path.read_bytes()))
        return files, too_large

    async def current(self, label_set: str) -> StoredFit:
        head = await self._classifier.head(label_set)
        fit = await run_in_threadpool(self._method.current_fit, head)
        if fit is None:
            raise KPLFitNotFound(f"label set {label_set!r} v{head.version} has no KPL fit under {head.model_id}; "
                                 f"POST /labels/{label_set}/kpl makes one")
        return fit

    async def delete(self, label_set: str) -> int:
        head = await self._classifier.head(label_set)
        removed = await run_in_threadpool(self._method.fits.delete, label_set, head.model_id)
        if removed == 0:
            raise KPLFitNotFound(f"label set {label_set!r} has no KPL fit under {head.model_id}")
        return removed
