"""HTTP shapes, named as in the FastAPI template: <Thing>Create for input, <Thing>Public for output; and the
parsing of request fields that are not JSON bodies (classify parameters, class priors)."""
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Literal

from fastapi import Form, Query
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, model_validator

from app.dicom.routing import RouteRule, RoutingTable
from app.domain import LabelClass, LabelSet, LabelSetSpec, Slug
from app.errors import InvalidInput

# What every stored label-set name is (LabelSetSpec.name): a request naming anything else names none, and is
# refused before it reaches the store (PostgreSQL refuses a NUL in a query outright, which would be a 500).
LabelSetName = TypeAdapter(Slug)

ClassPrior = TypeAdapter(dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]])


def parse_class_prior(text: str) -> dict[str, float]:
    """'{"normal": 0.7, "pneumonia": 0.3}' or 'normal=0.7,pneumonia=0.3' -> {class: positive weight}."""
    try:
        if text.lstrip().startswith("{"):
            return ClassPrior.validate_json(text)
        pairs = [pair.split("=", 1) for pair in text.split(",")]
        return ClassPrior.validate_python({name.strip(): float(weight) for name, weight in pairs})
    except (ValidationError, ValueError) as exc:
        raise InvalidInput(f"class_prior must map each class to a positive weight, as JSON "
                           f'({{"normal": 0.7, ...}}) or normal=0.7,...; got {text[:100]!r}') from exc


Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
CacheAlpha = Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)]
CacheBeta = Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)]
CacheBase = Literal["zeroshot", "kpl"]


class ClassifyParams:
    """label_set, method, top_k, transductive and abstain_threshold from the form or the query string (the form
    wins)."""

    def __init__(self,
                 label_set_form: Annotated[str | None, Form(alias="label_set")] = None,
                 method_form: Annotated[str | None, Form(alias="method")] = None,
                 top_k_form: Annotated[int | None, Form(alias="top_k", ge=1)] = None,
                 label_set: Annotated[str | None, Query(description="Name of a registered label set.")] = None,
                 method: Annotated[str | None, Query(
                     description="zeroshot (default), kpl, meduna, hica or fewshot (GET /readyz lists them).")] = None,
                 top_k: Annotated[int | None, Query(ge=1, description="How many predictions; default all.")] = None,
                 transductive_form: Annotated[bool | None, Form(alias="transductive")] = None,
                 transductive: Annotated[bool | None, Query(
                     description="/classify/batch with method=kpl: fit proxies on the batch's own images.")] = None,
                 abstain_threshold_form: Annotated[Probability | None, Form(alias="abstain_threshold")] = None,
                 abstain_threshold: Annotated[Probability | None, Query(
                     description="Decide 'uncertain' below this top probability; overrides the label set's "
                                 "abstain_threshold for this request.")] = None,
                 cache_alpha_form: Annotated[CacheAlpha | None, Form(alias="cache_alpha")] = None,
                 cache_alpha: Annotated[CacheAlpha | None, Query(
                     description="method=fewshot: weight of the support cache (MEDZERO_FEWSHOT_ALPHA).")] = None,
                 cache_beta_form: Annotated[CacheBeta | None, Form(alias="cache_beta")] = None,
                 cache_beta: Annotated[CacheBeta | None, Query(
                     description="method=fewshot: sharpness of the support affinity (MEDZERO_FEWSHOT_BETA).")] = None,
                 cache_base_form: Annotated[CacheBase | None, Form(alias="cache_base")] = None,
                 cache_base: Annotated[CacheBase | None, Query(
                     description="method=fewshot: the logits the cache is added to, zeroshot (default) or kpl."
                 )] = None,
                 ) -> None:
        self.label_set = label_set_form or label_set
        if not self.label_set:
            raise InvalidInput("label_set is required (a form field or query parameter); GET /labels lists them")
        try:
            LabelSetName.validate_python(self.label_set)
        except ValidationError as exc:
            raise InvalidInput(f"label_set {self.label_set[:80]!r}{'...' if len(self.label_set) > 80 else ''} is "
                               "not a label-set name (lowercase letters, digits, '.', '_' and '-', at most 64 "
                               "characters); GET /labels lists them") from exc
        self.method = method_form or method or "zeroshot"
        self.top_k = top_k_form or top_k
        self.transductive = bool(transductive_form if transductive_form is not None else transductive)
        self.abstain_threshold = abstain_threshold_form if abstain_threshold_form is not None else abstain_threshold
        self.method_options = {
            "alpha": cache_alpha_form if cache_alpha_form is not None else cache_alpha,
            "beta": cache_beta_form if cache_beta_form is not None else cache_beta,
            "base": cache_base_form or cache_base}


class LabelSetCreate(LabelSetSpec):
    """Body of POST /labels and PUT /labels/{name}."""

    @model_validator(mode="after")
    def _no_nul_characters(self) -> "LabelSetCreate":
        # PostgreSQL text cannot hold U+0000 and no prompt needs one: refused here (422), never stored where one
        # database takes it and another fails on it.
        holding = [where for where, text in _strings(self.model_dump()) if "\x00" in text]
        if holding:
            raise ValueError(f"text must not contain the NUL character (U+0000); found in {', '.join(holding[:5])}")
        return self


