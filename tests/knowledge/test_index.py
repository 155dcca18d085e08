"""The description index: built once, loaded on restart, re-embedded only where the corpus or a label set changed."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.domain import LabelSetSpec
from app.encoders.loader import load_encoder
from app.knowledge.knowledge_base import KnowledgeBase
from app.services.builtin_label_sets import BUILTIN_LABEL_SETS
from app.settings import BUNDLED_KNOWLEDGE_BASE_DIR, Settings


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(Settings(model_name="medzero-tiny"))


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    shutil.copytree(BUNDLED_KNOWLEDGE_BASE_DIR, folder)
    return folder


def knowledge(encoder, corpus_dir: Path, data_dir: Path, model_id: str | None = None) -> KnowledgeBase:
    return KnowledgeBase(corpus_dir=corpus_dir, data_dir=data_dir, model_id=model_id or encoder.model_id, dim=64,
                         encode_texts=encoder.encode_texts)


def test_build_restart_and_corpus_change(encoder, corpus_dir: Path, tmp_path: Path) -> None:
    first = knowledge(encoder, corpus_dir, tmp_path)
    assert sorted(first.sync(BUILTIN_LABEL_SETS)) == sorted(spec.name for spec in BUILTIN_LABEL_SETS)
    manifest = first.manifest
    assert manifest["count"] == sum(len(d) for f in corpus_dir.glob("*.json")
                                    for d in json.loads(f.read_text())["classes"].values())
    assert manifest["dim"] == 64 and manifest["model_id"] == "medzero-tiny" and len(manifest["corpus_hash"]) == 64
    assert (first.directory / "manifest.json").is_file() and (first.directory / "descriptions.faiss").is_file()

    restarted = knowledge(encoder, corpus_dir, tmp_path)
    assert restarted.sync(BUILTIN_LABEL_SETS) == []                 # loaded, nothing re-embedded
    assert restarted.manifest["built_at"] == manifest["built_at"]

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
    spec = LabelSetSpec(name="knee", modality="knee-xray", classes=[
        {"name": "normal", "descriptions": ["a uniform joint space", "smooth articular surfaces"]},
        {"name": "oa", "descriptions": ["marginal osteophytes", "subchondral sclerosis", "joint space narrowing"]}])
    assert kb.put_label_set(spec)
    after = kb.manifest
    assert after["count"] == before["count"] + 5
    assert {k: v for k, v in after["groups"].items() if k != "knee"} == before["groups"]   # others untouched
    assert not kb.put_label_set(spec)                                   # unchanged: nothing to do
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
