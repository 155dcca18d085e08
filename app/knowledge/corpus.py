"""The description corpus: per label set, per class, short visual descriptions with their provenance.

One JSON file per label set under knowledge_base/ (schema below), validated on load: a malformed file is an
InvalidCorpus error naming the file and the entry. Writes go to a temporary file and are renamed into place,
so a crash never leaves a half-written corpus.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from app.domain import Slug
from app.errors import InvalidCorpus

SourceTag = Annotated[str, StringConstraints(pattern=r"^(curated|llm:[\w.:/@+-]{1,120})$")]
DescriptionText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=300)]


class Description(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text: DescriptionText
    source: SourceTag = Field(description="'curated', or 'llm:<model>' for generated descriptions")


class CorpusFile(BaseModel):
    """knowledge_base/<label_set>.json"""
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    label_set: Slug
    modality: Slug
    classes: dict[str, list[Description]]

    def texts(self, class_name: str) -> list[str]:
        return [d.text for d in self.classes.get(class_name, [])]


def load_corpus_file(path: Path) -> CorpusFile:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidCorpus(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidCorpus(f"{path}: not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    try:
        corpus = CorpusFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _entry_path(first["loc"])
        raise InvalidCorpus(f"{path}: entry {where}: {first['msg']}"
                            + (f" ({len(exc.errors())} problems in all)" if len(exc.errors()) > 1 else "")) from exc
    if corpus.label_set != path.stem:
        raise InvalidCorpus(f"{path}: label_set {corpus.label_set!r} does not match the file name {path.stem!r}")
    return corpus


def load_corpus(directory: Path) -> dict[str, CorpusFile]:
    """Every corpus file in `directory`, by label-set name (an absent directory is an empty corpus)."""
    if not directory.is_dir():
        return {}
    return {path.stem: load_corpus_file(path) for path in sorted(directory.glob("*.json"))}


def corpus_hash(corpora: dict[str, CorpusFile]) -> str:
    """Content hash of a whole corpus: the index manifest records it to know when to rebuild."""
    canonical = json.dumps({name: corpus.model_dump(mode="json") for name, corpus in sorted(corpora.items())},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def save_corpus_file(path: Path, corpus: CorpusFile) -> None:
    """Write atomically: a temp file in the same folder, fsync'd, then renamed over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(corpus.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _entry_path(location: tuple) -> str:
    parts = []
    for part in location:
        parts.append(f"[{part}]" if isinstance(part, int) else (f".{part}" if parts else str(part)))
    return "".join(parts) or "(top level)"