def _strings(value: object, where: str = "body") -> Iterator[tuple[str, str]]:
    """Every string in a dumped model, with its path (body.classes.0.synonyms.2)."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{where}.{index}")


class LabelSetPublic(BaseModel):
    name: str
    modality: str
    description: str
    classes: list[LabelClass]
    templates: list[str] = Field(description="The templates in effect (the modality's defaults if none were given).")
    abstain_threshold: float | None = Field(description="Below this top probability the decision is 'uncertain'.")
    version: int
    builtin: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_domain(cls, label_set: LabelSet) -> "LabelSetPublic":
        return cls(name=label_set.name, modality=label_set.modality, description=label_set.description,
                   classes=label_set.classes, templates=list(label_set.effective_templates()),
                   abstain_threshold=label_set.abstain_threshold,
                   version=label_set.version, builtin=label_set.builtin,
                   created_at=label_set.created_at, updated_at=label_set.updated_at)


class LabelSetsPublic(BaseModel):
    data: list[LabelSetPublic]
    count: int


class EvidenceDescription(BaseModel):
    text: str
    source: str = Field(description="curated, llm:<model>, label_set (from the label set's own definition), "
                                    "or prompts (a class without descriptions stands for itself)")
    similarity: float = Field(description="Cosine similarity between this image and the description.")


class EvidencePublic(BaseModel):
    proxy: str = Field(description="How the class was represented: per-image (the descriptions that fit this "
                                   "image best), fitted (vision proxy from a stored KPL fit), transductive (fitted "
                                   "on this batch), or prompts (no descriptions: the class prompts).")
    descriptions: list[EvidenceDescription] = Field(description="The descriptions behind the class's proxy.")


class PredictionPublic(BaseModel):
    label: str
    probability: float = Field(description="Softmax probability over the label set's classes (calibrated when the "
                                           "result says calibrated).")
    similarity: float = Field(description="Raw cosine similarity between image and class embedding (or proxy).")
    evidence: EvidencePublic | None = Field(None, description="kpl only: what this class's proxy was built from.")


class CalibrationPublic(BaseModel):
    method: str
    label_set_version: int
    model: str
    calibration_version: int
    temperature: float = Field(description="Probabilities are softmax(logits / temperature).")
    coverage: float = Field(description="Target coverage of the prediction sets, e.g. 0.9.")
    set_threshold: float = Field(description="Calibrated probability a class needs to enter the prediction set.")
    score: str = Field(description="Conformal score: lac (a class is in the set when p >= set_threshold).")
    method_state_version: int | None = Field(description="The method's state it was calibrated on (KPL fit).")
    images: dict[str, int] = Field(description="Images used: temperature, conformal, held_back.")
    dataset_hash: str = Field(description="sha256 of the labelled images it was made from (medzero eval compares).")
    report: dict = Field(description="On the held-back images: ECE, NLL and Brier before/after, coverage, set size; "
                                     "warnings a user must read.")
    created_at: datetime


class CalibrationsPublic(BaseModel):
    label_set: str
    label_set_version: int
    model: str
    data: list[CalibrationPublic] = Field(description="One per calibrated method (current ones only).")


class ClassifyResult(BaseModel):
    label_set: str
    label_set_version: int
    model: str = Field(description="The open_clip model id the image was encoded with.")
    method: str
    input_format: str = Field(description="png, jpeg, tiff or dicom, detected from the content.")
    decision: str = Field(description="The class decided on, or 'uncertain' (see abstained).")
    abstained: bool = Field(description="True when the decision is 'uncertain': the top probability is below the "
                                        "abstain threshold, or (MEDZERO_DECISION_RULE=prediction_set) the "
                                        "prediction set is not a single class.")
    decision_rule: str = Field(description="top1, threshold, prediction_set or prediction_set+threshold.")
    abstain_threshold: float | None = Field(description="The threshold in effect (the request's or label set's).")
    calibrated: bool = Field(description="Whether the probabilities are temperature-calibrated (medzero calibrate).")
    temperature: float | None = Field(None, description="The calibration's temperature, when calibrated.")
    prediction_set: list[str] | None = Field(
        None, description="Calibrated methods only: the classes a split-conformal set needs to hold the true class "
                          "with probability >= prediction_set_coverage (may be empty: no class is plausible).")
    prediction_set_coverage: float | None = Field(None, description="The coverage the set was calibrated for.")
    predictions: list[PredictionPublic] = Field(description="Ranked, most probable first.")
    elapsed_ms: float
    method_details: dict | None = Field(None, description="Method facts, e.g. the KPL fit that was used.")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. label_set_not_found.")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class BatchItem(BaseModel):
    filename: str | None
    result: ClassifyResult | None = None
    error: ErrorDetail | None = None


class BatchResult(BaseModel):
    label_set: str
    method: str
    transductive: bool
    results: list[BatchItem] = Field(description="One entry per uploaded file, in upload order.")
    succeeded: int
    failed: int
    elapsed_ms: float


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="ready | loading | failed | stopped")
    model: str | None = None
    device: str | None = None
    pretrained_weights: bool | None = Field(None, description="False: random weights (--demo); predictions "
                                                              "are meaningless.")
    methods: list[str] | None = Field(None, description="Methods /classify accepts.")
    transductive_methods: list[str] | None = Field(None, description="Methods /classify/batch can run "
                                                                     "transductively.")
    engine: dict | None = Field(None, description="The image tower's engine: engine, precision, why it runs "
                                                  "(MEDZERO_ENGINE), images per forward (MEDZERO_MAX_BATCH_SIZE), start-up seconds, and the "
                                                  "probe's results.")
    startup_seconds: float | None = Field(None, description="Seconds from start to ready.")
    detail: str | None = None


class KPLFitPublic(BaseModel):
    label_set: str
    label_set_version: int
    model: str
    fit_version: int
    pool_size: int
    class_balance: dict[str, float] = Field(description="Share of the pool's pseudo-labels per class.")
    fit_seconds: float
    created_at: datetime
    config: dict = Field(description="The KPL hyperparameters this fit used (MEDZERO_KPL_*).")
    evidence: dict[str, list[EvidenceDescription]] = Field(
        description="Per class, the descriptions that built its text proxy; similarity = mean over the pool.")
    skipped: list[BatchItem] = Field(default_factory=list, description="Pool files that could not be used.")


class AdapterPublic(BaseModel):
    id: str = Field(description="sha256 of the bundle's adapter.safetensors (a 12+ character prefix also works).")
    method: str
    label_set: str
    label_set_version: int
    model: str
    class_names: list[str]
    prompt_tokens: int | None = Field(None, description="meduna: visual prompt tokens the encoder runs with.")
    tuned_weights: list[str] | None = Field(None, description="hica: the vision-tower weights it replaces.")
    version: int = Field(description="1, 2, ... per label set: a new bundle replaces the previous one.")
    created_at: datetime
    metrics: dict = Field(description="What the training job measured (manifest.json's metrics).")
    config: dict = Field(description="Every hyper-parameter it was trained with.")


class AdaptersPublic(BaseModel):
    data: list[AdapterPublic]
    count: int


class SupportPublic(BaseModel):
    label_set: str
    label_set_version: int
    model: str
    support_version: int | None = Field(description="None: no support set yet (method=fewshot answers 409).")
    counts: dict[str, int] = Field(description="Support images per class.")
    images: int
    created_at: datetime | None


class SupportUploadPublic(SupportPublic):
    added: int = Field(description="Images of this upload now in the support set.")
    skipped: list[BatchItem] = Field(default_factory=list, description="Files that could not be used.")


class DeliveryPublic(BaseModel):
    target: str = Field(description="cstore (SR by C-STORE), stow (SR by STOW-RS) or webhook.")
    destination: str
    state: str = Field(description="pending | sending | sent | dead_letter (gave up; POST /results/{id}/retry).")
    attempts: int
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    sent_at: datetime | None = None
    sr_sop_instance_uid: str | None = Field(None, description="The SR sent into the study.")


class ResultPublic(BaseModel):
    id: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    label_set: str
    label_set_version: int
    method: str
    model: str
    decision: str = Field(description="The class decided on, or 'uncertain'.")
    abstained: bool
    decision_rule: str
    predictions: list[dict] = Field(description="Ranked: label, probability, similarity.")
    calibrated: bool
    temperature: float | None = None
    prediction_set: list[str] | None = None
    prediction_set_coverage: float | None = None
    created_at: datetime
    deliveries: list[DeliveryPublic] = Field(default_factory=list)


class ResultsPublic(BaseModel):
    data: list[ResultPublic]
    count: int


class RetryPublic(BaseModel):
    retried: int = Field(description="Dead-letter deliveries of the result due again now.")


class InstancePublic(BaseModel):
    """A received DICOM instance: queued, processing, done, skipped (no routing rule: the reason says what it
    carried) or failed (the reason says why)."""
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    source: str
    label_set: str | None
    method: str | None
    state: str
    reason: str | None
    attempts: int
    received_at: datetime


class InstancesPublic(BaseModel):
    data: list[InstancePublic]
    count: int


class RoutesUpdate(RoutingTable):
    """The new rules, in order: the first rule whose every condition holds wins."""
    version: int | None = Field(None, description="The version read; refused (409) when the table changed since.")


class RoutesPublic(BaseModel):
    version: int = Field(description="0: no table stored yet.")
    source: str | None = Field(description="file (MEDZERO_DICOM_ROUTES_FILE) or api (PUT /routes).")
    routes_file: str | None
    updated_at: datetime | None
    rules: list[RouteRule]
