"""The description index: every description embedded by the loaded model's text tower, in a FAISS
inner-product index (cosine: vectors are L2-normalised), saved per model id under data_dir/kb/.

Descriptions come in groups, one per label set (its corpus file plus the descriptions in its own
definition). The manifest records the model id, the layout, the corpus hash and a hash per group over
its entries and the exact prompts embedded for them: at start-up a changed model or layout rebuilds
everything, a changed group (its descriptions, or the wording of its prompts) is re-embedded alone, and
a registered or updated label set updates its group without a full rebuild.

Layout: one `faiss.IndexFlatIP` holds every vector, once. Each label set's rows form one contiguous block
and, inside it, each class's rows are contiguous, so a class is a row range [start, end) and a search
restricted to it is a flat search with an `IDSelectorRange`, which FAISS scans as that range alone: its
cost does not grow with the index. Replacing a group removes its block (later rows shift down) and
appends the new rows at the end; the range tables shift in step. Vectors handed out (a search's evidence,
a class's descriptions) are copies of the rows asked for.

Device (MEDZERO_INDEX_DEVICE, `resolve_index_device`): the CPU flat index is always the one source of truth (saved,
loaded, reconstructed). With `device="cuda"` and a faiss that can search on a GPU (the `gpu` extra), `search_class`
instead searches a `GpuIndexFlatIP` copy of that one class, made from its rows on the class's first search and
kept until its label set is replaced or removed (the copy holds vectors, not row numbers, so other groups' rows
shifting leaves it valid; the class's current start is added to its answers). The trade-off, unmeasured here: each
call still copies the queries to the device and the answers back and synchronises, tens of microseconds that a CPU
scan of a class of tens to hundreds of rows (benchmarks/kpl.py) does not cost; the device pays off only when the
scan itself is large -- classes of thousands of descriptions, or hundreds of queries a call (a KPL fit over a whole
pool) -- and it holds every searched class on the device a second time. So `auto` picks the GPU only where the
encoder already runs on one, and `cpu` keeps today's path exactly.
"""
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import torch
from tqdm import tqdm

from app.domain import modality_noun
from app.errors import ModelLoadError

log = logging.getLogger(__name__)

DESCRIPTION_PROMPT = "a {image} of {class_term}, which has {description}"
EMBED_BATCH_SIZE = 256
# What the saved folder holds; a folder saved with any other layout (or none: the IndexIDMap2 with per-class
# copies of before) is rebuilt, not read.
INDEX_LAYOUT = "flat-ip/rows-by-class/1"

RowRange = tuple[int, int]          # [start, end) rows of the flat index
IndexDevice = Literal["cpu", "cuda"]   # where search_class runs
GPU_TEMP_MEMORY_BYTES = 64 * 2**20     # faiss's scratch pool on the GPU (its default takes up to 1.5 GiB beside torch)
GPU_MAX_K = 2048                       # the most results a faiss GPU search selects; larger k searches on the CPU
# Run in a child process: a faiss GPU build without kernels for this GPU aborts the process on its first search
# (a CUDA error is an assertion in faiss, not an exception), which must not take the server with it.
GPU_PROBE = """
import faiss, numpy as np
vectors = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
config = faiss.GpuIndexFlatConfig()
config.device = 0
gpu = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), 32, config)
gpu.add(vectors)
cpu = faiss.IndexFlatIP(32)
cpu.add(vectors)
assert (gpu.search(vectors[:4], 3)[1] == cpu.search(vectors[:4], 3)[1]).all(), "GPU and CPU disagree"
"""


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
        """What the text tower embeds: "a chest X-ray of pneumonia, which has <text>"."""
        return DESCRIPTION_PROMPT.format(image=modality_noun(self.modality), class_term=self.class_term,
                                         description=self.text)


@dataclass(frozen=True)
class Retrieved:
    text: str
    source: str
    similarity: float
    vector: np.ndarray              # (dim,), L2-normalised; a copy, not a view of the index


