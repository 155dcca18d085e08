"""`medzero kb generate` against a real local HTTP server that speaks OpenAI's /v1/chat/completions from a script:
parsing, retries and backoff, refusals, deduplication (tiny model and pinned vectors), all-or-nothing corpus writes,
and the job end to end."""
import json
import math
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import numpy as np
import pytest
import torch

from app.domain import LabelClass, LabelSetSpec
from app.encoders.loader import load_encoder
from app.errors import InvalidCorpus, LabelSetNotFound
from app.jobs import generate_descriptions as job
from app.knowledge.corpus import CorpusFile, Description, load_corpus_file, save_corpus_file
from app.knowledge.generate import (
    ChatClient,
    LLMNotConfigured,
    LLMUnavailable,
    build_prompt,
    deduplicate,
    find_duplicates,
    generate_descriptions,
    parse_descriptions,
    retry_delay_seconds,
)
from app.knowledge.index import DescriptionItem
from app.settings import BUNDLED_KNOWLEDGE_BASE_DIR, Settings
from app.storage.db import create_db_engine
from app.storage.label_sets import LabelSetRepository
from tests.conftest import TINY_MODEL, free_port

MODEL = "fake-med-llm-1"
API_KEY = "sk-test-secret-123"


# --- the fake endpoint ---------------------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int = 200
    content: str | None = None           # the assistant's text, for a 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""                       # the raw body of a non-200


def json_reply(descriptions: list[str]) -> Reply:
    return Reply(content=json.dumps(descriptions))


@dataclass
class Received:
    path: str
    headers: dict[str, str]              # lower-case names
    body: dict

    @property
    def prompt(self) -> str:
        return "\n".join(m["content"] for m in self.body["messages"])


