"""The description index: every description embedded by the loaded model's text tower, in a FAISS
inner-product index (cosine: vectors are L2-normalised), saved per model id under data_dir/kb/.

Descriptions come in groups, one per label set (its corpus file plus the descriptions in its own
definition). The manifest records the model id, the prompt form, the corpus hash and a hash per group:
at start-up a changed model or prompt rebuilds everything, a changed group is re-embedded alone, and a
registered or updated label set updates its group without a full rebuild.
"""
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

DESCRIPTION_PROMPT = "a {modality} image of {class_term}, which has {description}"
EMBED_BATCH_SIZE = 256
_MODALITY_WORDS = {"chest-xray": "chest X-ray", "breast-ultrasound": "breast ultrasound"}


@dataclass(frozen=True)
class DescriptionItem:
    """One description to index, with what the prompt needs and where it came from."""
    label_set: str
    modality: str
    class_name: str
    class_term: str                 # how the class is called in the prompt (display name, or the humanised name)
    text: str
    source: str                     # curated | llm:<model> | label_set

    def prompt(self) -> str:
        modality = _MODALITY_WORDS.get(self.modality, self.modality.replace("-", " "))
        return DESCRIPTION_PROMPT.format(modality=modality, class_term=self.class_term, description=self.text)


@dataclass(frozen=True)
class Retrieved:
    text: str
    source: str
    similarity: float
    vector: np.ndarray              # (dim,), L2-normalised