def group_hash(items: Sequence[DescriptionItem]) -> str:
    """Covers each entry and the prompt rendered from it, so new wording re-embeds the groups it changes."""
    canonical = json.dumps([[asdict(item), item.prompt()] for item in items], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class DescriptionIndex:
    """The flat index, the entries in row order, and the row range of each label set and of each class.
    Not thread-safe on its own: KnowledgeBase holds one lock around every call."""

    def __init__(self, model_id: str, dim: int, device: IndexDevice = "cpu") -> None:
        self.model_id = model_id
        self.dim = dim
        # where search_class runs: cuda only when asked for and faiss can search on a GPU, so a CPU-only faiss
        # always gets the CPU path (resolve_index_device turns a cuda that cannot be into a start-up error)
        self.device: IndexDevice = "cuda" if device == "cuda" and faiss_gpu_count() > 0 else "cpu"
        self.index = faiss.IndexFlatIP(dim)
        self.items: list[DescriptionItem] = []                       # row i's entry
        self.group_hashes: dict[str, str] = {}
        self.corpus_hash = ""
        self.built_at = 0.0
        self._group_rows: dict[str, RowRange] = {}                   # label set -> its block
        self._class_rows: dict[tuple[str, str], RowRange] = {}       # (label set, class) -> its rows
        # (label set, class) -> its range selector and search parameters, made on the class's first search (building
        # SearchParameters costs about what the search does) and dropped when a removal moves rows; appends move none
        self._class_search: dict[tuple[str, str], tuple[faiss.IDSelectorRange, faiss.SearchParameters]] = {}
        # (label set, class) -> a GpuIndexFlatIP of its vectors (device cuda), made on its first search; dropped
        # when its group is replaced or removed. Positions are not in it, so shifts elsewhere leave it valid
        self._gpu_classes: dict[tuple[str, str], faiss.Index] = {}

    @property
    def count(self) -> int:
        return self.index.ntotal

    # -- writing
    def replace_group(self, name: str, items: Sequence[DescriptionItem], vectors: np.ndarray, digest: str) -> None:
        """Drop the group's rows, append `items` with their (len(items), dim) vectors, grouped by class (classes
        in order of first appearance, entries in their order within a class)."""
        if any(item.label_set != name for item in items):
            raise ValueError(f"every entry of group {name!r} must belong to label set {name!r}")
        if len(items):
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            if vectors.shape != (len(items), self.dim):
                raise ValueError(f"group {name!r}: {len(items)} entries but vectors of shape {vectors.shape}")
        self.remove_group(name)
        if len(items):
            first_seen: dict[str, int] = {}
            for item in items:
                first_seen.setdefault(item.class_name, len(first_seen))
            order = sorted(range(len(items)), key=lambda i: first_seen[items[i].class_name])   # stable
            start = self.count
            self.index.add(vectors[order])
            self.items += [items[i] for i in order]
            groups, classes = _row_ranges(self.items[start:], offset=start)
            self._group_rows.update(groups)
            self._class_rows.update(classes)
        self.group_hashes[name] = digest

    def remove_group(self, name: str) -> None:
        self.group_hashes.pop(name, None)
        rows = self._group_rows.pop(name, None)
        if rows is None:
            return
        self._class_search.clear()
        self._gpu_classes = {key: copy for key, copy in self._gpu_classes.items() if key[0] != name}
        start, end = rows
        removed = self.index.remove_ids(faiss.IDSelectorRange(start, end))   # later rows move down, in order
        if removed != end - start:
            raise RuntimeError(f"FAISS removed {removed} rows of group {name!r}, expected {end - start}")
        del self.items[start:end]

        def shifted(span: RowRange) -> RowRange:
            return (span[0] - removed, span[1] - removed) if span[0] >= end else span

        self._group_rows = {group: shifted(span) for group, span in self._group_rows.items()}
        self._class_rows = {key: shifted(span) for key, span in self._class_rows.items() if key[0] != name}

    # -- reading
    def class_rows(self, label_set: str, class_name: str) -> RowRange:
        return self._class_rows.get((label_set, class_name), (0, 0))

    def class_ids(self, label_set: str, class_name: str) -> np.ndarray:
        """Row numbers of one class's descriptions (valid until the next write)."""
        return np.arange(*self.class_rows(label_set, class_name), dtype=np.int64)

    def class_vectors(self, label_set: str, class_name: str) -> tuple[np.ndarray, list[DescriptionItem]]:
        """One class's (m, dim) description vectors, copied out of the index, and their entries."""
        start, end = self.class_rows(label_set, class_name)
        if start == end:
            return np.empty((0, self.dim), np.float32), []
        return self.index.reconstruct_n(start, end - start), self.items[start:end]

    def search_class(self, queries: np.ndarray, label_set: str, class_name: str,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k descriptions of one class for each query: (similarities (n, k'), rows (n, k')), k' <= k.

        On the CPU by default: the flat index scans the class's row range alone, which for tens to hundreds of
        rows takes microseconds (benchmarks/kpl.py). With device cuda, on the class's GPU copy (the module's
        docstring weighs the two); the answers are the same rows and, to float rounding, the same similarities."""
        key = (label_set, class_name)
        start, end = self._class_rows.get(key, (0, 0))
        k = min(k, end - start)
        if k <= 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.device == "cuda" and k <= GPU_MAX_K:
            copy = self._gpu_classes.get(key)
            if copy is None:
                copy = self._gpu_classes[key] = _gpu_flat_index(self.index.reconstruct_n(start, end - start))
            similarities, rows = copy.search(queries, k)             # rows of the copy: 0 .. end - start
            return similarities, np.where(rows >= 0, rows + start, rows)
        if key not in self._class_search:
            selector = faiss.IDSelectorRange(start, end)    # FAISS scans [start, end) only
            self._class_search[key] = selector, faiss.SearchParameters(sel=selector)
        return self.index.search(queries, k, params=self._class_search[key][1])

    def retrieve(self, queries: np.ndarray, label_set: str, class_name: str, k: int) -> list[list[Retrieved]]:
        similarities, rows = self.search_class(queries, label_set, class_name, k)
        if rows.size == 0:
            return [[] for _ in range(len(queries))]
        found = rows >= 0                     # all, unless a query held NaNs
        vectors = np.zeros((*rows.shape, self.dim), np.float32)
        vectors[found] = self.index.reconstruct_batch(rows[found])   # copies of the k found rows only
        return [[Retrieved(self.items[r].text, self.items[r].source, float(s), v)
                 for s, r, v in zip(row_s, row_r.tolist(), row_v) if r >= 0]
                for row_s, row_r, row_v in zip(similarities, rows, vectors)]

    # -- persistence: a folder per model, written to a temp folder and renamed into place
    def manifest(self) -> dict:
        return {"model_id": self.model_id, "dim": self.dim, "count": self.count, "layout": INDEX_LAYOUT,
                "prompt": DESCRIPTION_PROMPT, "corpus_hash": self.corpus_hash, "groups": dict(self.group_hashes),
                "built_at": self.built_at, "faiss_version": faiss.__version__}

    def save(self, directory: Path) -> None:
        """descriptions.faiss (the flat index), items.jsonl (the entries in row order), manifest.json."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            faiss.write_index(self.index, str(staging / "descriptions.faiss"))
            with open(staging / "items.jsonl", "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(asdict(item), ensure_ascii=False) + "\n" for item in self.items)
            (staging / "manifest.json").write_text(json.dumps(self.manifest(), indent=2))
            retired = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old."))
            if directory.exists():
                os.replace(directory, retired / "index")
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path, device: IndexDevice = "cpu") -> "DescriptionIndex":
        """Raises ValueError for a folder this code did not write (another layout) or whose parts disagree."""
        manifest = json.loads((directory / "manifest.json").read_text())
        if manifest.get("layout") != INDEX_LAYOUT:
            raise ValueError(f"{directory}: saved with layout {manifest.get('layout')!r}, not {INDEX_LAYOUT!r}")
        loaded = cls(manifest["model_id"], manifest["dim"], device)
        index = faiss.read_index(str(directory / "descriptions.faiss"))
        if not isinstance(index, faiss.IndexFlatIP) or index.d != loaded.dim:
            raise ValueError(f"{directory}: descriptions.faiss is a {type(index).__name__} of dimension {index.d}, "
                             f"not an IndexFlatIP of dimension {loaded.dim}")
        loaded.index = index
        with open(directory / "items.jsonl", encoding="utf-8") as handle:
            try:
                loaded.items = [DescriptionItem(**json.loads(line)) for line in handle]
            except TypeError as exc:
                raise ValueError(f"{directory}: items.jsonl has entries of another form ({exc})") from exc
        if len(loaded.items) != loaded.count:
            raise ValueError(f"{directory}: {loaded.count} vectors but {len(loaded.items)} entries")
        loaded._group_rows, loaded._class_rows = _row_ranges(loaded.items)   # once, here, not in a request
        loaded.group_hashes = manifest["groups"]
        loaded.corpus_hash = manifest["corpus_hash"]
        loaded.built_at = manifest["built_at"]
        if not set(loaded._group_rows) <= set(loaded.group_hashes):
            raise ValueError(f"{directory}: entries of groups the manifest does not list")
        return loaded


def _row_ranges(items: Sequence[DescriptionItem],
                offset: int = 0) -> tuple[dict[str, RowRange], dict[tuple[str, str], RowRange]]:
    """The row range of each label set and of each (label set, class) in `items` (row offset + i). Raises
    ValueError when one's rows are not contiguous."""
    groups: dict[str, RowRange] = {}
    classes: dict[tuple[str, str], RowRange] = {}
    for row, item in enumerate(items, start=offset):
        for table, key in ((groups, item.label_set), (classes, (item.label_set, item.class_name))):
            start, end = table.get(key, (row, row))
            if end != row:
                raise ValueError(f"the rows of {key!r} are not contiguous (row {row})")
            table[key] = (start, row + 1)
    return groups, classes


def faiss_gpu_count() -> int:
    """GPUs this faiss can search on: 0 with faiss-cpu (whose builds may lack the GPU symbols altogether)."""
    if not hasattr(faiss, "GpuIndexFlatIP") or not hasattr(faiss, "get_num_gpus"):
        return 0
    return faiss.get_num_gpus()


def faiss_gpu_problem() -> str | None:
    """Why faiss cannot search on a GPU here, or None when a trial search in a child process agrees with the CPU.
    A GPU build can see a GPU it has no kernels for: faiss-gpu-cu12 1.14.1.post1 carries sm_70 and sm_80 code and
    no PTX, so on a Hopper GPU (sm_90) its first search fails."""
    if faiss_gpu_count() == 0:
        if not hasattr(faiss, "GpuIndexFlatIP"):
            return f"faiss {faiss.__version__} has no GPU support (faiss-cpu is installed)"
        return "faiss sees no GPU"
    try:
        probe = subprocess.run([sys.executable, "-c", GPU_PROBE], capture_output=True, text=True, timeout=120,
                               check=False)
    except subprocess.TimeoutExpired:
        return "a trial search on GPU 0 did not finish within 120 s"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        return f"a trial search on GPU 0 failed ({last[:300]})"
    return None


def resolve_index_device(requested: str, encoder_device: str) -> IndexDevice:
    """MEDZERO_INDEX_DEVICE -> where search_class runs. auto: cuda when the encoder runs on CUDA and faiss can search
    on a GPU, else cpu; cuda: ModelLoadError when faiss cannot (a start-up error, as MEDZERO_DEVICE=cuda is)."""
    if requested == "cpu" or (requested == "auto" and encoder_device != "cuda"):
        return "cpu"
    problem = faiss_gpu_problem()
    if problem is None:
        return "cuda"
    if requested == "cuda":
        raise ModelLoadError(f"MEDZERO_INDEX_DEVICE=cuda but {problem}: install the gpu extra (pip install "
                             "medzero[gpu], then swap faiss-cpu for faiss-gpu-cu12 as pyproject.toml says) on a "
                             "machine with a GPU it supports, or set MEDZERO_INDEX_DEVICE=auto or cpu")
    log.info("description index searches on the CPU: %s", problem)
    return "cpu"


@cache
def _gpu_resources() -> "faiss.StandardGpuResources":
    """One set of faiss GPU resources (streams, cuBLAS handle, scratch) for every class copy of the process."""
    resources = faiss.StandardGpuResources()
    resources.setTempMemory(GPU_TEMP_MEMORY_BYTES)     # larger scratch needs are allocated per call
    return resources


def _gpu_flat_index(vectors: np.ndarray) -> faiss.Index:
    """A GpuIndexFlatIP on GPU 0 holding (m, dim) `vectors` as rows 0 .. m - 1."""
    config = faiss.GpuIndexFlatConfig()
    config.device = 0
    index = faiss.GpuIndexFlatIP(_gpu_resources(), vectors.shape[1], config)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


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
               progress: bool = False, device: IndexDevice = "cpu") -> tuple[DescriptionIndex, list[str]]:
    """Bring `index` in line with `groups` for this model: re-embed changed groups, drop vanished ones.
    Returns the index and the names of the groups it (re)embedded; none when everything was current. `device`
    is a new index's (one kept keeps its own)."""
    if index is None or index.model_id != model_id or index.dim != dim:
        index = DescriptionIndex(model_id, dim, device)
    hashes = {name: group_hash(items) for name, items in groups.items()}
    changed = [name for name in groups if index.group_hashes.get(name) != hashes[name]]
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
        index.replace_group(name, items, vectors[offset:offset + len(items)], hashes[name])
        offset += len(items)
    if changed or index.corpus_hash != corpus_hash:
        index.corpus_hash = corpus_hash
        index.built_at = time.time()
    return index, changed
