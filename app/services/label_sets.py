"""Label-set use cases: register, update, delete, and turn a label set into a ClassHead for the loaded model.

Class text embeddings are computed before anything is written, then stored with the label set in one
transaction, keyed by model id; a label set registered under another model gets its embeddings computed
(and cached) the first time it is used under this one. `encode_texts` runs on the encoder's own thread (the
batcher's), so text embeddings never run concurrently with image forwards. The knowledge base's group for a
label set follows each write, after the store committed it.

Replicas sharing one database see each other's writes: every request reads the label set's version from the
store, and a version (or a deletion) this process has not seen yet replaces its cached head and its description
index group before the request goes on.
"""
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime

import numpy as np
import torch

from app.domain import LabelSet, LabelSetSpec
from app.errors import InvalidLabelSet, LabelSetExists, LabelSetNotFound
from app.knowledge.knowledge_base import KnowledgeBase
from app.methods.base import ClassHead
from app.methods.zero_shot import build_class_weights
from app.services.builtin_label_sets import BUILTIN_LABEL_SETS
from app.storage.label_sets import LabelSetRepository

log = logging.getLogger(__name__)
BUILTINS_INSTALLED_KEY = "builtin_label_sets_installed"


def same_classes_and_prompts(current: LabelSetSpec, new: LabelSetSpec) -> bool:
    """Whether two specs differ at most in their abstain threshold (a decision setting, not the model's input)."""
    fields = set(LabelSetSpec.model_fields) - {"abstain_threshold"}
    return current.model_dump(include=fields) == new.model_dump(include=fields)


def text_encodings(spec: LabelSetSpec) -> int:
    """What a write of `spec` costs the text encoder: its prompt ensembles plus its own descriptions."""
    return sum(len(prompts) for prompts in spec.class_prompts()) + sum(len(c.descriptions) for c in spec.classes)


class LabelSetService:
    def __init__(self, repository: LabelSetRepository, *, encode_texts: Callable[[Sequence[str]], torch.Tensor],
                 model_id: str, knowledge: KnowledgeBase, max_texts: int) -> None:
        self._repository = repository
        self._encode_texts = encode_texts
        self._model_id = model_id
        self._knowledge = knowledge
        self._max_texts = max_texts
        # name -> (created_at, head): a label set deleted and created again restarts at version 1
        self._heads: dict[str, tuple[datetime, ClassHead]] = {}
        self._lock = threading.Lock()

    def list(self) -> list[LabelSet]:
        return self._repository.list()

    def get(self, name: str) -> LabelSet:
        return self._repository.get(name)

    def create(self, spec: LabelSetSpec, *, builtin: bool = False) -> LabelSet:
        if not builtin:                   # the limit guards user writes; the bundled ones are known small
            self._check_cost(spec)
        if self._repository.exists(spec.name):
            raise LabelSetExists(f"a label set named {spec.name!r} already exists; PUT /labels/{spec.name} "
                                 "replaces it")
        weights = self._embed(spec)
        label_set = self._repository.create(spec, model_id=self._model_id,
                                            class_embeddings=weights.numpy(), builtin=builtin)
        self._remember(label_set, weights)
        self._knowledge.put_label_set(label_set)
        return label_set

    def replace(self, name: str, spec: LabelSetSpec) -> LabelSet:
        if spec.name != name:
            raise InvalidLabelSet(f"the body names label set {spec.name!r} but the path names {name!r}; "
                                  "renaming is not supported (create the new name, then delete the old)")
        self._check_cost(spec)
        current = self._repository.get(name)        # 404 before spending time on embeddings
        if current.abstain_threshold != spec.abstain_threshold and same_classes_and_prompts(current, spec):
            # only the abstain threshold changed: nothing the model sees did, so the version (and what was
            # learned or calibrated for it) stays
            updated = self._repository.update_abstain_threshold(spec, current.version)
            if updated is not None:
                return updated
        weights = self._embed(spec)
        label_set = self._repository.replace(spec, model_id=self._model_id, class_embeddings=weights.numpy())
        self._remember(label_set, weights)
        self._knowledge.put_label_set(label_set)
        return label_set

    def delete(self, name: str) -> None:
        self._repository.delete(name)
        self._knowledge.remove_label_set(name)

    def head(self, name: str) -> ClassHead:
        """The current version's class head under the loaded model: memory, else the store, else computed."""
        try:
            label_set = self._repository.get(name)   # the store is the truth: another replica may have changed it
        except LabelSetNotFound:
            with self._lock:
                followed = self._heads.pop(name, None) is not None
            if followed:                             # deleted by another replica: its descriptions go here too
                self._knowledge.remove_label_set(name)
            raise
        with self._lock:
            created_at, cached = self._heads.get(name, (None, None))
        if cached is not None and (created_at, cached.version) == (label_set.created_at, label_set.version):
            if cached.abstain_threshold != label_set.abstain_threshold:      # changed without a new version
                cached = dataclasses.replace(cached, abstain_threshold=label_set.abstain_threshold)
                with self._lock:
                    self._heads[name] = (created_at, cached)
            return cached
        stored = self._repository.class_embeddings(name, label_set.version, self._model_id)
        if stored is not None:
            weights = torch.from_numpy(stored)
        else:
            log.info("computing class embeddings of %s v%d for %s", name, label_set.version, self._model_id)
            weights = self._embed(label_set)
            self._repository.store_class_embeddings(name, label_set.version, self._model_id, weights.numpy())
        # new here: written by another replica (or read at start-up); the description index follows it
        self._knowledge.put_label_set(label_set)
        return self._remember(label_set, weights)

    def install_builtins(self) -> None:
        """Built-in label sets, once per database: a user who deletes one does not get it back on restart."""
        if self._repository.get_meta(BUILTINS_INSTALLED_KEY):
            return
        for spec in BUILTIN_LABEL_SETS:
            if not self._repository.exists(spec.name):
                try:
                    self.create(spec, builtin=True)
                except LabelSetExists:      # a replica starting beside this one installed it meanwhile
                    log.info("built-in label set %s was installed by another replica", spec.name)
        self._repository.set_meta(BUILTINS_INSTALLED_KEY, "1")

    def prepare_all(self) -> None:
        """Make every label set ready for the loaded model (at start-up, after a model change)."""
        for label_set in self._repository.list():
            self.head(label_set.name)

    def _check_cost(self, spec: LabelSetSpec) -> None:
        cost = text_encodings(spec)
        if cost > self._max_texts:
            raise InvalidLabelSet(f"label set {spec.name!r} needs {cost} text encodings (classes x templates x names, "
                                  f"plus prompts and descriptions); MEDZERO_MAX_LABEL_SET_TEXTS={self._max_texts}")

    def _embed(self, spec: LabelSetSpec) -> torch.Tensor:
        return build_class_weights(self._encode_texts, spec.class_prompts())

    def _remember(self, label_set: LabelSet, weights: torch.Tensor) -> ClassHead:
        head = ClassHead(label_set=label_set.name, version=label_set.version, model_id=self._model_id,
                         class_names=tuple(c.name for c in label_set.classes),
                         class_weights=torch.as_tensor(np.asarray(weights, dtype=np.float32)),
                         abstain_threshold=label_set.abstain_threshold)
        with self._lock:
            self._heads[label_set.name] = (label_set.created_at, head)
        return head
