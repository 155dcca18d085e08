"""KPL costs: restricted FAISS retrieval per image as the index grows (the current description index against the
previous design, time and resident memory) and proxy-fit time as the pool grows. What KPL buys in accuracy is
benchmarks/accuracy.py (every method on every labelled dataset, through `medzero eval`).

1. retrieval: two designs, each filled through `replace_group` with the same N synthetic L2-normalised
   descriptions (many label sets of 60 descriptions per class, one of them 7 classes x 60):
   *current* is app's `DescriptionIndex` (one IndexFlatIP, rows contiguous per class, searched by row range);
   *previous* is `PreviousDescriptionIndex` below, a faithful copy of the design it replaced (IndexIDMap2 over
   an IndexFlatIP plus per-class numpy copies of the ids and vectors, searched with `faiss.knn`). Then what
   method=kpl does per image without a stored fit: `search_class(query, label_set, class, k=8)` for each of the
   7 classes, as single queries and as batches of 64; `retrieve` (search + evidence vectors) likewise; for
   reference, on the current index, a FAISS `IDSelectorBatch` search over the whole index (restricted by
   filtering, not by range) and an unrestricted top-8 search. Ratios against the smallest N and current ÷
   previous. Resident memory: each (design, N) filled in a fresh process (spawn), VmRSS before and after;
2. proxy fit: `fit_kpl` on synthetic pools (7 clusters + noise, 7 x 60 descriptions) with the default
   KPLConfig, both balancing readings; when a full fit would take more than half of --max-fit-seconds,
   fewer proxy iterations are timed and the fit is extrapolated per iteration (the table says so).

Prints Markdown tables. Run from the repository root:

    .venv/bin/python benchmarks/kpl.py                                   # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/kpl.py --sizes 1k,10k --pool-sizes 1k     # quick look
"""
import argparse
import ctypes
import dataclasses
import gc
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from app.knowledge.index import DescriptionIndex, DescriptionItem, Retrieved
from app.methods.kpl import BALANCINGS, KPLConfig, fit_kpl

TARGET_LABEL_SET = "bench-target"
TARGET_CLASSES = 7                 # the label set every timed search is restricted to, like HAM10000's
DESCRIPTIONS_PER_CLASS = 60        # the bundled corpus has 55-57 per class
OTHER_CLASSES_PER_LABEL_SET = 5
TOP_K = 8                          # KPLConfig.top_k_descriptions
BATCH_QUERIES = 64
MIN_BATCH_SAMPLES = 20             # batched timings repeat over at least this many batches
REFERENCE_QUERIES = 50             # single-query samples for the two whole-index reference rows
WARM_UP_CALLS = 5
CALIBRATION_ITERS = 20             # proxy iterations timed to decide how many a fit can afford
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16")


# -- synthetic vectors

