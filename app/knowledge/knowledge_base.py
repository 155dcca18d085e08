"""KnowledgeBase: the corpus plus the loaded model's description index, kept in line with the label sets.

The server holds one; `medzero kb build` uses the same code to rebuild from scratch. Every read and write of the
index goes through one lock (an add or a remove must not run under a search). A label-set write updates its
group here after the store committed it; should that fail, the store stays the truth and the next start-up
re-syncs the index. The knowledge base exists before the label-set service that reports those writes: until the
first `sync` has loaded or built the index, a write is only recorded, and that sync does the work.
"""
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from app.domain import LabelSetSpec
from app.knowledge.corpus import CorpusFile, corpus_hash, load_corpus
from app.knowledge.index import DescriptionIndex, DescriptionItem, IndexDevice, Retrieved, index_dir, sync_index

log = logging.getLogger(__name__)


class KnowledgeBase:
    def __init__(self, *, corpus_dir: Path, data_dir: Path, model_id: str, dim: int,
                 encode_texts: Callable[[Sequence[str]], torch.Tensor], index_device: IndexDevice = "cpu") -> None:
        self.corpus_dir = corpus_dir
        self.directory = index_dir(data_dir, model_id)
        self.model_id = model_id
        self.dim = dim
        self.index_device = index_device             # resolve_index_device's answer; the index's own may be cpu
        self._encode_texts = encode_texts
        self._lock = threading.RLock()
        self._corpora: dict[str, CorpusFile] = {}
        self._label_sets: dict[str, LabelSetSpec] = {}
        self._index: DescriptionIndex | None = None
        self._synced = False                         # False until the first sync has loaded or built the index
        self._removed_before_sync: set[str] = set()

    # -- start-up and rebuilds
    def sync(self, label_sets: Sequence[LabelSetSpec], *, rebuild: bool = False, progress: bool = False) -> list[str]:
        """Load the saved index, then re-embed what changed since (everything when `rebuild`). Saves if anything
        changed; returns the groups re-embedded. Raises InvalidCorpus on a malformed corpus file."""
        with self._lock:
            self._corpora = load_corpus(self.corpus_dir)
            self._label_sets = self._merge_recorded(label_sets) if not self._synced else {
                spec.name: spec for spec in label_sets}
            if self._index is None and not rebuild:
                self._index = self._load_saved()
            if rebuild:
                self._index = None
            self._index, changed = sync_index(
                self._index, model_id=self.model_id, dim=self.dim, groups=self._groups(),
                corpus_hash=corpus_hash(self._corpora), encode_texts=self._encode_texts, progress=progress,
                device=self.index_device)
            if changed or not self.directory.exists():
                self._index.save(self.directory)
            self._synced = True
            self._removed_before_sync.clear()
            return changed

    def _merge_recorded(self, label_sets: Sequence[LabelSetSpec]) -> dict[str, LabelSetSpec]:
        """The first sync's label sets: `label_sets`, with the writes recorded before it applied on top (a put wins
        unless the list holds a newer version; a removal drops the name)."""
        merged = {spec.name: spec for spec in label_sets}
        for name in self._removed_before_sync:
            merged.pop(name, None)
        for name, spec in self._label_sets.items():
            if _written(merged.get(name)) <= _written(spec):
                merged[name] = spec
        return merged

    def put_label_set(self, spec: LabelSetSpec) -> bool:
        """A label set was registered or updated: re-embed its group if its descriptions changed. One held
        already, or older than the one held (two updates finishing out of order), is ignored; a label set deleted
        and created again (version 1 anew) is newer by its creation time. Before the first sync it is only
        recorded (no embedding, no save) and False is returned; that sync embeds it."""
        with self._lock:
            held = self._label_sets.get(spec.name)
            if _written(held) > _written(spec) or held == spec:
                return False
            self._label_sets[spec.name] = spec
            self._removed_before_sync.discard(spec.name)
            return self._resync() if self._synced else False

    def remove_label_set(self, name: str) -> bool:
        """A label set was deleted: drop its own descriptions (a corpus file of that name stays indexed). Before
        the first sync it is only recorded."""
        with self._lock:
            self._label_sets.pop(name, None)
            if not self._synced:
                self._removed_before_sync.add(name)
                return False
            return self._resync()

    def _resync(self) -> bool:
        try:
            self._index, changed = sync_index(
                self._index, model_id=self.model_id, dim=self.dim, groups=self._groups(),
                corpus_hash=corpus_hash(self._corpora), encode_texts=self._encode_texts, device=self.index_device)
            if changed:
                self._index.save(self.directory)
        except (OSError, RuntimeError) as exc:   # disk full, a faiss error: the store already holds the write
            log.error("description index not updated (%s); it re-syncs at the next start", exc)
            return False
        return bool(changed)

    def _load_saved(self) -> DescriptionIndex | None:
        if not (self.directory / "manifest.json").is_file():
            return None
        try:
            return DescriptionIndex.load(self.directory, self.index_device)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:   # unreadable: rebuild rather than refuse
            log.warning("description index at %s is unusable (%s); rebuilding", self.directory, exc)
            return None

    def _groups(self) -> dict[str, list[DescriptionItem]]:
        groups = {name: _items_for(name, corpus, self._label_sets.get(name))
                  for name, corpus in self._corpora.items()}
        for name, spec in self._label_sets.items():
            if name not in groups:
                groups[name] = _items_for(name, None, spec)
        return {name: items for name, items in groups.items() if items}

    # -- reading
    @property
    def manifest(self) -> dict:
        with self._lock:
            return self._index.manifest() if self._index else {}

    def retrieve(self, image_features: np.ndarray, label_set: str, class_name: str, k: int) -> list[list[Retrieved]]:
        """Per image, the k descriptions of one class that fit it best (FAISS, restricted to that class)."""
        with self._lock:
            if self._index is None:
                return [[] for _ in range(len(image_features))]
            return self._index.retrieve(image_features, label_set, class_name, k)

    def class_descriptions(self, label_set: str, class_name: str) -> tuple[np.ndarray, list[DescriptionItem]]:
        """All of one class's description vectors (m, dim) and entries."""
        with self._lock:
            if self._index is None:
                return np.empty((0, self.dim), np.float32), []
            return self._index.class_vectors(label_set, class_name)


def _written(spec: LabelSetSpec | None) -> tuple[float, int]:
    """Which of two writes of one label set is newer: a stored LabelSet's (created_at, version); a bare spec
    (never stored) is older than any stored one."""
    created_at = getattr(spec, "created_at", None)
    return (created_at.timestamp() if created_at else 0.0, getattr(spec, "version", 0))


def _items_for(name: str, corpus: CorpusFile | None, spec: LabelSetSpec | None) -> list[DescriptionItem]:
    """A label set's descriptions: its corpus file's (for the classes it has, when registered) and its own."""
    modality = spec.modality if spec else corpus.modality
    terms = {c.name: c.terms()[0] for c in spec.classes} if spec else {}
    items = []
    if corpus is not None:
        for class_name, descriptions in corpus.classes.items():
            if spec is not None and class_name not in terms:
                continue
            term = terms.get(class_name, class_name.replace("_", " "))
            items += [DescriptionItem(name, modality, class_name, term, d.text, d.source) for d in descriptions]
    if spec is not None:
        for label_class in spec.classes:
            items += [DescriptionItem(name, modality, label_class.name, terms[label_class.name], text, "label_set")
                      for text in label_class.descriptions]
    return items
