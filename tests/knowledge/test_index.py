"""The description index: built once, loaded on restart, re-embedded only where the corpus, a label set or the
wording of its prompts changed; one flat FAISS index whose rows are contiguous per class, searched by row range."""
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from pydantic import BaseModel

from app import domain
from app.domain import LabelSetSpec
from app.encoders.loader import load_encoder
from app.knowledge.index import INDEX_LAYOUT, DescriptionIndex, DescriptionItem
from app.knowledge.knowledge_base import KnowledgeBase
from app.services.builtin_label_sets import BUILTIN_LABEL_SETS
from app.settings import BUNDLED_KNOWLEDGE_BASE_DIR, Settings

KNEE = LabelSetSpec(name="knee", modality="knee-xray", classes=[
    {"name": "normal", "descriptions": ["a uniform joint space", "smooth articular surfaces"]},
    {"name": "oa", "descriptions": ["marginal osteophytes", "subchondral sclerosis", "joint space narrowing"]}])


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(Settings(model_name="medzero-tiny"))


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    shutil.copytree(BUNDLED_KNOWLEDGE_BASE_DIR, folder)
    return folder


class CountingEncoder:
    """The tiny model's text tower, recording every text it was asked to embed."""

    def __init__(self, encode_texts: Callable[[Sequence[str]], torch.Tensor]) -> None:
        self._encode_texts = encode_texts
        self.texts: list[str] = []

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        self.texts += list(texts)
        return self._encode_texts(texts)


def knowledge(encoder, corpus_dir: Path, data_dir: Path, model_id: str | None = None,
              encode_texts: Callable | None = None) -> KnowledgeBase:
    return KnowledgeBase(corpus_dir=corpus_dir, data_dir=data_dir, model_id=model_id or encoder.model_id, dim=64,
                         encode_texts=encode_texts or encoder.encode_texts)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_build_restart_and_corpus_change(encoder, corpus_dir: Path, tmp_path: Path) -> None:
    first = knowledge(encoder, corpus_dir, tmp_path)
    assert sorted(first.sync(BUILTIN_LABEL_SETS)) == sorted(spec.name for spec in BUILTIN_LABEL_SETS)
    manifest = first.manifest
    assert manifest["count"] == sum(len(d) for f in corpus_dir.glob("*.json")
                                    for d in json.loads(f.read_text())["classes"].values())
    assert manifest["dim"] == 64 and manifest["model_id"] == "medzero-tiny" and len(manifest["corpus_hash"]) == 64
    assert manifest["layout"] == INDEX_LAYOUT
    assert (first.directory / "manifest.json").is_file() and (first.directory / "descriptions.faiss").is_file()
    query = unit_rows(np.random.default_rng(0), 3, 64)
    before = first.retrieve(query, "ham10000", "mel", 8)

    counting = CountingEncoder(encoder.encode_texts)
    restarted = knowledge(encoder, corpus_dir, tmp_path, encode_texts=counting)
    assert restarted.sync(BUILTIN_LABEL_SETS) == []                 # loaded, nothing re-embedded
    assert counting.texts == []
    assert restarted.manifest["built_at"] == manifest["built_at"]
    after = restarted.retrieve(query, "ham10000", "mel", 8)
    assert [[(r.text, r.similarity) for r in image] for image in after] == \
        [[(r.text, r.similarity) for r in image] for image in before]
    assert all(np.array_equal(a.vector, b.vector) for x, y in zip(after, before) for a, b in zip(x, y))

    path = corpus_dir / "breast-ultrasound.json"
    body = json.loads(path.read_text())
    body["classes"]["malignant"].append({"text": "a taller-than-wide hypoechoic mass with angular margins",
                                         "source": "curated"})
    path.write_text(json.dumps(body))
    changed = knowledge(encoder, corpus_dir, tmp_path)
    assert changed.sync(BUILTIN_LABEL_SETS) == ["breast-ultrasound"]   # only that group re-embedded
    assert changed.manifest["count"] == manifest["count"] + 1
    assert changed.manifest["corpus_hash"] != manifest["corpus_hash"]


def test_model_change_rebuilds_everything(encoder, corpus_dir: Path, tmp_path: Path) -> None:
    knowledge(encoder, corpus_dir, tmp_path).sync(BUILTIN_LABEL_SETS)
    other = knowledge(encoder, corpus_dir, tmp_path, model_id="another-model")
    assert len(other.sync(BUILTIN_LABEL_SETS)) == len(BUILTIN_LABEL_SETS)
    assert other.directory != knowledge(encoder, corpus_dir, tmp_path).directory


