"""The bundled corpus and the corpus file format."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.errors import InvalidCorpus
from app.knowledge.corpus import CorpusFile, Description, corpus_hash, load_corpus, load_corpus_file, save_corpus_file
from app.services.builtin_label_sets import BUILTIN_LABEL_SETS
from app.settings import BUNDLED_KNOWLEDGE_BASE_DIR

ROOT = Path(__file__).resolve().parents[2]


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


def test_save_round_trips(tmp_path: Path) -> None:
    corpus = CorpusFile.model_validate(GOOD)
    path = tmp_path / "demo.json"
    save_corpus_file(path, corpus)
    before = corpus_hash({"demo": load_corpus_file(path)})
    corpus.classes["a"].append(Description(text="an enlarged cardiac silhouette", source="llm:test-model"))
    save_corpus_file(path, corpus)
    assert load_corpus_file(path).texts("a")[-1] == "an enlarged cardiac silhouette"
    assert corpus_hash({"demo": load_corpus_file(path)}) != before
    assert [p.name for p in tmp_path.iterdir()] == ["demo.json"]     # no temp files left behind


# In a child process whose file-size limit (RLIMIT_FSIZE) sits just above the old file's size, saving a much larger
# corpus fails part-way with EFBIG (SIGXFSZ ignored, so the write raises instead of killing the process).
SAVE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
from app.knowledge.corpus import CorpusFile, Description, save_corpus_file

path, limit = Path(sys.argv[1]), int(sys.argv[2])
larger = CorpusFile(label_set="demo", modality="chest-xray", classes={"a": [
    Description(text=f"a description long enough to matter, number {i}", source="curated") for i in range(500)]})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_corpus_file(path, larger)
except OSError as exc:
    print(f"OSError errno={exc.errno}")
    sys.exit(3)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_save_that_fails_part_way_leaves_the_old_file_whole(tmp_path: Path) -> None:
    """Writing in place would truncate demo.json and leave ~limit bytes of the new text in it; a temp file renamed
    over it leaves the old file as it was, and the failed temp file is removed."""
    path = tmp_path / "demo.json"
    old = CorpusFile.model_validate(GOOD)
    save_corpus_file(path, old)
    old_bytes = path.read_bytes()
    limit = len(old_bytes) + 512
    saved = subprocess.run([sys.executable, "-c", SAVE_UNDER_A_FILE_SIZE_LIMIT, str(path), str(limit)],
                           cwd=ROOT, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, check=False,
                           capture_output=True, text=True, timeout=120)
    assert saved.returncode == 3, saved.stdout + saved.stderr
    assert f"OSError errno={errno.EFBIG}" in saved.stdout                # it failed writing, not somewhere else
    assert path.read_bytes() == old_bytes
    assert load_corpus_file(path) == old
    assert [p.name for p in tmp_path.iterdir()] == ["demo.json"]       # the half-written temp file is gone
