"""`medzero kb generate`: more visual descriptions per class from an OpenAI-compatible chat-completions endpoint.

For each class of a label set: one chat completion (a prompt that names the modality, the class and its siblings),
parsed into phrases, deduplicated against what the corpus already holds -- exactly (case and whitespace folded) and
then by cosine similarity of the text embeddings -- and collected. Only when every class has its answer is the
corpus file re-read, appended to (source ``llm:<model>``) and saved atomically: a failing endpoint leaves the file
exactly as it was. The client retries connection errors, timeouts, 429 and 5xx with exponential backoff (Retry-After
honoured, capped); any other 4xx is the caller's mistake and is raised at once.

Imports leaves only (settings, errors, domain, corpus); the text encoder comes in as a function.
"""
import email.utils
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Self

import httpx
import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from app.domain import LabelSetSpec, modality_noun
from app.errors import BadRequest, LLMNotConfigured, LLMUnavailable
from app.knowledge.corpus import CorpusFile, Description, load_corpus_file, save_corpus_file
from app.settings import Settings

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

EncodeTexts = Callable[[Sequence[str]], "Tensor"]   # n strings -> (n, dim), L2-normalised

MIN_DESCRIPTION_CHARS = 3                   # the corpus schema's bounds (app.knowledge.corpus.DescriptionText)
MAX_DESCRIPTION_CHARS = 300
MAX_DESCRIPTIONS_PER_REQUEST = 100          # one completion; more than this and models cut the list short
NEAR_DUPLICATE_THRESHOLD = 0.95             # cosine similarity of text embeddings at or above which a phrase repeats
ENCODE_CHUNK = 256                          # texts per encode_texts call while deduplicating


# --- the client ----------------------------------------------------------------------------------------------------

