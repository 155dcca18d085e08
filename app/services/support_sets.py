"""Few-shot support sets: labelled images uploaded for a label set, embedded through the /classify path
(Classifier.encode_pool: bounded reads, the decode pool, the batched encoder, admission a chunk at a time) and
stored as the label set's method state "fewshot" under the loaded model. Nothing is trained.

An upload adds to the current support set (or replaces it); files that cannot be used are skipped and reported.
A label-set update (a new version) or another model starts without a support set, like every method state.
"""
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from starlette.concurrency import run_in_threadpool

from app.errors import InvalidInput, MedzeroError, PayloadTooLarge, SupportSetNotFound
from app.methods.base import ClassHead
from app.methods.fewshot import FewShot, SupportSet
from app.services.classify import Classifier, state_key
from app.services.uploads import UploadedFile
from app.storage.method_states import MethodStateRepository


@dataclass(frozen=True)
class SupportReport:
    support: SupportSet
    added: int
    skipped: list[tuple[str, MedzeroError]]     # (file name, why) for files that could not be used


class SupportSetService:
    def __init__(self, classifier: Classifier, method: FewShot, states: MethodStateRepository, *,
                 max_images: int) -> None:
        self._classifier = classifier
        self._method = method
        self._states = states
        self._max_images = max_images

    async def add(self, label_set: str, files: Sequence[UploadedFile], classes: Sequence[str], *,
                  replace: bool = False) -> SupportReport:
        """Embed labelled images (one class per file) into the label set's support set; `replace` drops the
        images stored before. Unknown classes and a count mismatch are refused before any image is read."""
        head = await self._classifier.head(label_set)
        if len(classes) != len(files):
            raise InvalidInput(f"{len(files)} files but {len(classes)} classes: give one class per file, in order")
        index = {name: i for i, name in enumerate(head.class_names)}
        unknown = sorted({name for name in classes if name not in index})
        if unknown:
            raise InvalidInput(f"not classes of {label_set!r}: {', '.join(unknown)}; its classes are "
                               f"{', '.join(head.class_names)}")
        current = None if replace else await self._classifier.state(self._method, head)
        kept = len(current.labels) if current is not None else 0
        if kept + len(files) > self._max_images:
            raise PayloadTooLarge(f"{kept} + {len(files)} support images; MEDZERO_MAX_SUPPORT_IMAGES="
                                  f"{self._max_images}")
        pool = await self._classifier.encode_pool(files, description=f"embedding support images for {label_set}")
        if pool.features is None:
            raise InvalidInput(f"none of the {len(files)} support images could be used: "
                               f"{pool.skipped[0][0]} ({pool.skipped[0][1]})")
        labels = torch.tensor([index[classes[i]] for i in pool.used], dtype=torch.long)
        names = tuple(files[i].name for i in pool.used)
        features = pool.features.float()
        if current is not None:
            features = torch.cat([current.features, features])
            labels, names = torch.cat([current.labels, labels]), current.file_names + names
        support = SupportSet(head.label_set, head.version, head.model_id, head.class_names, features, labels, names)
        stamp = await run_in_threadpool(self._states.add, state_key(self._method, head), *support.to_state())
        stored = dataclasses.replace(support, version=stamp.version, created_at=stamp.created_at)
        return SupportReport(stored, len(pool.used), pool.skipped)

    async def current(self, label_set: str) -> tuple[ClassHead, SupportSet | None]:
        head = await self._classifier.head(label_set)
        return head, await self._classifier.state(self._method, head)

    async def delete(self, label_set: str) -> None:
        head = await self._classifier.head(label_set)
        removed = await run_in_threadpool(self._states.delete, self._method.state_kind, head.label_set,
                                          head.model_id)
        if not removed:
            raise SupportSetNotFound(f"label set {label_set!r} has no support set under {head.model_id}")