class FakeLLM:
    """An OpenAI-compatible endpoint on 127.0.0.1. Each POST takes the next scripted reply (the last one repeats),
    or asks `responder`; every request is recorded."""

    def __init__(self) -> None:
        self.script: list[Reply] = [Reply(500, body="no script")]
        self.responder: Callable[[Received], Reply] | None = None
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                received = Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                    json.loads(self.rfile.read(length) or b"{}"))
                reply = fake._next(received)
                if reply.status == 200:
                    payload = json.dumps({"id": "x", "object": "chat.completion", "model": received.body.get("model"),
                                          "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                              "role": "assistant", "content": reply.content}}]}).encode()
                else:
                    payload = reply.body.encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def answer(self, *replies: Reply) -> None:
        self.script = list(replies)

    def _next(self, received: Received) -> Reply:
        with self._lock:
            self.requests.append(received)
            if self.responder is not None:
                return self.responder(received)
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


def llm_settings(tmp_path: Path, llm: FakeLLM, **overrides) -> Settings:
    values = {"data_dir": tmp_path, "knowledge_base_dir": tmp_path / "kb", "model_name": TINY_MODEL,
              "log_level": "warning", "llm_url": llm.url, "llm_model": MODEL, "llm_api_key": API_KEY,
              "llm_max_retries": 2, "llm_timeout_seconds": 5}
    return Settings(**{**values, **overrides})


def fast_client(settings: Settings) -> ChatClient:
    return ChatClient.from_settings(settings, backoff_base_seconds=0.01, max_backoff_seconds=0.05)


@pytest.fixture(scope="module")
def tiny_encode_texts(tmp_path_factory: pytest.TempPathFactory) -> Callable:
    return load_encoder(Settings(model_name=TINY_MODEL, data_dir=tmp_path_factory.mktemp("tiny"))).encode_texts


# --- parsing and the prompt ----------------------------------------------------------------------------------------

EXPECTED = ["patchy airspace opacities in the lower lobes", "air bronchograms within a dense consolidation"]


@pytest.mark.parametrize("answer", [
    '["patchy airspace opacities in the lower lobes", "air bronchograms within a dense consolidation."]',
    ('```json\n[\n  "patchy airspace opacities in the lower lobes",\n'
     '  "air bronchograms within a dense consolidation"\n]\n```'),
    ('Here are the descriptions:\n["patchy airspace opacities in the lower lobes", '
     '"air bronchograms within a dense consolidation"]'),
    ('{"descriptions": ["patchy airspace opacities in the lower lobes",\n'
     '                  "air bronchograms within a dense consolidation"]}'),
    "1. patchy airspace opacities in the lower lobes.\n2) \"air bronchograms within a dense consolidation\"",
    ("Here are 2 descriptions of pneumonia on a chest X-ray:\n\n- Patchy airspace opacities in the lower lobes\n"
     "* air bronchograms within a dense consolidation.\n\nI hope this helps."),
    "• **patchy airspace opacities in the lower lobes**\n• 'air bronchograms within a dense consolidation'",
    "patchy airspace opacities in the lower lobes\n\nair bronchograms within a dense consolidation\n",
], ids=["json", "fenced", "preamble-json", "json-object", "numbered", "bullets", "bold-quoted", "plain-lines"])
def test_parse_descriptions_variants(answer: str) -> None:
    assert [p.lower() for p in parse_descriptions(answer)] == EXPECTED


def test_parse_drops_empty_short_and_overlong_phrases() -> None:
    answer = json.dumps(["", "   ", "ok", "a.", "x" * 301, "y" * 300, "  a  wedge-shaped   opacity  "])
    assert parse_descriptions(answer) == ["y" * 300, "a wedge-shaped opacity"]
    assert parse_descriptions("1. \n2. ab\n3. a small nodule") == ["a small nodule"]
    assert parse_descriptions("") == []


def test_prompt_states_modality_class_siblings_and_count() -> None:
    messages = build_prompt("dermoscopy", "melanoma", 7, ["melanocytic nevus", "dermatofibroma"])
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "dermoscopy image" in user and '"melanoma"' in user and "7" in user
    assert '"melanocytic nevus"' in user and '"dermatofibroma"' in user
    assert "JSON array" in user
    # the sentence each description completes is the one the description index embeds it in
    indexed = DescriptionItem("ham10000", "dermoscopy", "mel", "melanoma", "...", "curated").prompt()
    assert indexed == "a dermoscopy image of melanoma, which has ..." and f'"{indexed}"' in user
    unknown = build_prompt("knee-mri", "meniscal tear", 3, [])[1]["content"]
    assert "knee mri image" in unknown
    assert "a knee mri image of meniscal tear, which has ..." in unknown


# --- the client ----------------------------------------------------------------------------------------------------

def test_client_sends_model_key_and_messages(tmp_path: Path, llm: FakeLLM) -> None:
    llm.answer(json_reply(EXPECTED))
    messages = build_prompt("chest-xray", "pneumonia", 2, ["normal lungs"])
    with fast_client(llm_settings(tmp_path, llm)) as client:
        answer = client.complete(messages, temperature=0.3)
    assert parse_descriptions(answer) == EXPECTED
    [request] = llm.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.body == {"model": MODEL, "messages": messages, "temperature": 0.3}


def test_client_without_key_sends_no_authorization(tmp_path: Path, llm: FakeLLM) -> None:
    llm.answer(json_reply(EXPECTED))
    with fast_client(llm_settings(tmp_path, llm, llm_api_key=None)) as client:
        client.complete([{"role": "user", "content": "hi"}], temperature=0.0)
    assert "authorization" not in llm.requests[0].headers


@pytest.mark.parametrize("failure", [
    Reply(500, body='{"error": {"message": "overloaded"}}'),
    Reply(503, body="upstream starting"),
    Reply(429, headers={"Retry-After": "1"}, body='{"error": {"message": "rate limited"}}'),
    Reply(429, headers={"Retry-After": format_datetime(datetime.now(UTC) + timedelta(seconds=5), usegmt=True)}),
], ids=["500", "503", "429-seconds", "429-date"])
def test_client_retries_then_succeeds(tmp_path: Path, llm: FakeLLM, failure: Reply) -> None:
    llm.answer(failure, failure, json_reply(EXPECTED))
    with fast_client(llm_settings(tmp_path, llm, llm_max_retries=2)) as client:
        assert parse_descriptions(client.complete([{"role": "user", "content": "hi"}])) == EXPECTED
    assert len(llm.requests) == 3


def test_retry_delay_is_exponential_honours_retry_after_and_is_capped() -> None:
    delays = [retry_delay_seconds(a, retry_after=None, base_seconds=0.5, cap_seconds=3.0) for a in range(5)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert retry_delay_seconds(0, retry_after="2", base_seconds=0.01, cap_seconds=10) == 2.0
    assert retry_delay_seconds(0, retry_after="120", base_seconds=0.01, cap_seconds=10) == 10.0
    in_4_seconds = format_datetime(datetime.now(UTC) + timedelta(seconds=4), usegmt=True)
    assert 2.0 < retry_delay_seconds(0, retry_after=in_4_seconds, base_seconds=0.01, cap_seconds=10) <= 4.0
    assert retry_delay_seconds(1, retry_after="soon", base_seconds=0.25, cap_seconds=10) == 0.5


def test_always_failing_endpoint_is_a_clear_error_after_all_retries(tmp_path: Path, llm: FakeLLM) -> None:
    llm.answer(Reply(500, body='{"error": {"message": "model crashed"}}'))
    with fast_client(llm_settings(tmp_path, llm, llm_max_retries=3)) as client, pytest.raises(LLMUnavailable) as caught:
        client.complete([{"role": "user", "content": "hi"}])
    assert len(llm.requests) == 4
    message = str(caught.value)
    assert llm.url in message and "MEDZERO_LLM_URL" in message and "HTTP 500" in message and "4 attempts" in message
    assert caught.value.status_code == 502 and caught.value.code == "llm_unavailable"


def test_unauthorised_is_not_retried_and_never_shows_the_key(tmp_path: Path, llm: FakeLLM) -> None:
    llm.answer(Reply(401, body=json.dumps({"error": {"message": f"Incorrect API key provided: {API_KEY}"}})))
    with fast_client(llm_settings(tmp_path, llm)) as client, pytest.raises(LLMUnavailable) as caught:
        client.complete([{"role": "user", "content": "hi"}])
    assert len(llm.requests) == 1
    message = str(caught.value)
    assert "HTTP 401" in message and "MEDZERO_LLM_API_KEY" in message and llm.url in message
    assert API_KEY not in message


def test_unknown_model_is_not_retried(tmp_path: Path, llm: FakeLLM) -> None:
    llm.answer(Reply(400, body='{"error": {"message": "model not found"}}'))
    with (fast_client(llm_settings(tmp_path, llm)) as client,
          pytest.raises(LLMUnavailable, match="MEDZERO_LLM_MODEL='fake-med-llm-1'")):
        client.complete([{"role": "user", "content": "hi"}])
    assert len(llm.requests) == 1


def test_not_found_names_the_url_setting(tmp_path: Path, llm: FakeLLM) -> None:
    llm.responder = lambda _request: Reply(404, body="")
    with (fast_client(llm_settings(tmp_path, llm, llm_url=llm.url + "/chat/completions")) as client,
          pytest.raises(LLMUnavailable, match="without /chat/completions")):
        client.complete([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(("overrides", "named"), [
    ({"llm_url": None}, "MEDZERO_LLM_URL"),
    ({"llm_model": None}, "MEDZERO_LLM_MODEL"),
    ({"llm_url": None, "llm_model": None}, "MEDZERO_LLM_URL and MEDZERO_LLM_MODEL"),
    ({"llm_url": "localhost:8001/v1"}, "http://"),
    ({"llm_model": "my model!"}, "MEDZERO_LLM_MODEL='my model!'"),
])
def test_missing_configuration_is_refused_before_any_request(tmp_path: Path, llm: FakeLLM, overrides: dict,
                                                             named: str) -> None:
    settings = llm_settings(tmp_path, llm, **overrides)
    with pytest.raises(LLMNotConfigured, match=named):
        generate_descriptions(settings, label_set=TOY, n_per_class=2, encode_texts=one_hot_encoder({}),
                              progress=False)
    assert llm.requests == [] and not (tmp_path / "kb").exists()


# --- deduplication -------------------------------------------------------------------------------------------------

def test_dedup_drops_exact_and_near_duplicates_with_the_tiny_model(tiny_encode_texts: Callable) -> None:
    existing = ["Clear lung fields without focal opacity."]
    candidates = [
        "clear  LUNG fields without focal opacity.",        # exact, up to case and whitespace
        "clear lung fields without focal opacity!",         # near: only the punctuation differs
        "blunted costophrenic angles",
        "Blunted costophrenic angles ",                     # exact repeat of an earlier candidate
        "an enlarged cardiac silhouette",
    ]
    features = tiny_encode_texts([existing[0], candidates[1]])
    assert float(features[0] @ features[1]) >= 0.95, "precondition: the tiny model maps these two together"
    result = find_duplicates(candidates, existing, tiny_encode_texts)
    assert result.dropped_exact == [candidates[0], candidates[3]]
    assert result.dropped_near == [candidates[1]]
    assert result.kept == ["blunted costophrenic angles", "an enlarged cardiac silhouette"]
    assert deduplicate(candidates, existing, tiny_encode_texts) == result.kept


def one_hot_encoder(angles: dict[str, float]) -> Callable:
    """A real encode_texts: each known phrase is the unit vector at its angle (degrees) in the plane; others get
    their own axis, orthogonal to everything."""
    others: dict[str, int] = {}

    def encode_texts(texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            vector = torch.zeros(2 + 16)
            if text in angles:
                vector[0], vector[1] = math.cos(math.radians(angles[text])), math.sin(math.radians(angles[text]))
            else:
                vector[2 + others.setdefault(text, len(others))] = 1.0
            rows.append(vector)
        return torch.stack(rows) if rows else torch.zeros(0, 18)

    return encode_texts


def test_near_duplicate_threshold_with_pinned_vectors() -> None:
    # cos(15 deg) = 0.966, cos(20 deg) = 0.940, cos(30 deg) = 0.866
    encode = one_hot_encoder({"existing": 90, "near existing": 75, "a": 0, "b": 15, "c": 30, "d": 50, "e": 70})
    result = find_duplicates(["a", "b", "c", "near existing", "d", "e"], ["existing"], encode)
    assert result.dropped_near == ["b", "near existing"]   # b repeats a; c is near only b, which was dropped
    assert result.kept == ["a", "c", "d", "e"]              # e is 20 deg from d and from "existing": kept at 0.95
    assert find_duplicates(["a", "b", "c"], [], encode, threshold=0.97).kept == ["a", "b", "c"]
    assert find_duplicates(["a", "b", "c"], [], encode, threshold=0.85).kept == ["a"]
    same_direction = one_hot_encoder({"a": 0, "a again": 0})
    assert find_duplicates(["a", "a again"], [], same_direction, threshold=1.0).dropped_near == ["a again"]  # >=
    assert find_duplicates(["A "], ["a"], encode).dropped_exact == ["A "]
    assert find_duplicates([], ["existing"], encode).kept == []


# --- the whole run: all or nothing ---------------------------------------------------------------------------------

TOY = LabelSetSpec(name="toy-cxr", modality="chest-xray", classes=[
    LabelClass(name="pneumonia", synonyms=["lung infection"]),
    LabelClass(name="no_finding", display_name="no finding", descriptions=["clear lungs"]),
])
CURATED = {"pneumonia": ["lobar consolidation with air bronchograms"], "no_finding": ["sharp costophrenic angles"]}


def write_curated(kb_dir: Path) -> Path:
    path = kb_dir / "toy-cxr.json"
    save_corpus_file(path, CorpusFile(label_set="toy-cxr", modality="chest-xray", classes={
        name: [Description(text=text, source="curated") for text in texts] for name, texts in CURATED.items()}))
    return path


def by_class(answers: dict[str, Reply]) -> Callable[[Received], Reply]:
    """Reply according to the class the prompt asks about."""
    def respond(request: Received) -> Reply:
        for term, reply in answers.items():
            if f'Class: "{term}"' in request.prompt:
                return reply
        return Reply(400, body="unexpected prompt")
    return respond


def test_generate_appends_llm_entries_and_keeps_curated(tmp_path: Path, llm: FakeLLM,
                                                        tiny_encode_texts: Callable) -> None:
    settings = llm_settings(tmp_path, llm)
    path = write_curated(settings.knowledge_base_dir)
    llm.responder = by_class({
        "pneumonia": Reply(content="Here you go:\n1. Lobar consolidation with air bronchograms.\n"
                                   "2. patchy perihilar opacities\n3. a parapneumonic pleural effusion\n"
                                   "4. patchy perihilar opacities"),
        "no finding": Reply(content='```json\n["CLEAR LUNGS", "a normal cardiac silhouette"]\n```'),
    })
    report = generate_descriptions(settings, label_set=TOY, n_per_class=4, encode_texts=tiny_encode_texts,
                                   client=fast_client(settings), progress=False)

    prompts = [r.prompt for r in llm.requests]
    assert len(prompts) == 2 and all("chest X-ray" in p for p in prompts)
    assert '"pneumonia"' in prompts[0] and '"no finding"' in prompts[0]   # the class and its sibling
    assert all(r.body["model"] == MODEL for r in llm.requests)

    corpus = load_corpus_file(path)
    assert corpus.classes["pneumonia"] == [
        Description(text="lobar consolidation with air bronchograms", source="curated"),
        Description(text="patchy perihilar opacities", source=f"llm:{MODEL}"),
        Description(text="a parapneumonic pleural effusion", source=f"llm:{MODEL}")]
    assert corpus.classes["no_finding"] == [
        Description(text="sharp costophrenic angles", source="curated"),
        Description(text="a normal cardiac silhouette", source=f"llm:{MODEL}")]   # "clear lungs" is in the spec

    assert report.corpus_path == path and report.source == f"llm:{MODEL}" and report.kept == 3
    pneumonia, no_finding = report.classes
    assert (pneumonia.requested, pneumonia.parsed, pneumonia.kept, pneumonia.dropped_exact) == (4, 4, 2, 2)
    assert (no_finding.parsed, no_finding.kept, no_finding.dropped_exact) == (2, 1, 1)
    assert "toy-cxr.json" in report.render()


def test_generate_starts_a_corpus_file_when_there_is_none(tmp_path: Path, llm: FakeLLM) -> None:
    settings = llm_settings(tmp_path, llm)
    llm.responder = by_class({"pneumonia": json_reply(["patchy opacities", "air bronchograms"]),
                              "no finding": json_reply(["a normal heart size"])})
    report = generate_descriptions(settings, label_set=TOY, n_per_class=1, encode_texts=one_hot_encoder({}),
                                   client=fast_client(settings), progress=False)
    corpus = load_corpus_file(settings.knowledge_base_dir / "toy-cxr.json")
    assert (corpus.label_set, corpus.modality) == ("toy-cxr", "chest-xray")
    assert corpus.texts("pneumonia") == ["patchy opacities"]        # cut to the number asked for
    assert corpus.texts("no_finding") == ["a normal heart size"]
    assert report.classes[0].parsed == 2 and report.classes[0].kept == 1


@pytest.mark.parametrize("down", ["always-500", "refused"])
def test_endpoint_down_leaves_the_corpus_byte_for_byte(tmp_path: Path, llm: FakeLLM, down: str) -> None:
    settings = llm_settings(tmp_path, llm)
    if down == "refused":
        settings = llm_settings(tmp_path, llm, llm_url=f"http://127.0.0.1:{free_port()}/v1")
    llm.answer(Reply(500, body="internal error"))
    path = write_curated(settings.knowledge_base_dir)
    before = path.read_bytes()
    with pytest.raises(LLMUnavailable, match="MEDZERO_LLM_URL"):
        generate_descriptions(settings, label_set=TOY, n_per_class=3, encode_texts=one_hot_encoder({}),
                              client=fast_client(settings), progress=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in settings.knowledge_base_dir.iterdir()) == ["toy-cxr.json"]   # no temp files
    assert len(llm.requests) == (3 if down == "always-500" else 0)


@pytest.mark.parametrize("existing_file", [True, False], ids=["curated-file", "no-file"])
def test_a_later_class_failing_writes_nothing(tmp_path: Path, llm: FakeLLM, existing_file: bool) -> None:
    settings = llm_settings(tmp_path, llm)
    path = settings.knowledge_base_dir / "toy-cxr.json"
    if existing_file:
        write_curated(settings.knowledge_base_dir)
    before = path.read_bytes() if existing_file else None
    llm.answer(json_reply(["patchy perihilar opacities"]), Reply(503, body="gone"))
    with pytest.raises(LLMUnavailable):
        generate_descriptions(settings, label_set=TOY, n_per_class=1, encode_texts=one_hot_encoder({}),
                              client=fast_client(settings), progress=False)
    assert len(llm.requests) == 1 + 3      # the first class answered; the second failed three times
    if existing_file:
        assert path.read_bytes() == before
    else:
        assert not path.exists()


def test_a_malformed_corpus_is_refused_before_any_request(tmp_path: Path, llm: FakeLLM) -> None:
    settings = llm_settings(tmp_path, llm)
    path = settings.knowledge_base_dir / "toy-cxr.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"schema_version": 1, "label_set": "toy-cxr"', encoding="utf-8")
    with pytest.raises(InvalidCorpus):
        generate_descriptions(settings, label_set=TOY, n_per_class=1, encode_texts=one_hot_encoder({}),
                              client=fast_client(settings), progress=False)
    assert llm.requests == []


# --- the job -------------------------------------------------------------------------------------------------------

def test_job_generates_for_a_builtin_label_set_end_to_end(tmp_path: Path, llm: FakeLLM) -> None:
    settings = llm_settings(tmp_path, llm)
    settings.knowledge_base_dir.mkdir()
    path = settings.knowledge_base_dir / "chest-xray-pneumonia.json"
    shutil.copyfile(BUNDLED_KNOWLEDGE_BASE_DIR / "chest-xray-pneumonia.json", path)
    bundled = load_corpus_file(path)
    llm.responder = by_class({
        "normal lungs": json_reply(["symmetric lung volumes on inspiration",
                                    "clear lung fields without focal opacity"]),   # the bundled file has this one
        "pneumonia": Reply(content="1. a dense right middle lobe opacity obscuring the heart border\n"
                                   "2. bilateral patchy peribronchial thickening"),
    })
    report = job.main(settings, "chest-xray-pneumonia", 2, progress=False)

    corpus = load_corpus_file(path)
    for name, curated in bundled.classes.items():
        assert corpus.classes[name][:len(curated)] == curated
        assert all(d.source == f"llm:{MODEL}" for d in corpus.classes[name][len(curated):])
    assert corpus.texts("normal")[len(bundled.classes["normal"]):] == ["symmetric lung volumes on inspiration"]
    assert corpus.texts("pneumonia")[len(bundled.classes["pneumonia"]):] == [
        "a dense right middle lobe opacity obscuring the heart border", "bilateral patchy peribronchial thickening"]
    assert [c.class_name for c in report.classes] == ["normal", "pneumonia"] and report.kept == 3
    assert all("chest X-ray" in r.prompt for r in llm.requests) and len(llm.requests) == 2


def test_job_finds_registered_label_sets_first_then_builtins(tmp_path: Path, llm: FakeLLM) -> None:
    settings = llm_settings(tmp_path, llm)
    registered = TOY.model_copy(update={"name": "chest-xray-pneumonia", "modality": "fundus"})
    repository = LabelSetRepository(create_db_engine(settings.resolved_database_url))
    repository.create(registered, model_id="x", class_embeddings=np.zeros((2, 4), dtype=np.float32))
    assert job.find_label_set(repository, "chest-xray-pneumonia").modality == "fundus"
    assert job.find_label_set(repository, "ham10000").modality == "dermoscopy"
    with pytest.raises(LabelSetNotFound, match="no-such-set"):
        job.main(settings, "no-such-set", 2, progress=False)
    assert llm.requests == []