class ChatClient:
    """A synchronous client for one OpenAI-compatible ``/chat/completions`` endpoint, with retries."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout_seconds: float = 60.0,
                 max_retries: int = 4, backoff_base_seconds: float = 1.0, max_backoff_seconds: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.backoff_base_seconds = backoff_base_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self._api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout_seconds, headers=headers)

    @classmethod
    def from_settings(cls, settings: Settings, *, backoff_base_seconds: float = 1.0,
                      max_backoff_seconds: float = 30.0) -> "ChatClient":
        check_llm_settings(settings)
        return cls(settings.llm_url, settings.llm_model, api_key=settings.llm_api_key,
                   timeout_seconds=settings.llm_timeout_seconds, max_retries=settings.llm_max_retries,
                   backoff_base_seconds=backoff_base_seconds, max_backoff_seconds=max_backoff_seconds)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def complete(self, messages: list[dict], *, temperature: float = 0.7) -> str:
        """The assistant's answer to `messages`. Raises LLMUnavailable when the endpoint cannot give one."""
        endpoint = f"{self.url}/chat/completions"
        body = {"model": self.model, "messages": messages, "temperature": temperature}
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            retry_after = None
            try:
                response = self._http.post(endpoint, json=body)
            except httpx.TransportError as exc:   # refused, reset, DNS, timeouts
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.is_success:
                    return self._content(response)
                if response.status_code != 429 and response.status_code < 500:
                    raise LLMUnavailable(self._refusal(response))
                failure = f"HTTP {response.status_code}{self._detail(response)}"
                retry_after = response.headers.get("retry-after")
            if attempt + 1 < attempts:
                delay = retry_delay_seconds(attempt, retry_after=retry_after, base_seconds=self.backoff_base_seconds,
                                            cap_seconds=self.max_backoff_seconds)
                log.warning("LLM request to %s failed (%s); retry %d/%d in %.2f s", self._shown_url, failure,
                            attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise LLMUnavailable(f"the LLM endpoint {self._shown_url} (MEDZERO_LLM_URL) gave no answer after {attempts} "
                             f"attempt{'s' if attempts != 1 else ''}: {failure}; check that it is running and "
                             "reachable (retries: MEDZERO_LLM_MAX_RETRIES, timeout: MEDZERO_LLM_TIMEOUT_SECONDS)")

    @property
    def _shown_url(self) -> str:
        """The base URL without any user:password part."""
        url = httpx.URL(self.url)
        return str(url.copy_with(username=None, password=None)) if url.userinfo else self.url

    def _content(self, response: httpx.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError) as exc:
            raise LLMUnavailable(f"the LLM endpoint {self._shown_url} (MEDZERO_LLM_URL) answered HTTP "
                                 f"{response.status_code} without choices[0].message.content; is it an "
                                 "OpenAI-compatible /chat/completions endpoint?") from exc
        if not isinstance(content, str):
            raise LLMUnavailable(f"the LLM endpoint {self._shown_url} (MEDZERO_LLM_URL) answered with no text "
                                 f"content for model {self.model!r} (MEDZERO_LLM_MODEL)")
        return content

    def _refusal(self, response: httpx.Response) -> str:
        status = response.status_code
        where = f"the LLM endpoint {self._shown_url} (MEDZERO_LLM_URL) refused the request with HTTP {status}"
        if status in (401, 403):
            hint = "check MEDZERO_LLM_API_KEY"
        elif status == 404:
            hint = ("check MEDZERO_LLM_URL (the base URL, usually ending in /v1, without /chat/completions) "
                    f"and MEDZERO_LLM_MODEL={self.model!r}")
        else:
            hint = f"check MEDZERO_LLM_MODEL={self.model!r}"
        return f"{where}{self._detail(response)}; {hint}"

    def _detail(self, response: httpx.Response) -> str:
        """A short reason from the error body ({"error": {"message"}} or plain text), never the API key."""
        try:
            payload = response.json()
            message = payload["error"]["message"] if isinstance(payload.get("error"), dict) else payload["error"]
        except (ValueError, LookupError, TypeError, AttributeError):
            message = response.text
        message = " ".join(str(message).split())[:200]
        if self._api_key:
            message = message.replace(self._api_key, "***")
        return f" ({message})" if message else ""


def retry_delay_seconds(attempt: int, *, retry_after: str | None, base_seconds: float, cap_seconds: float) -> float:
    """Seconds to wait before retry number `attempt` + 1: the server's Retry-After (seconds or an HTTP date) when it
    sent one, else base * 2**attempt; never more than `cap_seconds`."""
    delay = base_seconds * 2 ** attempt
    if retry_after:
        try:
            delay = float(retry_after)
        except ValueError:
            try:
                delay = (email.utils.parsedate_to_datetime(retry_after) - datetime.now(UTC)).total_seconds()
            except (TypeError, ValueError):
                pass
    return min(max(delay, 0.0), cap_seconds)


def check_llm_settings(settings: Settings) -> None:
    """Refuse before any work when the endpoint or the model is not configured, or the model cannot be a source tag."""
    required = (("MEDZERO_LLM_URL", settings.llm_url), ("MEDZERO_LLM_MODEL", settings.llm_model))
    missing = [name for name, value in required if not value]
    if missing:
        raise LLMNotConfigured(f"{' and '.join(missing)} must be set to generate descriptions (an OpenAI-compatible "
                               "endpoint, e.g. MEDZERO_LLM_URL=http://localhost:8001/v1, and the model it serves)")
    if not settings.llm_url.startswith(("http://", "https://")):
        raise LLMNotConfigured(f"MEDZERO_LLM_URL={settings.llm_url!r} must start with http:// or https://")
    try:
        Description(text="probe", source=f"llm:{settings.llm_model}")
    except ValidationError as exc:
        raise LLMNotConfigured(f"MEDZERO_LLM_MODEL={settings.llm_model!r} cannot be recorded as the source "
                               "'llm:<model>' (letters, digits and . : / @ + - _ only, at most 120)") from exc


# --- prompt and answer ---------------------------------------------------------------------------------------------

def build_prompt(modality: str, class_term: str, n: int, sibling_terms: list[str]) -> list[dict]:
    """System and user messages asking for `n` visual descriptions of one class, as seen on this modality. Each is
    asked to complete the sentence the description index embeds it in ("a chest X-ray of pneumonia, which has
    ..."; app.knowledge.index.DESCRIPTION_PROMPT), with the modality named as there (app.domain.modality_noun)."""
    image = modality_noun(modality)
    siblings = ", ".join(f'"{term}"' for term in sibling_terms) or "none"
    system = ("You are a medical imaging expert. You write short, precise descriptions of what findings look like "
              "in images, for a vision-language model that classifies images by comparing them with text.")
    user = (f"Imaging modality: {image}.\n"
            f'Class: "{class_term}".\n'
            f"Other classes it must be told apart from: {siblings}.\n\n"
            f'Write {n} different short descriptions of what "{class_term}" looks like on a {image}: the visual '
            "features a reader sees in the image (shape, size, location, density or colour, texture, borders, "
            "distribution).\n"
            f'Each is a noun phrase of at most 15 words that completes the sentence "a {image} of {class_term}, '
            'which has ...", '
            "not a full sentence.\n"
            f"Describe only what is visible on a {image}: no symptoms, history, causes or treatment.\n"
            f'Prefer features that distinguish "{class_term}" from the other classes.\n\n'
            f"Answer with a JSON array of {n} strings and nothing else (one description per line also works).")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.DOTALL)
