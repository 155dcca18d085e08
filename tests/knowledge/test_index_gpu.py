"""MEDZERO_INDEX_DEVICE: where a class's description search runs. Without a faiss that can search on a GPU, every
setting but cuda gives today's CPU search, bit for bit, and cuda stops start-up naming the gpu extra; with one, the
GPU copies answer what the CPU index answers, through replaced and removed groups."""
import asyncio
from pathlib import Path

import numpy as np
import pytest

from app.errors import ModelLoadError
from app.knowledge.index import DescriptionIndex, DescriptionItem, faiss_gpu_problem, resolve_index_device
from app.runtime import Runtime
from tests.conftest import tiny_settings

GPU_PROBLEM = faiss_gpu_problem()      # None where faiss searches on a GPU and agrees with the CPU
needs_faiss_gpu = pytest.mark.skipif(GPU_PROBLEM is not None, reason=f"no faiss GPU search here: {GPU_PROBLEM}")
without_faiss_gpu = pytest.mark.skipif(GPU_PROBLEM is None, reason="faiss searches on a GPU here")
DIM = 16


def group(name: str, counts: dict[str, int], rng: np.random.Generator) -> tuple[list[DescriptionItem], np.ndarray]:
    """A label set's entries, its classes dealt out in turn (as a corpus file plus its own descriptions arrive),
    and their unit vectors."""
    keys = sorted(((c, j) for c, n in counts.items() for j in range(n)), key=lambda key: key[1])
    vectors = rng.standard_normal((len(keys), DIM)).astype(np.float32)
    items = [DescriptionItem(name, "synthetic", c, c, f"{name}/{c}/{j}", "curated") for c, j in keys]
    return items, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def build_in_step(*indexes: DescriptionIndex) -> list[list[tuple[str, str]]]:
    """The same writes on every index; after each, the (label set, class) keys it then holds."""
    rng = np.random.default_rng(11)
    writes = [("a", {"a0": 3, "a1": 40}), ("b", {"b0": 5, "b1": 2}), ("c", {"c0": 300, "c1": 1}),
              ("a", {"a0": 2, "a2": 7}),        # replaced: a1 gone, a2 new, b and c move down
              ("b", None)]                       # removed: c moves down again
    held: dict[str, dict[str, int]] = {}
    states = []
    for name, counts in writes:
        if counts is None:
            for index in indexes:
                index.remove_group(name)
            held.pop(name)
        else:
            items, vectors = group(name, counts, rng)
            for index in indexes:
                index.replace_group(name, items, vectors, digest=f"{name}-{len(items)}")
            held[name] = counts
        states.append([(label_set, c) for label_set, classes in held.items() for c in classes])
    return states


def search_all(index: DescriptionIndex, queries: np.ndarray, keys: list[tuple[str, str]]) -> dict:
    return {key: index.search_class(queries, *key, k=8) for key in [*keys, ("a", "a1"), ("nope", "x")]}


@without_faiss_gpu
def test_without_a_faiss_gpu_every_setting_but_cuda_searches_on_the_cpu() -> None:
    assert resolve_index_device("auto", "cuda") == "cpu"
    assert resolve_index_device("auto", "cpu") == "cpu"
    assert resolve_index_device("cpu", "cuda") == "cpu"


@without_faiss_gpu
def test_without_a_faiss_gpu_cuda_names_the_gpu_extra() -> None:
    with pytest.raises(ModelLoadError, match=r"MEDZERO_INDEX_DEVICE=cuda but .*pip install medzero\[gpu\]"):
        resolve_index_device("cuda", "cuda")


@without_faiss_gpu
def test_without_a_faiss_gpu_cuda_stops_start_up(tmp_path: Path) -> None:
    async def start() -> None:
        async with Runtime.for_job(tiny_settings(tmp_path, index_device="cuda"), progress=False, index="skip"):
            pass

    with pytest.raises(ModelLoadError, match=r"pip install medzero\[gpu\]"):
        asyncio.run(start())


@without_faiss_gpu
def test_without_a_faiss_gpu_an_index_asked_for_cuda_answers_as_the_cpu_one(tmp_path: Path) -> None:
    cpu, asked = DescriptionIndex("synthetic", DIM), DescriptionIndex("synthetic", DIM, device="cuda")
    assert asked.device == "cpu"
    queries = np.random.default_rng(3).standard_normal((5, DIM)).astype(np.float32)
    for keys in build_in_step(cpu, asked):
        expected, found = search_all(cpu, queries, keys), search_all(asked, queries, keys)
        for key, (similarities, rows) in expected.items():
            assert np.array_equal(found[key][1], rows) and np.array_equal(found[key][0], similarities), key
    cpu.save(tmp_path / "saved")
    assert DescriptionIndex.load(tmp_path / "saved", device="cuda").device == "cpu"


@needs_faiss_gpu
def test_gpu_search_answers_what_the_cpu_index_answers(tmp_path: Path) -> None:
    cpu, gpu = DescriptionIndex("synthetic", DIM), DescriptionIndex("synthetic", DIM, device="cuda")
    assert gpu.device == "cuda" and resolve_index_device("auto", "cuda") == "cuda"
    queries = np.random.default_rng(3).standard_normal((64, DIM)).astype(np.float32)
    for keys in build_in_step(cpu, gpu):
        for _ in range(2):                                   # the first search makes the copies, the second reuses
            expected, found = search_all(cpu, queries, keys), search_all(gpu, queries, keys)
            for key, (similarities, rows) in expected.items():
                assert np.array_equal(found[key][1], rows), key
                assert np.allclose(found[key][0], similarities, atol=1e-5), key
    found = gpu.retrieve(queries[:2], "c", "c0", 3)
    assert [[r.text for r in image] for image in found] == \
        [[r.text for r in image] for image in cpu.retrieve(queries[:2], "c", "c0", 3)]
    gpu.save(tmp_path / "saved")                             # the CPU index is what is saved, as before
    loaded = DescriptionIndex.load(tmp_path / "saved", device="cuda")
    assert loaded.device == "cuda"
    rows = loaded.search_class(queries, "c", "c0", 8)[1]
    assert np.array_equal(rows, cpu.search_class(queries, "c", "c0", 8)[1])
