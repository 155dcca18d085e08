"""`medzero eval`: how well each method works on a site's own labelled images, and whether its probabilities mean
what they say.

In-process (default) the images are read, decoded and encoded once, through the server's own path
(Classifier.encode_pool), and every method scores the same features through Classifier.assess -- stored state,
calibration and all, exactly as /classify answers. With `--url` the running service itself is measured over
HTTP (/classify/batch); on the same model and data both give the same numbers. Transductive rows (a method fitted
on the evaluation pool itself, e.g. KPL under each balancing) are separate rows, labelled as such.

Writes OUT/results.json (metrics, per-image predictions, model id, label-set version, method settings, dataset
hash), OUT/results.md (the methods side by side) and PNG plots.
"""
import asyncio
import dataclasses
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import torch
from tqdm import tqdm

from app import __version__
from app.errors import Conflict, InvalidInput
from app.evaluation.dataset import LabelledImages, dataset_hash, load_labelled, relative_name
from app.evaluation.plots import PlotInput, write_plots
from app.evaluation.scoring import (
    abstention_at,
    abstention_curve,
    classification_metrics,
    decision_metrics,
    prediction_set_metrics,
)
from app.methods.base import Method
from app.methods.calibration import state_identity
from app.methods.kpl import BALANCINGS, KPL
from app.runtime import Runtime
from app.services.uploads import on_disk
from app.settings import Settings

HTTP_RETRIES = 10


@dataclass(frozen=True)
class MethodRow:
    """One method's answers for every evaluated image, as the service gives them."""
    name: str                              # e.g. "kpl", "kpl · transductive · sinkhorn"
    method: str
    transductive: bool
    probabilities: np.ndarray              # (n_images, n_classes), calibrated when `calibration` is set
    calibration: dict | None = None        # temperature, coverage, version, dataset hash of the calibration used
    prediction_sets: list[list[int]] | None = None
    settings: dict = field(default_factory=dict)   # the method's configuration and the state it scored with
    seconds: float = 0.0
    decisions: list[str | None] = field(default_factory=list)   # per image: the class decided on, None: uncertain
    decision_rule: str = "top1"                    # how the service decided (Classifier.decide)