_LIST_MARKER = re.compile(r"^\s*(?:[-*+•–—]|\(?\d{1,3}[.):\]]|\d{1,3}\s+-)\s+")
_QUOTES = "\"'`“”‘’«»"


def parse_descriptions(text: str) -> list[str]:
    """Phrases from an LLM answer: a JSON array (bare, fenced, or after a preamble), else numbered or bulleted lines
    (else plain lines). Numbering, bullets, quotes and trailing periods go; phrases outside 3-300 characters go."""
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    items = _json_items(body)
    if items is None:
        lines = [line for line in body.splitlines() if line.strip()]
        marked = [line for line in lines if _LIST_MARKER.match(line)]
        items = [_LIST_MARKER.sub("", line, count=1) for line in marked] if marked else [
            line for line in lines if not line.rstrip().endswith(":")]   # a plain list: drop "Here are ...:" lines
    phrases = (_clean(item) for item in items)
    return [p for p in phrases if MIN_DESCRIPTION_CHARS <= len(p) <= MAX_DESCRIPTION_CHARS]


def _json_items(body: str) -> list[str] | None:
    """The strings of a JSON array in `body` ({"descriptions": [...]} too), or None when there is none."""
    candidates = [body.strip()]
    start, end = body.find("["), body.rfind("]")
    if 0 <= start < end:
        candidates.append(body[start:end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            value = next((v for v in value.values() if isinstance(v, list)), None)
        if isinstance(value, list):
            return [item if isinstance(item, str) else str(item.get("text") or item.get("description") or "")
                    for item in value if isinstance(item, (str, dict))]
    return None


def _clean(phrase: str) -> str:
    previous = None
    while phrase != previous:
        previous = phrase
        phrase = phrase.strip().strip("*_").strip().strip(_QUOTES).strip().rstrip(".,;").strip()
    return " ".join(phrase.split())


# --- deduplication -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Deduplication:
    kept: list[str]
    dropped_exact: list[str]
    dropped_near: list[str]


def deduplicate(candidates: list[str], existing: list[str], encode_texts: EncodeTexts, *,
                threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[str]:
    """The candidates that repeat neither the existing phrases nor an earlier kept candidate, in their order."""
    return find_duplicates(candidates, existing, encode_texts, threshold=threshold).kept


def find_duplicates(candidates: list[str], existing: list[str], encode_texts: EncodeTexts, *,
                    threshold: float = NEAR_DUPLICATE_THRESHOLD) -> Deduplication:
    """Exact repeats first (case and whitespace folded), then near repeats: cosine similarity >= `threshold` to an
    existing phrase or to a candidate already kept (one dropped as a repeat is no reference for later ones)."""
    seen = {_fold(text) for text in existing}
    unique, dropped_exact = [], []
    for text in candidates:
        key = _fold(text)
        (dropped_exact if key in seen else unique).append(text)
        seen.add(key)
    if not unique:
        return Deduplication([], dropped_exact, [])
    features = _encode(list(existing) + unique, encode_texts)             # (n_existing + n_unique, dim)
    reference = list(range(len(existing)))                                 # rows a new phrase must not repeat
    kept, dropped_near = [], []
    for offset, text in enumerate(unique):
        row = len(existing) + offset
        if reference and float((features[reference] @ features[row]).max()) >= threshold:
            dropped_near.append(text)
        else:
            kept.append(text)
            reference.append(row)
    return Deduplication(kept, dropped_exact, dropped_near)


def _fold(text: str) -> str:
    return " ".join(text.casefold().split())


def _encode(texts: list[str], encode_texts: EncodeTexts) -> np.ndarray:
    chunks = [np.asarray(encode_texts(texts[i:i + ENCODE_CHUNK]), dtype=np.float32)
              for i in range(0, len(texts), ENCODE_CHUNK)]
    features = np.concatenate(chunks)
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


# --- the whole run -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassReport:
    class_name: str
    requested: int
    parsed: int            # phrases in the answer (more than requested are cut to `requested` before dedup)
    kept: int
    dropped_exact: int
    dropped_near: int


@dataclass(frozen=True)
class GenerationReport:
    label_set: str
    source: str            # llm:<model>, as written to each new entry
    corpus_path: Path
    classes: tuple[ClassReport, ...]

    @property
    def kept(self) -> int:
        return sum(c.kept for c in self.classes)

    def render(self) -> str:
        """A plain-text table for the CLI."""
        width = max(len("class"), *(len(c.class_name) for c in self.classes))
        lines = [f"{'class':<{width}}  requested  parsed  kept  dropped_exact  dropped_near"]
        lines += [f"{c.class_name:<{width}}  {c.requested:>9}  {c.parsed:>6}  {c.kept:>4}  {c.dropped_exact:>13}  "
                  f"{c.dropped_near:>12}" for c in self.classes]
        lines.append(f"{self.kept} new descriptions ({self.source}) appended to {self.corpus_path}")
        return "\n".join(lines)


def generate_descriptions(settings: Settings, *, label_set: LabelSetSpec, n_per_class: int,
                          encode_texts: EncodeTexts, client: ChatClient | None = None, progress: bool = True,
                          temperature: float = 0.7, threshold: float = NEAR_DUPLICATE_THRESHOLD) -> GenerationReport:
    """Ask for `n_per_class` descriptions of every class, deduplicate, and append them all to
    <knowledge_base_dir>/<label set>.json -- or, if any request fails, write nothing and raise."""
    check_llm_settings(settings)
    if not 1 <= n_per_class <= MAX_DESCRIPTIONS_PER_REQUEST:
        raise BadRequest(f"descriptions per class must be between 1 and {MAX_DESCRIPTIONS_PER_REQUEST}, "
                         f"not {n_per_class}")
    path = settings.knowledge_base_dir / f"{label_set.name}.json"
    before = _load_or_new(path, label_set)           # fail on a malformed corpus before spending any requests
    source = f"llm:{settings.llm_model}"
    own_client = client is None
    client = client or ChatClient.from_settings(settings)
    results: dict[str, tuple[int, Deduplication]] = {}    # class name -> (phrases parsed, what dedup kept)
    try:
        for label_class in tqdm(label_set.classes, desc=f"describing {label_set.name}", unit="class",
                                disable=not progress):
            term = label_class.terms()[0]
            siblings = [c.terms()[0] for c in label_set.classes if c.name != label_class.name]
            answer = client.complete(build_prompt(label_set.modality, term, n_per_class, siblings),
                                     temperature=temperature)
            parsed = parse_descriptions(answer)
            if not parsed:
                log.warning("the LLM's answer for class %r held no descriptions: %.200r", label_class.name, answer)
            existing = before.texts(label_class.name) + list(label_class.descriptions)
            results[label_class.name] = len(parsed), find_duplicates(parsed[:n_per_class], existing, encode_texts,
                                                                     threshold=threshold)
    finally:
        if own_client:
            client.close()
    corpus = _load_or_new(path, label_set)           # again: someone may have edited it while we waited
    reports = []
    for class_name, (n_parsed, result) in results.items():
        present = {_fold(text) for text in corpus.texts(class_name)}
        additions = [Description(text=text, source=source) for text in result.kept if _fold(text) not in present]
        corpus.classes[class_name] = corpus.classes.get(class_name, []) + additions
        reports.append(ClassReport(class_name, n_per_class, n_parsed, len(additions),
                                   len(result.dropped_exact) + len(result.kept) - len(additions),
                                   len(result.dropped_near)))
    save_corpus_file(path, corpus)
    log.info("appended %d descriptions from %s to %s", sum(r.kept for r in reports), source, path)
    return GenerationReport(label_set.name, source, path, tuple(reports))


def _load_or_new(path: Path, label_set: LabelSetSpec) -> CorpusFile:
    if path.exists():
        return load_corpus_file(path)
    return CorpusFile(schema_version=1, label_set=label_set.name, modality=label_set.modality, classes={})