def test_label_set_descriptions_are_added_without_a_full_rebuild(encoder, corpus_dir: Path, tmp_path: Path) -> None:
    kb = knowledge(encoder, corpus_dir, tmp_path)
    kb.sync(BUILTIN_LABEL_SETS)
    before = kb.manifest
    assert kb.put_label_set(KNEE)
    after = kb.manifest
    assert after["count"] == before["count"] + 5
    assert {k: v for k, v in after["groups"].items() if k != "knee"} == before["groups"]   # others untouched
    assert not kb.put_label_set(KNEE)                                   # unchanged: nothing to do
    assert kb.remove_label_set("knee") and kb.manifest["count"] == before["count"]


def test_retrieval_is_restricted_to_the_class_and_ranked(encoder, corpus_dir: Path, tmp_path: Path) -> None:
    kb = knowledge(encoder, corpus_dir, tmp_path)
    kb.sync(BUILTIN_LABEL_SETS)
    vectors, items = kb.class_descriptions("ham10000", "mel")
    query = vectors[:1] + 0.01                                          # right next to the first melanoma entry
    query /= np.linalg.norm(query)
    found = kb.retrieve(query, "ham10000", "mel", 5)[0]
    assert len(found) == 5 and found[0].text == items[0].text
    assert [r.similarity for r in found] == sorted((r.similarity for r in found), reverse=True)
    mel_texts = {item.text for item in items}
    assert all(r.text in mel_texts for r in found)                      # no other class leaks in
    best = np.argsort(-(vectors @ query[0]))[:5]                        # brute force over the class alone
    assert [r.text for r in found] == [items[i].text for i in best]
    assert all(np.allclose(r.vector, vectors[i]) for r, i in zip(found, best))


def synthetic_group(name: str, counts: dict[str, int], rng: np.random.Generator, dim: int,
                    interleaved: bool = False) -> tuple[list[DescriptionItem], np.ndarray]:
    """A label set's entries and vectors; `interleaved` deals its classes out in turn, as a corpus file plus a
    label set's own descriptions arrive."""
    keys = [(c, j) for c, n in counts.items() for j in range(n)]
    if interleaved:
        keys.sort(key=lambda key: key[1])
    items = [DescriptionItem(name, "synthetic", c, c, f"{name}/{c}/{j}", "curated") for c, j in keys]
    return items, unit_rows(rng, len(items), dim)


def expected_classes(items: list[DescriptionItem], vectors: np.ndarray) -> dict[tuple[str, str], tuple]:
    table: dict[tuple[str, str], tuple[list[str], list[np.ndarray]]] = {}
    for item, vector in zip(items, vectors):
        texts, rows = table.setdefault((item.label_set, item.class_name), ([], []))
        texts.append(item.text)
        rows.append(vector)
    return {key: (texts, np.stack(rows)) for key, (texts, rows) in table.items()}


def assert_exact(index: DescriptionIndex, expected: dict[tuple[str, str], tuple], queries: np.ndarray) -> None:
    """Each class's vectors, entries and top-3 results are exactly those of its own descriptions."""
    for (label_set, class_name), (texts, vectors) in expected.items():
        held, items = index.class_vectors(label_set, class_name)
        assert np.array_equal(held, vectors) and [item.text for item in items] == texts
        scores = queries @ vectors.T
        found = index.retrieve(queries, label_set, class_name, 3)
        for image, row in zip(found, scores):
            best = np.argsort(-row)[:3]
            assert [r.text for r in image] == [texts[i] for i in best]
            assert np.allclose([r.similarity for r in image], row[best], atol=1e-6)
            assert all(np.array_equal(r.vector, vectors[i]) for r, i in zip(image, best))


