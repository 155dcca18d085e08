"""The bundled corpus and the corpus file format."""
import json
from pathlib import Path

import pytest

from app.errors import InvalidCorpus
from app.knowledge.corpus import CorpusFile, Description, corpus_hash, load_corpus, load_corpus_file, save_corpus_file
from app.services.builtin_label_sets import BUILTIN_LABEL_SETS
from app.settings import BUNDLED_KNOWLEDGE_BASE_DIR


def test_every_builtin_class_has_fifty_distinct_descriptions() -> None:
    corpora = load_corpus(BUNDLED_KNOWLEDGE_BASE_DIR)
    for spec in BUILTIN_LABEL_SETS:
        corpus = corpora[spec.name]
        assert corpus.modality == spec.modality
        assert set(corpus.classes) == {c.name for c in spec.classes}
        seen: set[str] = set()
        for class_name, descriptions in corpus.classes.items():
            texts = {" ".join(d.text.lower().split()) for d in descriptions}
            assert len(texts) == len(descriptions) >= 50, f"{spec.name}/{class_name}"
            assert not texts & seen, f"{spec.name}/{class_name} repeats a sibling's description"
            seen |= texts
            assert all(d.source == "curated" or d.source.startswith("llm:") for d in descriptions)


def write(path: Path, body: dict) -> Path:
    path.write_text(json.dumps(body))
    return path


GOOD = {"schema_version": 1, "label_set": "demo", "modality": "chest-xray",
        "classes": {"a": [{"text": "a sharp costophrenic angle", "source": "curated"}]}}


@pytest.mark.parametrize("body, fragment", [
    ({**GOOD, "classes": {"a": [{"text": "ok text", "source": "curated"}, {"text": "x", "source": "curated"}]}},
     "classes.a[1].text"),
    ({**GOOD, "classes": {"a": [{"text": "fine text", "source": "gpt"}]}}, "classes.a[0].source"),
    ({**GOOD, "schema_version": 2}, "schema_version"),
    ({**GOOD, "label_set": "other"}, "does not match the file name"),
])
def test_malformed_files_name_the_file_and_entry(tmp_path: Path, body: dict, fragment: str) -> None:
    path = write(tmp_path / "demo.json", body)
    with pytest.raises(InvalidCorpus, match="demo.json") as raised:
        load_corpus_file(path)
    assert fragment in str(raised.value)


def test_not_json_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "demo.json").write_text('{"schema_version": 1,')
    with pytest.raises(InvalidCorpus, match=r"demo.json: not JSON"):
        load_corpus(tmp_path)


def test_save_is_atomic_and_round_trips(tmp_path: Path) -> None:
    corpus = CorpusFile.model_validate(GOOD)
    path = tmp_path / "demo.json"
    save_corpus_file(path, corpus)
    before = corpus_hash({"demo": load_corpus_file(path)})
    corpus.classes["a"].append(Description(text="an enlarged cardiac silhouette", source="llm:test-model"))
    save_corpus_file(path, corpus)
    assert load_corpus_file(path).texts("a")[-1] == "an enlarged cardiac silhouette"
    assert corpus_hash({"demo": load_corpus_file(path)}) != before
    assert [p.name for p in tmp_path.iterdir()] == ["demo.json"]     # no temp files left behind