@dataclass
class Evaluation:
    mode: str                              # "in-process" or the server's URL
    model_id: str
    pretrained_weights: bool | None
    label_set: str
    label_set_version: int
    class_names: tuple[str, ...]
    abstain_threshold: float | None
    images: LabelledImages
    used: list[int]                        # which images every row scored (the others could not be used)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (file, why)
    rows: list[MethodRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def y_true(self) -> np.ndarray:
        return np.array([self.class_names.index(self.images.labels[i]) for i in self.used], dtype=np.int64)


@dataclass(frozen=True)
class EvalOptions:
    methods: tuple[str, ...] | None = None         # None: every method the service has
    kpl_balancings: tuple[str, ...] = BALANCINGS   # the transductive KPL rows
    transductive: bool = True
    abstain_threshold: float | None = None         # None: the label set's
    seed: int = 0
    n_bootstrap: int = 1000
    progress: bool = True
    http_batch_files: int = 32                     # --url: files per /classify/batch (the server's limit: 64)
    http_timeout_seconds: float = 600.0            # --url: longest wait for one batch (a transductive fit)


def main(settings: Settings, source: Path, label_set: str, out_dir: Path, *, mapping: dict[str, str] | None = None,
         options: EvalOptions = EvalOptions(), url: str | None = None, api_key: str | None = None) -> dict:
    """Evaluate, write the results folder, and return the summary (results.json without the per-image part)."""
    if not source.exists():           # before the model loads: a typo costs no start-up
        raise InvalidInput(f"no such folder or manifest: {source}")
    if url:
        evaluation = evaluate_over_http(url, source, label_set, mapping or {}, options, api_key)
    else:
        evaluation = asyncio.run(evaluate_in_process(settings, source, label_set, mapping or {}, options))
    return write_results(evaluation, out_dir, options)


# -- in-process

async def evaluate_in_process(settings: Settings, source: Path, label_set: str, mapping: dict[str, str],
                              options: EvalOptions) -> Evaluation:
    async with Runtime.for_job(settings, progress=options.progress) as runtime:
        return await evaluate_with(runtime, source, label_set, mapping, options)


async def evaluate_with(runtime: Runtime, source: Path, label_set: str, mapping: dict[str, str],
                        options: EvalOptions) -> Evaluation:
    """Evaluate on a loaded runtime (a benchmark evaluates several label sets on one)."""
    settings = runtime.settings
    classifier = runtime.classifier
    head = await classifier.head(label_set)
    images = load_labelled(source, head.class_names, mapping)
    names = _chosen_methods(options.methods, classifier.method_names)
    chosen = [classifier.method(name) for name in names]     # unknown methods fail before any image is read
    files = [on_disk(path, relative_name(images, path), settings.max_upload_bytes) for path in images.paths]
    pool = await classifier.encode_pool(files, progress=options.progress, description=f"encoding {label_set}")
    if pool.features is None:
        raise InvalidInput(f"none of the {len(files)} images in {source} could be used")
    threshold = head.abstain_threshold if options.abstain_threshold is None else options.abstain_threshold
    evaluation = Evaluation("in-process", head.model_id, runtime.encoder.has_pretrained_weights, label_set,
                            head.version, head.class_names, threshold, images, pool.used,
                            [(name, f"{error.code}: {error}") for name, error in pool.skipped])
    for method in chosen:
        variants = [(method, False)]
        if options.transductive and method.supports_transductive:
            variants += [(variant, True) for variant in _transductive_variants(method, options.kpl_balancings)]
        for variant, transductive in variants:
            if transductive and len(pool.used) < 2:
                evaluation.notes.append(f"{method.name} transductive: needs at least 2 images; skipped")
                continue
            started = time.perf_counter()
            try:
                assessment = await classifier.assess(variant, head, pool.features, transductive=transductive,
                                                     files=[files[i] for i in pool.used])
            except Conflict as exc:       # a method without the state it needs (meduna, no adapter): no row
                evaluation.notes.append(f"{method.name}: {exc}")
                continue
            calibration = assessment.calibration
            sets = assessment.prediction_sets
            decided = [classifier.decide(head, assessment.probabilities[i], sets[i] if sets else None,
                                         options.abstain_threshold) for i in range(len(pool.used))]
            balancing = getattr(getattr(variant, "config", None), "balancing", None)
            evaluation.rows.append(MethodRow(
                name=_row_name(method.name, transductive, balancing), method=method.name,
                transductive=transductive, probabilities=assessment.probabilities.double().numpy(),
                calibration=None if calibration is None else _calibration_facts({
                    **dataclasses.asdict(calibration), "calibration_version": calibration.version}),
                prediction_sets=sets,
                settings=_method_settings(variant, assessment.scores.details, state_identity(assessment.state)[0]),
                seconds=round(time.perf_counter() - started, 3),
                decisions=[d.label for d in decided], decision_rule=decided[0].rule))
    return evaluation


def _chosen_methods(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    if not requested:
        return sorted(available, key=lambda name: (name != "zeroshot", name))   # the baseline first
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise InvalidInput(f"unknown method {', '.join(unknown)}; available: {', '.join(available)}")
    return list(dict.fromkeys(requested))


def _transductive_variants(method: Method, balancings: Sequence[str]) -> list[Method]:
    """KPL once per balancing reading (the two readings of the reference code, side by side); any other
    transductive method as it is."""
    if isinstance(method, KPL):
        unknown = sorted(set(balancings) - set(BALANCINGS))
        if unknown:
            raise InvalidInput(f"unknown KPL balancing {', '.join(unknown)}; expected {', '.join(BALANCINGS)}")
        return [KPL(method.descriptions, dataclasses.replace(method.config, balancing=b)) for b in balancings]
    return [method]


def _row_name(method: str, transductive: bool, balancing: str | None = None) -> str:
    """"kpl", "kpl · transductive · sinkhorn", "meduna · transductive"."""
    return " · ".join(filter(None, (method, "transductive" if transductive else None,
                                    balancing if transductive else None)))


def _method_settings(method: Method, details: dict, state_version: int | None) -> dict:
    config = getattr(method, "config", None)
    settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
    return {**settings, "state_version": state_version, **{k: v for k, v in details.items() if k != "class_balance"}}


# -- over HTTP

def evaluate_over_http(url: str, source: Path, label_set: str, mapping: dict[str, str], options: EvalOptions,
                       api_key: str | None = None) -> Evaluation:
    """The deployed service measured through /classify/batch: what its users get, calibration included."""
    base = url.rstrip("/")
    headers = {"X-API-Key": api_key} if api_key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=options.http_timeout_seconds) as client:
        ready = _get(client, "/readyz")
        spec = _get(client, f"/labels/{label_set}")
        calibrations = {c["method"]: c for c in _get(client, f"/labels/{label_set}/calibration")["data"]}
        class_names = tuple(c["name"] for c in spec["classes"])
        images = load_labelled(source, class_names, mapping)
        names = _chosen_methods(options.methods, ready.get("methods") or ["zeroshot"])
        threshold = spec.get("abstain_threshold") if options.abstain_threshold is None else options.abstain_threshold
        evaluation = Evaluation(base, ready["model"], ready.get("pretrained_weights"), label_set, spec["version"],
                                class_names, threshold, images, [])
        # per-image rows first: the files the service refuses are known before a transductive pool is sent
        plans = [(name, False) for name in names]
        if options.transductive:
            plans += [(name, True) for name in names if name in (ready.get("transductive_methods") or [])]
            if any(transductive for _, transductive in plans):
                evaluation.notes.append("over --url a transductive row uses the server's MEDZERO_KPL_BALANCING "
                                        "(its name shows which); run in-process for both readings side by side")
        http = _HttpRows(client, images, label_set, options)
        answers: dict[tuple[str, bool], tuple[dict[int, dict], float]] = {}
        for name, transductive in plans:
            started = time.perf_counter()
            try:
                by_image = http.classify(name, transductive)
            except _RowRefused as exc:
                evaluation.notes.append(f"{_row_name(name, transductive)}: {exc}")
                continue
            answers[(name, transductive)] = by_image, time.perf_counter() - started
        evaluation.used = [i for i in range(len(images.paths)) if i not in http.failures]
        evaluation.skipped = [(relative_name(images, images.paths[i]), why)
                              for i, why in sorted(http.failures.items())]
        for (name, transductive), (by_image, seconds) in answers.items():
            evaluation.rows.append(_row_from_http(name, transductive, by_image, evaluation,
                                                  calibrations.get(name), seconds))
        return evaluation


class _RowRefused(Exception):
    pass


def _get(client: httpx.Client, path: str) -> dict:
    try:
        response = client.get(path)
    except httpx.HTTPError as exc:
        raise InvalidInput(f"cannot reach {client.base_url}{path}: {exc}") from exc
    if response.status_code != 200:
        raise InvalidInput(f"{client.base_url}{path} answered {response.status_code}: {_error_text(response)}")
    return response.json()


def _error_text(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


class _HttpRows:
    """/classify/batch calls for one evaluation; `failures` collects the files the service refuses."""

    def __init__(self, client: httpx.Client, images: LabelledImages, label_set: str, options: EvalOptions) -> None:
        self._client, self._images, self._label_set, self._options = client, images, label_set, options
        self.failures: dict[int, str] = {}

    def classify(self, method: str, transductive: bool) -> dict[int, dict]:
        """{image index: ClassifyResult JSON}. A transductive pool is every file not already refused (the
        service fits on all of a batch's files or refuses it)."""
        index = [i for i in range(len(self._images.paths)) if not (transductive and i in self.failures)]
        size = self._options.http_batch_files
        batches = [index] if transductive else [index[i:i + size] for i in range(0, len(index), size)]
        results: dict[int, dict] = {}
        with tqdm(total=len(index), desc=f"{method}{' (transductive)' if transductive else ''} over HTTP",
                  unit="image", disable=not self._options.progress) as bar:
            for batch in batches:
                body = self._post(batch, method, transductive)
                for i, item in zip(batch, body["results"]):
                    if item.get("error"):
                        self.failures.setdefault(i, f"{item['error']['code']}: {item['error']['message']}")
                    else:
                        results[i] = item["result"]
                bar.update(len(batch))
        return results

    def _post(self, batch: list[int], method: str, transductive: bool) -> dict:
        paths = self._images.paths
        files = [("files", (relative_name(self._images, paths[i]), paths[i].read_bytes(),
                            "application/octet-stream")) for i in batch]
        data = {"label_set": self._label_set, "method": method, "transductive": str(transductive).lower()}
        if self._options.abstain_threshold is not None:
            data["abstain_threshold"] = str(self._options.abstain_threshold)
        for attempt in range(HTTP_RETRIES):
            try:
                response = self._client.post("/classify/batch", files=files, data=data)
            except httpx.TimeoutException as exc:
                if transductive:      # a long fit on a slow server: that row is lost, not the evaluation
                    raise _RowRefused(f"no answer within {self._options.http_timeout_seconds:g} s for the pool "
                                      f"of {len(batch)} images (--http-timeout)") from exc
                time.sleep(min(30.0, 2.0 ** attempt))
                continue
            except httpx.TransportError as exc:
                time.sleep(min(30.0, 2.0 ** attempt))   # a dropped connection: retry the same batch
                if attempt == HTTP_RETRIES - 1:
                    raise InvalidInput(f"cannot reach {self._client.base_url}/classify/batch: {exc}") from exc
                continue
            if response.status_code == 503:      # overloaded or busy: wait as told, then retry the same batch
                time.sleep(min(30.0, float(response.headers.get("Retry-After", "1"))))
                continue
            if response.status_code == 200:
                return response.json()
            if response.status_code == 409:   # the method lacks the state it needs (meduna, no adapter): no row
                raise _RowRefused(_error_text(response))
            if transductive:
                raise _RowRefused(f"the server refused the pool of {len(batch)} images in one batch "
                                  f"({response.status_code}: {_error_text(response)}); raise "
                                  "MEDZERO_MAX_BATCH_FILES on the server, or evaluate in-process")
            hint = "; lower --batch-files" if response.status_code == 413 else ""
            raise InvalidInput(f"/classify/batch answered {response.status_code}: {_error_text(response)}{hint}")
        raise InvalidInput(f"/classify/batch gave no answer after {HTTP_RETRIES} tries (overloaded or unreachable)")


def _row_from_http(method: str, transductive: bool, by_image: dict[int, dict], evaluation: Evaluation,
                   calibration: dict | None, seconds: float) -> MethodRow:
    class_index = {name: c for c, name in enumerate(evaluation.class_names)}
    probabilities = np.zeros((len(evaluation.used), len(evaluation.class_names)))
    sets: list[list[int]] = []
    decisions: list[str | None] = []
    details, rule, calibrated_rows = {}, "top1", 0
    for row, i in enumerate(evaluation.used):
        result = by_image[i]
        if result["label_set_version"] != evaluation.label_set_version or result["model"] != evaluation.model_id:
            raise InvalidInput(f"the server's label set or model changed during the evaluation (now "
                               f"{result['model']}, v{result['label_set_version']}); run it again")
        for prediction in result["predictions"]:
            probabilities[row, class_index[prediction["label"]]] = prediction["probability"]
        details, rule = result.get("method_details") or {}, result["decision_rule"]
        decisions.append(None if result["abstained"] else result["decision"])
        if result["calibrated"]:
            calibrated_rows += 1
            sets.append([class_index[name] for name in result["prediction_set"]])
    probabilities /= probabilities.sum(axis=1, keepdims=True)   # the API rounds to 6 decimals
    calibrated = calibrated_rows == len(evaluation.used) and calibration is not None
    return MethodRow(_row_name(method, transductive, details.get("balancing")), method, transductive,
                     probabilities, _calibration_facts(calibration) if calibrated else None,
                     sets if calibrated else None, {k: v for k, v in details.items() if k != "class_balance"},
                     round(seconds, 3), decisions, rule)


def _calibration_facts(calibration: dict) -> dict:
    """What results.json records of a calibration (from GET /labels/{name}/calibration, or in-process)."""
    return {"version": calibration["calibration_version"], "temperature": calibration["temperature"],
            "coverage": calibration["coverage"], "set_threshold": calibration["set_threshold"],
            "score": calibration["score"], "dataset_hash": calibration.get("dataset_hash"),
            "held_back": calibration["report"]}


# -- results

def write_results(evaluation: Evaluation, out_dir: Path, options: EvalOptions) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    if not evaluation.rows:
        raise InvalidInput("no method produced results: " + "; ".join(evaluation.notes or ["nothing to evaluate"]))
    y_true, class_names = evaluation.y_true, evaluation.class_names
    data_hash = dataset_hash(evaluation.images)
    methods = []
    for row in evaluation.rows:
        metrics = classification_metrics(y_true, row.probabilities, class_names, n_bootstrap=options.n_bootstrap,
                                         seed=options.seed)
        metrics["abstention"] = {"curve": abstention_curve(y_true, row.probabilities),
                                 "at_threshold": None if evaluation.abstain_threshold is None else
                                 abstention_at(y_true, row.probabilities, evaluation.abstain_threshold)}
        # what the service decided (its rule: threshold and, with MEDZERO_DECISION_RULE=prediction_set, the sets)
        index = {name: c for c, name in enumerate(class_names)}
        metrics["decisions"] = {"rule": row.decision_rule, **decision_metrics(
            y_true, [None if label is None else index[label] for label in row.decisions])}
        if row.prediction_sets is not None:
            metrics["prediction_sets"] = prediction_set_metrics(y_true, row.prediction_sets)
            if row.calibration and row.calibration.get("dataset_hash") == data_hash:
                evaluation.notes.append(f"{row.name}: calibrated on these same images (medzero calibrate --data), so "
                                        "its prediction-set coverage here is optimistic; evaluate on other images")
        methods.append({"name": row.name, "method": row.method, "transductive": row.transductive,
                        "calibrated": row.calibration is not None, "calibration": row.calibration,
                        "settings": row.settings, "seconds": row.seconds, "metrics": metrics})
    plots = write_plots(out_dir, class_names, [PlotInput(row.name, y_true, row.probabilities,
                                                         evaluation.abstain_threshold) for row in evaluation.rows])
    summary = {
        "medzero_version": __version__, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": evaluation.mode, "model_id": evaluation.model_id,
        "pretrained_weights": evaluation.pretrained_weights,
        "label_set": evaluation.label_set, "label_set_version": evaluation.label_set_version,
        "class_names": list(class_names), "abstain_threshold": evaluation.abstain_threshold,
        "dataset": {"source": str(evaluation.images.source), "hash": data_hash,
                    "images": len(evaluation.images.paths), "scored": len(evaluation.used),
                    "per_class": evaluation.images.counts(),
                    "skipped": [{"file": name, "error": why} for name, why in evaluation.skipped]},
        "options": {"seed": options.seed, "bootstrap_resamples": options.n_bootstrap,
                    "kpl_balancings": list(options.kpl_balancings), "transductive": options.transductive},
        "environment": {"python": platform.python_version(), "torch": torch.__version__},
        "notes": evaluation.notes, "methods": methods, "plots": plots}
    predictions = [_image_predictions(evaluation, row_index, i) for row_index, i in enumerate(evaluation.used)]
    (out_dir / "results.json").write_text(json.dumps({**summary, "predictions": predictions}, indent=1,
                                                     allow_nan=False))
    (out_dir / "results.md").write_text(render_markdown(summary))
    return summary


def _image_predictions(evaluation: Evaluation, row_index: int, image_index: int) -> dict:
    names = evaluation.class_names
    entry = {"file": relative_name(evaluation.images, evaluation.images.paths[image_index]),
             "label": evaluation.images.labels[image_index], "methods": {}}
    for row in evaluation.rows:
        p = row.probabilities[row_index]
        top = int(p.argmax())
        answer = {"predicted": names[top], "probability": round(float(p[top]), 6),
                  "probabilities": [round(float(v), 6) for v in p]}
        if row.prediction_sets is not None:
            answer["prediction_set"] = [names[c] for c in row.prediction_sets[row_index]]
        if row.decisions:
            answer["decision"] = row.decisions[row_index] or "uncertain"
        entry["methods"][row.name] = answer
    return entry


def render_markdown(summary: dict) -> str:
    """The methods side by side, a per-class recall table, and what the numbers rest on."""
    weights = summary["pretrained_weights"]
    lines = [f"# Evaluation: `{summary['label_set']}` v{summary['label_set_version']}", ""]
    if weights is False:
        lines += [f"> **`{summary['model_id']}` has RANDOM weights: every number below is chance level and only shows "
                  "that the pipeline runs. Configure real weights (MEDZERO_MODEL_NAME) for a real evaluation.**", ""]
    dataset = summary["dataset"]
    lines += [f"- model: `{summary['model_id']}` ({'pretrained' if weights else 'random' if weights is False else '?'}"
              f" weights), measured {summary['mode']}",
              f"- data: `{dataset['source']}`, {dataset['scored']} of {dataset['images']} images scored "
              f"({', '.join(f'{k} {v}' for k, v in dataset['per_class'].items())}), `{dataset['hash'][:19]}…`",
              f"- 95 % intervals: percentile bootstrap, {summary['options']['bootstrap_resamples']} resamples, "
              f"seed {summary['options']['seed']}; ECE over 15 equal-width bins",
              f"- abstain threshold: {_threshold_text(summary['abstain_threshold'])}", ""]
    lines += ["| method | calibrated | acc1 | balanced acc. | macro-F1 | macro AUROC | acc5 | ECE | Brier | NLL "
              "| answered | acc. answered | set coverage | mean set size | seconds |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for method in summary["methods"]:
        m = method["metrics"]
        decided = m["decisions"]
        sets = m.get("prediction_sets")
        calibration = method["calibration"]
        lines.append(
            f"| {method['name']} | {_temperature_text(calibration)} "
            f"| {_with_interval(m['acc1'], m['intervals']['accuracy'])} "
            f"| {_with_interval(m['balanced_accuracy'], m['intervals']['balanced_accuracy'])} "
            f"| {_pct(m['macro_f1'])} | {_with_interval(m['macro_auroc'], m['intervals']['macro_auroc'])} "
            f"| {_pct(m['acc5'])} | {m['ece']:.3f} | {m['brier']:.3f} | {m['nll']:.3f} "
            f"| {_pct(decided['coverage'])} ({decided['rule']}) | {_pct(decided['accuracy'])} "
            f"| {_pct(sets['coverage']) if sets else '–'} | {format(sets['mean_size'], '.2f') if sets else '–'} "
            f"| {method['seconds']:.2f} |")
    lines += ["", "Recall per class (%):", "",
              "| method | " + " | ".join(summary["class_names"]) + " |",
              "|---|" + "--:|" * len(summary["class_names"])]
    for method in summary["methods"]:
        per_class = method["metrics"]["per_class"]
        lines.append(f"| {method['name']} | " + " | ".join(_pct(per_class[c]["recall"])
                                                             for c in summary["class_names"]) + " |")
    if dataset["skipped"]:
        lines += ["", f"Skipped {len(dataset['skipped'])} files: "
                  + "; ".join(f"{s['file']} ({s['error']})" for s in dataset["skipped"][:10])]
    if summary["notes"]:
        lines += ["", *[f"- {note}" for note in summary["notes"]]]
    lines += ["", "Plots: " + ", ".join(f"[{name}]({name})" for names in summary["plots"].values() for name in names)]
    return "\n".join(lines) + "\n"


def _temperature_text(calibration: dict | None) -> str:
    return f"T={calibration['temperature']:.2f}" if calibration else "no"


def _threshold_text(threshold: float | None) -> str:
    return "none (every image decided)" if threshold is None else f"{threshold:g} (top probability)"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _with_interval(value: float | None, interval: Sequence[float] | None) -> str:
    if value is None:
        return "–"
    return _pct(value) + (f" [{_pct(interval[0])}, {_pct(interval[1])}]" if interval else "")