def test_replacing_and_removing_a_group_keeps_every_other_class_exact(tmp_path: Path) -> None:
    rng, dim = np.random.default_rng(7), 16
    queries = unit_rows(rng, 4, dim)
    index = DescriptionIndex("synthetic", dim)
    expected = {}
    for name, counts, interleaved in (("a", {"a0": 3, "a1": 4}, True), ("b", {"b0": 5, "b1": 2}, False),
                                      ("c", {"c0": 6, "c1": 1}, True)):
        items, vectors = synthetic_group(name, counts, rng, dim, interleaved)
        index.replace_group(name, items, vectors, digest=name)
        expected |= expected_classes(items, vectors)
    assert index.count == 21 and index.class_ids("c", "c0").tolist() == list(range(14, 20))
    assert_exact(index, expected, queries)

    items, vectors = synthetic_group("a", {"a0": 2, "a2": 5}, rng, dim)   # a1 is gone, a2 is new
    index.replace_group("a", items, vectors, digest="a-v2")
    expected = {key: value for key, value in expected.items() if key[0] != "a"} | expected_classes(items, vectors)
    assert index.count == 21 and index.class_ids("c", "c0").tolist() == list(range(7, 13))   # rows moved down
    assert index.class_vectors("a", "a1")[1] == [] and index.retrieve(queries, "a", "a1", 3) == [[]] * 4
    assert_exact(index, expected, queries)

    index.remove_group("b")
    expected = {key: value for key, value in expected.items() if key[0] != "b"}
    assert index.count == 14 and index.group_hashes == {"c": "c", "a": "a-v2"}
    assert index.class_vectors("b", "b0")[1] == []
    assert_exact(index, expected, queries)

    index.save(tmp_path / "saved")
    assert_exact(DescriptionIndex.load(tmp_path / "saved"), expected, queries)


def reachable_arrays(value: object, seen: set[int] | None = None) -> list[str]:
    """Paths to every numpy array or tensor reachable from `value` through containers, dataclasses, pydantic
    models and medzero objects (callables and FAISS objects are not entered)."""
    seen = set() if seen is None else seen
    if id(value) in seen or callable(value) or isinstance(value, faiss.Index):
        return []
    seen.add(id(value))
    if isinstance(value, np.ndarray | torch.Tensor):
        return [type(value).__name__]
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list | tuple | set | frozenset):
        children = list(enumerate(value))
    elif is_dataclass(value):
        children = [(f.name, getattr(value, f.name)) for f in fields(value)]
    elif isinstance(value, BaseModel) or type(value).__module__.startswith("app."):
        children = list(vars(value).items())
    else:
        return []
    return [f"{key}.{path}" for key, child in children for path in reachable_arrays(child, seen)]


def test_the_vectors_are_held_once_in_the_faiss_index(encoder, corpus_dir: Path, tmp_path: Path) -> None:
    kb = knowledge(encoder, corpus_dir, tmp_path)
    kb.sync(BUILTIN_LABEL_SETS)
    index = kb._index
    count = kb.manifest["count"]
    assert type(index.index) is faiss.IndexFlatIP and index.index.ntotal == count == len(index.items)
    assert index.index.codes.size() == count * 64 * 4                 # count x dim float32, nothing more
    assert reachable_arrays(kb) == []                                   # no per-class copies beside it

    vectors, _ = kb.class_descriptions("ham10000", "mel")
    stored = faiss.rev_swig_ptr(index.index.get_xb(), count * 64)
    assert not np.shares_memory(vectors, stored)                        # a copy per call
    query = vectors[:1].copy()
    before = kb.retrieve(query, "ham10000", "mel", 3)[0]
    vectors[:] = 0
    before[0].vector[:] = 0
    after = kb.retrieve(query, "ham10000", "mel", 3)[0]
    assert [r.similarity for r in after] == [r.similarity for r in before] and after[0].vector.any()


def write_old_layout(directory: Path) -> None:
    """Rewrite a saved index as the previous layout saved it: an IndexIDMap2 over an IndexFlatIP, items keyed by
    id, a manifest with next_id and without a layout. The group hashes stay current: only the layout tells."""
    manifest = json.loads((directory / "manifest.json").read_text())
    flat = faiss.read_index(str(directory / "descriptions.faiss"))
    old = faiss.IndexIDMap2(faiss.IndexFlatIP(flat.d))
    old.add_with_ids(flat.reconstruct_n(0, flat.ntotal), np.arange(flat.ntotal, dtype=np.int64))
    faiss.write_index(old, str(directory / "descriptions.faiss"))
    rows = [json.loads(line) for line in (directory / "items.jsonl").read_text().splitlines()]
    (directory / "items.jsonl").write_text("".join(json.dumps({"id": i, **row}) + "\n" for i, row in enumerate(rows)))
    del manifest["layout"]
    manifest |= {"prompt": "a {modality} image of {class_term}, which has {description}", "next_id": flat.ntotal}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_an_index_saved_in_the_old_layout_is_rebuilt(encoder, corpus_dir: Path, tmp_path: Path) -> None:
    first = knowledge(encoder, corpus_dir, tmp_path)
    first.sync(BUILTIN_LABEL_SETS)
    count = first.manifest["count"]
    write_old_layout(first.directory)

    counting = CountingEncoder(encoder.encode_texts)
    restarted = knowledge(encoder, corpus_dir, tmp_path, encode_texts=counting)
    assert sorted(restarted.sync(BUILTIN_LABEL_SETS)) == sorted(spec.name for spec in BUILTIN_LABEL_SETS)
    assert len(counting.texts) == count                                  # every description embedded again
    assert restarted.manifest["layout"] == INDEX_LAYOUT and restarted.manifest["count"] == count
    assert type(faiss.read_index(str(restarted.directory / "descriptions.faiss"))) is faiss.IndexFlatIP
    assert "id" not in json.loads((restarted.directory / "items.jsonl").read_text().splitlines()[0])
    assert len(restarted.retrieve(unit_rows(np.random.default_rng(1), 1, 64), "ham10000", "mel", 5)[0]) == 5