def group_hash(items: Sequence[DescriptionItem]) -> str:
    canonical = json.dumps([asdict(item) for item in items], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256((DESCRIPTION_PROMPT + canonical).encode()).hexdigest()


_gpu_resources = None


def gpu_resources():
    """faiss-gpu's resources when the `gpu` extra is installed and a GPU is visible, else None (CPU search)."""
    global _gpu_resources
    if _gpu_resources is None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


class DescriptionIndex:
    """FAISS IndexIDMap2 over a flat inner-product index, plus the entries behind the ids."""

    def __init__(self, model_id: str, dim: int) -> None:
        self.model_id = model_id
        self.dim = dim
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.items: dict[int, DescriptionItem] = {}
        self.group_hashes: dict[str, str] = {}
        self.corpus_hash = ""
        self.built_at = 0.0
        self._next_id = 0
        # per (label set, class): (ids, vectors), kept in step with every add and remove. Restricted searches
        # run on these small matrices (faiss.knn / knn_gpu), so their cost does not grow with the whole index.
        self._by_class: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def count(self) -> int:
        return self.index.ntotal

    # -- writing
    def replace_group(self, name: str, items: Sequence[DescriptionItem], vectors: np.ndarray, digest: str) -> None:
        self.remove_group(name)
        if len(items):
            ids = np.arange(self._next_id, self._next_id + len(items), dtype=np.int64)
            self._next_id += len(items)
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            self.index.add_with_ids(vectors, ids)
            self.items.update(zip(ids.tolist(), items))
            self._add_to_class_table(ids, vectors)
        self.group_hashes[name] = digest

    def remove_group(self, name: str) -> None:
        doomed = np.array([i for i, item in self.items.items() if item.label_set == name], dtype=np.int64)
        if len(doomed):
            self.index.remove_ids(doomed)
            for i in doomed.tolist():
                del self.items[i]
        self.group_hashes.pop(name, None)
        self._by_class = {key: value for key, value in self._by_class.items() if key[0] != name}

    def _add_to_class_table(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        rows: dict[tuple[str, str], list[int]] = {}
        for row, item_id in enumerate(ids.tolist()):
            item = self.items[item_id]
            rows.setdefault((item.label_set, item.class_name), []).append(row)
        for key, selected in rows.items():
            old_ids, old_vectors = self._by_class.get(key, (np.empty(0, np.int64), np.empty((0, self.dim), np.float32)))
            self._by_class[key] = (np.concatenate([old_ids, ids[selected]]),
                                   np.concatenate([old_vectors, vectors[selected]]))

    # -- reading
    def class_ids(self, label_set: str, class_name: str) -> np.ndarray:
        return self._by_class.get((label_set, class_name), (np.empty(0, np.int64), None))[0]

    def class_vectors(self, label_set: str, class_name: str) -> tuple[np.ndarray, list[DescriptionItem]]:
        """One class's (m, dim) description vectors and their entries."""
        ids, vectors = self._by_class.get((label_set, class_name), (np.empty(0, np.int64), None))
        if vectors is None:
            return np.empty((0, self.dim), np.float32), []
        return vectors, [self.items[int(i)] for i in ids]

    def search_class(self, queries: np.ndarray, label_set: str, class_name: str,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k descriptions of one class for each query: (similarities (n, k'), ids (n, k')), k' <= k."""
        ids, vectors = self._by_class.get((label_set, class_name), (np.empty(0, np.int64), None))
        k = min(k, len(ids))
        if k == 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        resources = gpu_resources()
        if resources is not None:
            similarities, rows = faiss.knn_gpu(resources, queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            similarities, rows = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        return similarities, ids[rows]

    def retrieve(self, queries: np.ndarray, label_set: str, class_name: str, k: int) -> list[list[Retrieved]]:
        similarities, found = self.search_class(queries, label_set, class_name, k)
        ids, vectors = self._by_class.get((label_set, class_name), (np.empty(0, np.int64), None))
        row_of = {int(i): row for row, i in enumerate(ids)}
        return [[Retrieved(self.items[int(i)].text, self.items[int(i)].source, float(s), vectors[row_of[int(i)]])
                 for s, i in zip(row_s, row_i) if i >= 0] for row_s, row_i in zip(similarities, found)]

    # -- persistence: a folder per model, written to a temp folder and renamed into place
    def manifest(self) -> dict:
        return {"model_id": self.model_id, "dim": self.dim, "count": self.count, "prompt": DESCRIPTION_PROMPT,
                "corpus_hash": self.corpus_hash, "groups": dict(self.group_hashes), "built_at": self.built_at,
                "faiss_version": faiss.__version__}

    def save(self, directory: Path) -> None:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            faiss.write_index(self.index, str(staging / "descriptions.faiss"))
            with open(staging / "items.jsonl", "w", encoding="utf-8") as handle:
                for i, item in sorted(self.items.items()):
                    handle.write(json.dumps({"id": i, **asdict(item)}, ensure_ascii=False) + "\n")
            (staging / "manifest.json").write_text(json.dumps({**self.manifest(), "next_id": self._next_id},
                                                              indent=2))
            retired = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old."))
            if directory.exists():
                os.replace(directory, retired / "index")
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> "DescriptionIndex":
        manifest = json.loads((directory / "manifest.json").read_text())
        loaded = cls(manifest["model_id"], manifest["dim"])
        loaded.index = faiss.read_index(str(directory / "descriptions.faiss"))
        with open(directory / "items.jsonl", encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                item_id = row.pop("id")
                loaded.items[item_id] = DescriptionItem(**row)
        loaded.group_hashes = manifest["groups"]
        loaded.corpus_hash = manifest["corpus_hash"]
        loaded.built_at = manifest["built_at"]
        loaded._next_id = manifest["next_id"]
        if loaded.count:   # the per-class table, once, here rather than in the first request
            inner = faiss.downcast_index(loaded.index.index)
            loaded._add_to_class_table(faiss.vector_to_array(loaded.index.id_map), inner.reconstruct_n(0, inner.ntotal))
        if loaded.count != len(loaded.items) or manifest["prompt"] != DESCRIPTION_PROMPT:
            raise ValueError(f"{directory}: index and items disagree, or the prompt form changed")
        return loaded


def index_dir(data_dir: Path, model_id: str) -> Path:
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)[:80]
    return data_dir / "kb" / f"{readable}-{hashlib.sha256(model_id.encode()).hexdigest()[:10]}"


def embed_items(encode_texts: Callable[[Sequence[str]], torch.Tensor], items: Sequence[DescriptionItem],
                *, progress: bool = False, description: str = "embedding descriptions") -> np.ndarray:
    """(len(items), dim) float32, L2-normalised, in batches (a progress bar when asked)."""
    prompts = [item.prompt() for item in items]
    batches = range(0, len(prompts), EMBED_BATCH_SIZE)
    chunks = [encode_texts(prompts[start:start + EMBED_BATCH_SIZE]).numpy()
              for start in tqdm(batches, desc=description, unit="batch", disable=not progress or not prompts)]
    return np.concatenate(chunks).astype(np.float32) if chunks else np.empty((0, 0), np.float32)


def sync_index(index: DescriptionIndex | None, *, model_id: str, dim: int, groups: dict[str, list[DescriptionItem]],
               corpus_hash: str, encode_texts: Callable[[Sequence[str]], torch.Tensor],
               progress: bool = False) -> tuple[DescriptionIndex, list[str]]:
    """Bring `index` in line with `groups` for this model: re-embed changed groups, drop vanished ones.
    Returns the index and the names of the groups it (re)embedded; none when everything was current."""
    if index is None or index.model_id != model_id or index.dim != dim:
        index = DescriptionIndex(model_id, dim)
    changed = [name for name, items in groups.items() if index.group_hashes.get(name) != group_hash(items)]
    for name in [name for name in index.group_hashes if name not in groups]:
        index.remove_group(name)
        changed.append(name)
    todo = [item for name in changed if name in groups for item in groups[name]]
    vectors = embed_items(encode_texts, todo, progress=progress) if todo else np.empty((0, dim), np.float32)
    offset = 0
    for name in changed:
        if name not in groups:
            continue
        items = groups[name]
        index.replace_group(name, items, vectors[offset:offset + len(items)], group_hash(items))
        offset += len(items)
    if changed or index.corpus_hash != corpus_hash:
        index.corpus_hash = corpus_hash
        index.built_at = time.time()
    return index, changed