def normalise(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def label_set_groups(total: int) -> list[tuple[str, list[int]]]:
    """(label set, descriptions per class) adding up to `total`: the 7-class target first, then label sets of
    5 classes x 60; the last one takes the remainder."""
    groups = [(TARGET_LABEL_SET, [DESCRIPTIONS_PER_CLASS] * TARGET_CLASSES)]
    left = total - TARGET_CLASSES * DESCRIPTIONS_PER_CLASS
    while left > 0:
        per_class = [min(DESCRIPTIONS_PER_CLASS, max(0, left - j * DESCRIPTIONS_PER_CLASS))
                     for j in range(OTHER_CLASSES_PER_LABEL_SET)]
        per_class = [count for count in per_class if count]
        groups.append((f"bench-{len(groups):05d}", per_class))
        left -= sum(per_class)
    return groups


def description_group(name: str, per_class: list[int], dim: int,
                      rng: np.random.Generator) -> tuple[list[DescriptionItem], np.ndarray, np.ndarray]:
    """Items, (m, dim) vectors around one random centroid per class, and the (n_classes, dim) centroids."""
    centroids = normalise(rng.standard_normal((len(per_class), dim)))
    items, vectors = [], []
    for c, count in enumerate(per_class):
        class_name = f"class_{c}"
        items += [DescriptionItem(name, "synthetic", class_name, class_name, f"description {j} of {class_name}",
                                  "curated") for j in range(count)]
        vectors.append(centroids[c] + rng.standard_normal((count, dim)).astype(np.float32) / math.sqrt(dim))
    return items, normalise(np.concatenate(vectors)), centroids


def queries_near(centroids: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, dim) 'images': each near a random class centroid, as a real image is near its class."""
    dim = centroids.shape[1]
    picks = rng.integers(len(centroids), size=count)
    return normalise(centroids[picks] + 2 * rng.standard_normal((count, dim)).astype(np.float32) / math.sqrt(dim))


# -- 1. retrieval: the previous design, kept here to measure against

class PreviousDescriptionIndex:
    """The description index as it was before rows were kept contiguous per class (app/knowledge/index.py up to
    commit 3cdba7a), CPU path: an IndexIDMap2 over an IndexFlatIP holding every vector, plus per (label set,
    class) numpy copies of the ids and vectors, kept in step with every add and remove, which restricted
    searches run `faiss.knn` on. Every vector is held twice."""

    def __init__(self, model_id: str, dim: int) -> None:
        self.model_id = model_id
        self.dim = dim
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.items: dict[int, DescriptionItem] = {}
        self.group_hashes: dict[str, str] = {}
        self._next_id = 0
        self._by_class: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def count(self) -> int:
        return self.index.ntotal

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

    def class_ids(self, label_set: str, class_name: str) -> np.ndarray:
        return self._by_class.get((label_set, class_name), (np.empty(0, np.int64), None))[0]

    def search_class(self, queries: np.ndarray, label_set: str, class_name: str,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, vectors = self._by_class.get((label_set, class_name), (np.empty(0, np.int64), None))
        k = min(k, len(ids))
        if k == 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        similarities, rows = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        return similarities, ids[rows]

    def retrieve(self, queries: np.ndarray, label_set: str, class_name: str, k: int) -> list[list[Retrieved]]:
        similarities, found = self.search_class(queries, label_set, class_name, k)
        ids, vectors = self._by_class.get((label_set, class_name), (np.empty(0, np.int64), None))
        row_of = {int(i): row for row, i in enumerate(ids)}
        return [[Retrieved(self.items[int(i)].text, self.items[int(i)].source, float(s), vectors[row_of[int(i)]])
                 for s, i in zip(row_s, row_i) if i >= 0] for row_s, row_i in zip(similarities, found)]


DESIGNS: dict[str, Callable[[str, int], object]] = {"previous": PreviousDescriptionIndex,
                                                    "current": DescriptionIndex}


# -- 1. retrieval: timings

@dataclass
class Latency:
    design: str
    operation: str
    descriptions: int
    queries: int                       # single-query samples
    image_ms: list[float]              # single queries: per image (all the operation's calls)
    call_ms: list[float]               # single queries: per call (one class); empty if one call per image
    batch_image_ms: list[float]        # batches of BATCH_QUERIES: per image


@dataclass
class Upkeep:
    design: str
    descriptions: int
    label_sets: int
    build_seconds: float               # every replace_group into an empty index
    first_search_ms: float             # the first search_class after the build
    replace_ms: float                  # replace_group of the target label set in the full index (a label-set update)
    first_search_after_replace_ms: float


@dataclass
class Resident:
    design: str
    descriptions: int
    dim: int
    megabytes: float                   # VmRSS after filling minus before, in a fresh process

    @property
    def one_copy_megabytes(self) -> float:
        return self.descriptions * self.dim * 4 / 2**20


def time_calls(calls: list[Callable[[], object]]) -> tuple[float, list[float]]:
    """Runs `calls` in order; (total ms, ms per call)."""
    per_call = []
    for call in calls:
        started = time.perf_counter_ns()
        call()
        per_call.append((time.perf_counter_ns() - started) / 1e6)
    return sum(per_call), per_call


def measure_operation(design: str, name: str, descriptions: int, queries: np.ndarray,
                      calls_for: Callable[[np.ndarray], list[Callable[[], object]]], single_queries: int,
                      one_call_per_image: bool) -> Latency:
    for query in queries[:WARM_UP_CALLS]:
        time_calls(calls_for(query[None]))
    image_ms, call_ms = [], []
    for query in tqdm(queries[:single_queries], desc=f"{design} {name[:24]} @ {descriptions:,}", unit="query",
                      leave=False):
        total, per_call = time_calls(calls_for(query[None]))   # batch of 1: one image as /classify sends it
        image_ms.append(total)
        call_ms += [] if one_call_per_image else per_call
    batches = [queries[i:i + BATCH_QUERIES] for i in range(0, len(queries) - BATCH_QUERIES + 1, BATCH_QUERIES)]
    batch_image_ms = []
    for _ in range(max(1, math.ceil(MIN_BATCH_SAMPLES / len(batches)))):
        for batch in batches:
            batch_image_ms.append(time_calls(calls_for(batch))[0] / len(batch))
    return Latency(design, name, descriptions, single_queries, image_ms, call_ms, batch_image_ms)


def fill_index(index, size: int, dim: int, rng: np.random.Generator, *,
               show_progress: bool = True) -> tuple[list[tuple[str, list[int]]], np.ndarray, float]:
    """`size` synthetic descriptions into `index` by `replace_group`: (groups, the target's centroids, seconds
    spent in replace_group)."""
    groups = label_set_groups(size)
    build_seconds, target_centroids = 0.0, None
    for name, per_class in tqdm(groups, desc=f"filling index @ {size:,}", unit="label set", leave=False,
                                disable=not show_progress):
        items, vectors, centroids = description_group(name, per_class, dim, rng)
        target_centroids = centroids if target_centroids is None else target_centroids
        started = time.perf_counter()
        index.replace_group(name, items, vectors, digest=name)
        build_seconds += time.perf_counter() - started
    return groups, target_centroids, build_seconds


def benchmark_retrieval(design: str, size: int, dim: int, n_queries: int, seed: int,
                        references: bool) -> tuple[list[Latency], Upkeep]:
    rng = np.random.default_rng(seed)                 # the same vectors and queries for every design
    index = DESIGNS[design]("bench-synthetic", dim)
    groups, target_centroids, build_seconds = fill_index(index, size, dim, rng)
    classes = [f"class_{c}" for c in range(TARGET_CLASSES)]
    queries = queries_near(target_centroids, max(n_queries, BATCH_QUERIES), rng)

    first_search_ms = time_calls([lambda: index.search_class(queries[:1], TARGET_LABEL_SET, classes[0], TOP_K)])[0]

    def search_class(query: np.ndarray) -> list[Callable[[], object]]:
        return [lambda c=c: index.search_class(query, TARGET_LABEL_SET, c, TOP_K) for c in classes]

    def retrieve(query: np.ndarray) -> list[Callable[[], object]]:
        return [lambda c=c: index.retrieve(query, TARGET_LABEL_SET, c, TOP_K) for c in classes]

    class_ids = {c: index.class_ids(TARGET_LABEL_SET, c) for c in classes}

    def id_selector_batch(query: np.ndarray) -> list[Callable[[], object]]:
        def call(c: str) -> object:
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(class_ids[c]))
            return index.index.search(query, TOP_K, params=params)
        return [lambda c=c: call(c) for c in classes]

    def unrestricted(query: np.ndarray) -> list[Callable[[], object]]:
        return [lambda: index.index.search(query, TOP_K)]

    latencies = [
        measure_operation(design, "`search_class` × 7", size, queries, search_class, n_queries, False),
        measure_operation(design, "`retrieve` × 7", size, queries, retrieve, n_queries, False),
    ]
    if references:
        reference_queries = min(n_queries, REFERENCE_QUERIES)
        latencies += [
            measure_operation(design, "FAISS `IDSelectorBatch` over the whole index × 7", size, queries,
                              id_selector_batch, reference_queries, False),
            measure_operation(design, "unrestricted top-8 search of the whole index × 1", size, queries,
                              unrestricted, reference_queries, True),
        ]

    name, per_class = groups[0]
    items, vectors, _ = description_group(name, per_class, dim, rng)
    started = time.perf_counter()
    index.replace_group(name, items, vectors, digest=f"{name}-v2")
    replace_ms = (time.perf_counter() - started) * 1000
    after_ms = time_calls([lambda: index.search_class(queries[:1], TARGET_LABEL_SET, classes[0], TOP_K)])[0]
    return latencies, Upkeep(design, index.count, len(groups), build_seconds, first_search_ms, replace_ms, after_ms)


# -- 1. retrieval: resident memory, one fresh process per (design, size)

def vm_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def release_freed_memory() -> None:
    """gc, then glibc's malloc_trim: freed temporaries go back to the system rather than count as resident."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: what was freed may still count
        pass


def resident_after_fill(design: str, size: int, dim: int, seed: int) -> float:
    """In a fresh process: MB resident that filling `design` with `size` descriptions adds (index, entries and
    tables; the generated vectors are temporaries, freed before the second reading)."""
    release_freed_memory()
    before = vm_rss_bytes()
    index = DESIGNS[design]("bench-synthetic", dim)
    fill_index(index, size, dim, np.random.default_rng(seed), show_progress=False)
    release_freed_memory()
    after = vm_rss_bytes()
    assert index.count == size
    return (after - before) / 2**20


def measure_resident(design: str, size: int, dim: int, seed: int) -> Resident:
    spawn = multiprocessing.get_context("spawn")               # a fresh interpreter: no allocator reuse
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as worker:
        return Resident(design, size, dim, worker.submit(resident_after_fill, design, size, dim, seed).result())


# -- 2. proxy fit

@dataclass
class FitTiming:
    pool_size: int
    balancing: str
    iterations_measured: int
    seconds: float                     # for KPLConfig().proxy_iters iterations; extrapolated if fewer measured
    setup_seconds: float               # fit_kpl with no proxy iterations: text proxies + balancing
    agreement: float                   # argmax of X·W vs the clusters the pool was drawn from


def synthetic_pool(n_images: int, dim: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(n, dim) images in 7 clusters + noise, per class (60, dim) descriptions near the class centre, labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(TARGET_CLASSES, dim, generator=generator), dim=1)
    labels = torch.arange(n_images) % TARGET_CLASSES
    images = F.normalize(centres[labels] + 3 * torch.randn(n_images, dim, generator=generator) / math.sqrt(dim),
                         dim=1)
    descriptions = [F.normalize(centres[c] + 2 * torch.randn(DESCRIPTIONS_PER_CLASS, dim, generator=generator)
                                / math.sqrt(dim), dim=1) for c in range(TARGET_CLASSES)]
    return images, descriptions, labels


def timed_fit(images: torch.Tensor, descriptions: list[torch.Tensor], config: KPLConfig) -> tuple[float, object]:
    started = time.perf_counter()
    fit = fit_kpl(images, descriptions, config)
    return time.perf_counter() - started, fit


def benchmark_fit(pool_size: int, dim: int, balancing: str, max_seconds: float, seed: int) -> FitTiming:
    """Times `fit_kpl` with no proxy iterations (the fixed part), then with CALIBRATION_ITERS, then with more as
    long as the next run, judged by the last, takes at most half of `max_seconds`. A run short of the default
    iterations is extrapolated per iteration (each iteration does the same work)."""
    images, descriptions, labels = synthetic_pool(pool_size, dim, seed)
    full = KPLConfig(balancing=balancing)
    setup_seconds, _ = timed_fit(images, descriptions, dataclasses.replace(full, proxy_iters=0))
    iterations = min(CALIBRATION_ITERS, full.proxy_iters)
    while True:   # 20, then up to 8x more per run: a misjudged run overshoots the budget by little
        seconds, fit = timed_fit(images, descriptions, dataclasses.replace(full, proxy_iters=iterations))
        per_iter = max(seconds - setup_seconds, 1e-9) / iterations
        affordable = int((max_seconds / 2 - setup_seconds) / per_iter)
        following = min(full.proxy_iters, 8 * iterations, max(2 * iterations, affordable))
        if iterations == full.proxy_iters:
            break
        if following > affordable:
            seconds = setup_seconds + per_iter * full.proxy_iters
            break
        iterations = following
    agreement = float(((images @ fit.vision_proxies).argmax(dim=1) == labels).float().mean())
    return FitTiming(pool_size, balancing, iterations, seconds, setup_seconds, agreement)


# -- report

def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def ms(value: float) -> str:
    if math.isnan(value):
        return "–"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base > 0 and not math.isnan(value) else "–"


def format_latency_table(latencies: list[Latency]) -> str:
    smallest = min(r.descriptions for r in latencies)
    baseline = {(r.design, r.operation): (percentile(r.image_ms, 50), percentile(r.batch_image_ms, 50))
                for r in latencies if r.descriptions == smallest}
    lines = [("| design | operation | descriptions | queries | ms/image p50 | ms/image p95 | ms/class search p50 "
              "| ms/class search p95 | batch of 64: ms/image p50 | batch of 64: ms/image p95 "
              "| ÷ smallest N (single p50) | ÷ smallest N (batch p50) |"),
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    order = list(dict.fromkeys((r.design, r.operation) for r in latencies))
    for row in sorted(latencies, key=lambda r: (order.index((r.design, r.operation)), r.descriptions)):
        single, batch = percentile(row.image_ms, 50), percentile(row.batch_image_ms, 50)
        base_single, base_batch = baseline[(row.design, row.operation)]
        lines.append(f"| {row.design} | {row.operation} | {row.descriptions:,} | {row.queries} | {ms(single)} "
                     f"| {ms(percentile(row.image_ms, 95))} | {ms(percentile(row.call_ms, 50))} "
                     f"| {ms(percentile(row.call_ms, 95))} | {ms(batch)} | {ms(percentile(row.batch_image_ms, 95))} "
                     f"| {ratio(single, base_single)} | {ratio(batch, base_batch)} |")
    return "\n".join(lines)


def format_comparison_table(latencies: list[Latency], resident: list[Resident]) -> str:
    """Per size and operation: previous vs current ms/image (single p50, batch-of-64 p50), then resident MB."""
    by_key = {(r.design, r.operation, r.descriptions): r for r in latencies}
    operations = list(dict.fromkeys(r.operation for r in latencies if r.design == "previous"))
    sizes = sorted({r.descriptions for r in latencies})
    lines = [("| descriptions | operation | previous ms/image | current ms/image | current ÷ previous "
              "| previous batch of 64: ms/image | current batch of 64: ms/image | current ÷ previous |"),
             "|--:|---|--:|--:|--:|--:|--:|--:|"]
    for size in sizes:
        for operation in operations:
            old, new = by_key.get(("previous", operation, size)), by_key.get(("current", operation, size))
            if old is None or new is None:
                continue
            old_single, new_single = percentile(old.image_ms, 50), percentile(new.image_ms, 50)
            old_batch, new_batch = percentile(old.batch_image_ms, 50), percentile(new.batch_image_ms, 50)
            lines.append(f"| {size:,} | {operation} | {ms(old_single)} | {ms(new_single)} "
                         f"| {ratio(new_single, old_single)} | {ms(old_batch)} | {ms(new_batch)} "
                         f"| {ratio(new_batch, old_batch)} |")
    lines += ["", ("| descriptions | dim | previous resident MB | current resident MB | current ÷ previous "
                   "| one copy of the vectors MB |"), "|--:|--:|--:|--:|--:|--:|"]
    memory = {(r.design, r.descriptions): r for r in resident}
    for size in sorted({r.descriptions for r in resident}):
        old, new = memory.get(("previous", size)), memory.get(("current", size))
        if old is None or new is None:
            continue
        lines.append(f"| {size:,} | {new.dim} | {old.megabytes:.1f} | {new.megabytes:.1f} "
                     f"| {ratio(new.megabytes, old.megabytes)} | {new.one_copy_megabytes:.1f} |")
    return "\n".join(lines)


def format_upkeep_table(upkeep: list[Upkeep]) -> str:
    lines = [("| design | descriptions | label sets | build: every `replace_group` s "
              f"| first `search_class` after the build ms | `replace_group` of the {TARGET_CLASSES}-class label set ms "
              "| first `search_class` after it ms |"),
             "|---|--:|--:|--:|--:|--:|--:|"]
    for row in sorted(upkeep, key=lambda r: (list(DESIGNS).index(r.design), r.descriptions)):
        lines.append(f"| {row.design} | {row.descriptions:,} | {row.label_sets} | {row.build_seconds:.2f} "
                     f"| {ms(row.first_search_ms)} | {ms(row.replace_ms)} | {ms(row.first_search_after_replace_ms)} |")
    return "\n".join(lines)


def goal_line(latencies: list[Latency], goal_size: int = 100_000, goal_ms: float = 1.0) -> str:
    rows = [r for r in latencies if r.design == "current" and r.operation.startswith("`search_class`")
            and r.descriptions >= goal_size]
    if not rows:
        return f"1 ms goal at {goal_size:,} descriptions: not measured (no --sizes entry ≥ {goal_size:,})."
    row = min(rows, key=lambda r: r.descriptions)
    p50, p95 = percentile(row.image_ms, 50), percentile(row.image_ms, 95)
    verdict = "MET" if p95 < goal_ms else ("met at the median, not at p95" if p50 < goal_ms else "NOT MET")
    return (f"Goal < {goal_ms:g} ms per image at {goal_size:,} descriptions on CPU (current design, all "
            f"{TARGET_CLASSES} class searches, single query): {verdict} — {row.descriptions:,} descriptions: "
            f"p50 {ms(p50)} ms, p95 {ms(p95)} ms; batched {ms(percentile(row.batch_image_ms, 50))} ms/image.")


def cpu_line() -> str:
    """The CPU flags that decide FAISS's kernels, as /proc/cpuinfo lists them, and what FAISS was built with."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        flags = None
    shown = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS) if flags is not None \
        else "no /proc/cpuinfo"
    level = getattr(faiss, "SIMDConfig", None)
    dispatched = f", dispatched SIMD level {level.get_level_name()}" if level is not None else ""
    return (f"CPU flags: {shown} · faiss {faiss.__version__} compile options: "
            f"{faiss.get_compile_options().strip()}{dispatched}")


def format_fit_table(timings: list[FitTiming]) -> str:
    full_iters = KPLConfig().proxy_iters
    smallest = {t.balancing: t.seconds for t in timings if t.pool_size == min(x.pool_size for x in timings)}
    lines = [(f"| balancing | pool images | iterations measured | seconds for {full_iters} iterations "
              "| of which text proxies + balancing | ÷ smallest pool | agreement with the synthetic clusters |"),
             "|---|--:|--:|--:|--:|--:|--:|"]
    for t in sorted(timings, key=lambda t: (BALANCINGS.index(t.balancing), t.pool_size)):
        measured = (f"{t.iterations_measured}" if t.iterations_measured == full_iters
                    else f"{t.iterations_measured} (extrapolated to {full_iters})")
        lines.append(f"| {t.balancing} | {t.pool_size:,} | {measured} | {t.seconds:.1f} | {t.setup_seconds:.2f} "
                     f"| {t.seconds / smallest[t.balancing]:.2f} | {t.agreement:.3f} |")
    return "\n".join(lines)


def progress(message: str) -> None:
    print(f"[kpl] {message}", file=sys.stderr, flush=True)


def parse_counts(text: str) -> list[int]:
    counts = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        counts.append(int(float(part[:-1]) * 1000) if part.endswith("k") else int(part))
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="1k,10k,100k", help="descriptions in the index, comma-separated")
    parser.add_argument("--pool-sizes", default="1k,10k", help="images in the synthetic fitting pools")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension of the synthetic vectors "
                                                             "(512: BiomedCLIP, ViT-B-16)")
    parser.add_argument("--queries", type=int, default=200, help="single-query samples per restricted operation")
    parser.add_argument("--max-fit-seconds", type=float, default=30.0,
                        help="a fit estimated to take more than half of this is timed over fewer proxy iterations "
                             "and extrapolated")
    parser.add_argument("--threads", type=int, help="torch and FAISS threads; None keeps theirs (one per core)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.sizes, args.pool_sizes = parse_counts(args.sizes), parse_counts(args.pool_sizes)
    except ValueError as exc:
        parser.error(f"--sizes and --pool-sizes take counts like 1000 or 10k: {exc}")
    smallest = TARGET_CLASSES * DESCRIPTIONS_PER_CLASS
    if any(n < smallest for n in args.sizes):
        parser.error(f"--sizes must be at least {smallest} (the {TARGET_CLASSES}-class label set alone)")
    if any(n < 2 for n in args.pool_sizes) or args.dim < 2 or args.queries < 1:
        parser.error("--pool-sizes must be at least 2, --dim at least 2 and --queries positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0]   # other work on the machine skews every number below
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    latencies, upkeep, resident = [], [], []
    for size in args.sizes:
        for design in DESIGNS:
            progress(f"retrieval: {design} design, {size:,} descriptions, dim {args.dim}")
            rows, kept = benchmark_retrieval(design, size, args.dim, args.queries, args.seed,
                                             references=design == "current")
            latencies += rows
            upkeep.append(kept)
            gc.collect()
        for design in DESIGNS:
            progress(f"resident memory: {design} design, {size:,} descriptions, in a fresh process")
            resident.append(measure_resident(design, size, args.dim, args.seed))

    timings = []
    for pool_size, balancing in tqdm([(n, b) for n in args.pool_sizes for b in BALANCINGS],
                                     desc="proxy fits", unit="fit"):
        timings.append(benchmark_fit(pool_size, args.dim, balancing, args.max_fit_seconds, args.seed))

    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads · "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads, "
          f"{'a GPU visible to faiss (the index searches on CPU)' if gpu else 'CPU only'} · {os.cpu_count()} CPUs · "
          f"load average {load_at_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(cpu_line())
    print()
    print(f"### Retrieval per image: {TARGET_CLASSES} classes × {DESCRIPTIONS_PER_CLASS} descriptions restricted, "
          f"k={TOP_K}, dim {args.dim}")
    print()
    print(format_latency_table(latencies))
    print()
    print(goal_line(latencies))
    print()
    print("### Previous design (IndexIDMap2 + per-class numpy copies, `faiss.knn`) vs current (one IndexFlatIP, "
          "rows contiguous per class, `IDSelectorRange`)")
    print()
    print("ms/image: p50 over all 7 class searches of an image. Resident MB: VmRSS added by filling the index "
          "(vectors, entries, tables) in a fresh process per row, after gc and malloc_trim.")
    print()
    print(format_comparison_table(latencies, resident))
    print()
    print(format_upkeep_table(upkeep))
    print()
    print(f"### Proxy fit: `fit_kpl`, default KPLConfig, dim {args.dim}, {TARGET_CLASSES} classes × "
          f"{DESCRIPTIONS_PER_CLASS} descriptions")
    print()
    print(format_fit_table(timings))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        progress("interrupted")
        sys.exit(130)