def test_label_set_writes_before_the_first_sync_are_only_recorded(encoder, corpus_dir: Path, tmp_path: Path) -> None:
    counting = CountingEncoder(encoder.encode_texts)
    kb = knowledge(encoder, corpus_dir, tmp_path / "a", encode_texts=counting)
    temporary = KNEE.model_copy(update={"name": "temporary"})
    assert kb.put_label_set(KNEE) is False and kb.put_label_set(temporary) is False
    assert kb.remove_label_set("temporary") is False
    assert counting.texts == [] and not kb.directory.exists() and kb.manifest == {}   # no embedding, no save
    assert kb.retrieve(unit_rows(np.random.default_rng(2), 1, 64), "knee", "oa", 3) == [[]]

    changed = kb.sync([*BUILTIN_LABEL_SETS, KNEE])                   # the store's list, as the runtime passes it
    assert sorted(changed) == sorted([spec.name for spec in BUILTIN_LABEL_SETS] + ["knee"])
    assert len(counting.texts) == kb.manifest["count"]                 # each description embedded once, by sync
    assert "temporary" not in kb.manifest["groups"]
    oa_vectors, oa_items = kb.class_descriptions("knee", "oa")
    assert [item.text for item in oa_items] == KNEE.classes[1].descriptions
    assert {r.text for r in kb.retrieve(oa_vectors[:1], "knee", "oa", 5)[0]} == set(KNEE.classes[1].descriptions)
    assert kb.put_label_set(temporary) is True                         # after the sync: embedded at once

    # a write recorded before the first sync survives a list read before it committed
    early = knowledge(encoder, corpus_dir, tmp_path / "b")
    early.put_label_set(KNEE)
    assert "knee" in early.sync(BUILTIN_LABEL_SETS) and early.class_descriptions("knee", "oa")[1] == oa_items


def test_new_wording_re_embeds_the_groups_it_changes(encoder, corpus_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    item = DescriptionItem("chest-xray-pneumonia", "chest-xray", "pneumonia", "pneumonia", "lobar consolidation",
                           "curated")
    assert item.prompt() == "a chest X-ray of pneumonia, which has lobar consolidation"
    assert DescriptionItem(**{**asdict(item), "modality": "knee-xray"}).prompt().startswith("a knee xray image of")
    knowledge(encoder, corpus_dir, tmp_path).sync(BUILTIN_LABEL_SETS)

    monkeypatch.setitem(domain.MODALITY_NOUNS, "chest-xray", "frontal chest radiograph")
    counting = CountingEncoder(encoder.encode_texts)
    reworded = knowledge(encoder, corpus_dir, tmp_path, encode_texts=counting)
    chest = sorted(spec.name for spec in BUILTIN_LABEL_SETS if spec.modality == "chest-xray")
    assert sorted(reworded.sync(BUILTIN_LABEL_SETS)) == chest           # only the chest X-ray groups
    assert counting.texts and all(text.startswith("a frontal chest radiograph of ") for text in counting.texts)


def test_a_leftover_retired_folder_does_not_block_saving(encoder, corpus_dir: Path, tmp_path: Path) -> None:
    kb = knowledge(encoder, corpus_dir, tmp_path)
    kb.sync(BUILTIN_LABEL_SETS)
    stale = kb.directory.with_name(f".{kb.directory.name}.old")      # what an interrupted save used to leave
    (stale / "index").mkdir(parents=True)
    (stale / "index" / "junk").write_text("x")
    spec = LabelSetSpec(name="knee", modality="knee-xray", classes=[{"name": "a", "descriptions": ["osteophytes"]},
                                                                    {"name": "b"}])
    assert kb.put_label_set(spec)
    assert knowledge(encoder, corpus_dir, tmp_path).sync([*BUILTIN_LABEL_SETS, spec]) == []   # saved and current
