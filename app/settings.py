"""The one Settings class: every MEDZERO_* environment variable, with defaults that serve on a laptop.

Built once (by the CLI, a job, or a test) and passed down; nothing else in medzero reads os.environ.
"""
import socket
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models"
BUNDLED_KNOWLEDGE_BASE_DIR = Path(__file__).resolve().parent.parent / "knowledge_base"
DEMO_MODEL_NAME = "medzero-tiny"   # models/medzero-tiny.json: random init, offline, for --demo and tests
DEFAULT_MODEL_NAME = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
CPU_MAX_BATCH_SIZE = 8     # MEDZERO_MAX_BATCH_SIZE's default by device (benchmarks/README.md has the measurements)
CUDA_MAX_BATCH_SIZE = 64


def ae_title(title: str) -> str:
    """A DICOM AE title (PS3.8 9.3.1): 1-16 characters of printable ASCII other than backslash, not only spaces."""
    stripped = title.strip()
    if not stripped or len(title) > 16 or any(not " " <= c <= "~" or c == "\\" for c in title):
        raise ValueError(f"{title!r} is not an AE title (1-16 printable ASCII characters, no backslash)")
    return stripped


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEDZERO_", env_file=".env", extra="ignore",
                                      protected_namespaces=(), populate_by_name=True)

    # serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"   # `medzero serve`: one JSON object per line, or readable text
    data_dir: Path = Path("data")
    database_url: str | None = None            # SQLAlchemy URL; default sqlite:///<data_dir>/medzero.db
    db_busy_timeout_ms: int = Field(5000, ge=0)   # SQLite: how long a write waits for another writer; then 503
    # this replica's stable name among those sharing one database (on its DICOM queue leases); default host:port,
    # which a restarted container keeps. Two replicas must never share one
    replica_id: str | None = Field(None, min_length=1, max_length=128)

    # model: any open_clip id, untouched
    model_name: str = DEFAULT_MODEL_NAME       # built-in name, hf-hub:org/repo, or local-dir:/path
    # the image tower's engine: auto (measured at start-up, app/encoders/engines.py) or ENGINE[:PRECISION]
    engine: str = Field("auto", pattern=r"^(auto|torch|onnxruntime|openvino)(:(fp32|bf16|int8))?$")
    pretrained: str | None = None              # tag for built-in names ("openai") or a checkpoint file path
    model_config_dir: Path = BUNDLED_MODEL_DIR  # extra open_clip architecture JSON (tiny test configs too)
    cache_dir: Path | None = None              # hub download cache; default: huggingface_hub's own
    hub_offline: bool = False                  # never contact the hub; use what the cache holds
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    torch_threads: int | None = Field(None, ge=1)   # intra-op threads for the encoder; default: torch's
    demo: bool = False                         # use the tiny bundled model when no real weights are on disk

    # uploads
    max_upload_bytes: int = Field(50 * 2**20, ge=1)        # one file
    max_batch_files: int = Field(64, ge=1)
    max_batch_request_bytes: int = Field(256 * 2**20, ge=1)  # a whole /classify/batch body
    max_image_pixels: int = Field(64 * 2**20, ge=1)          # decoded width*height; larger = decompression bomb
    max_aspect_ratio: float = Field(20.0, ge=1)              # long side / short side; the resize would explode it
    decode_workers: int = Field(2, ge=1)
    max_label_set_texts: int = Field(20000, ge=1)            # text encodings one label-set write may cost

    # admission and micro-batching
    max_in_flight_images: int = Field(  # permits: images admitted at once (decoding, queued or encoding); else 503
        512, ge=1, validation_alias=AliasChoices("MEDZERO_MAX_IN_FLIGHT_IMAGES", "MEDZERO_MAX_QUEUE_IMAGES"))
    max_concurrent_batch_bodies: int = Field(4, ge=1)      # /classify/batch and pool uploads held in memory at once
    # images per encoder forward; default per device: on CPU img/s is flat from batch 2-8 up and a forward of 32
    # only makes the first image wait longer (benchmarks/engines.py --batches); a GPU needs big batches to fill it
    max_batch_size: int | None = Field(None, ge=1)
    max_wait_ms: float = Field(5.0, ge=0)                  # longest wait for announced images still decoding
    encode_timeout_seconds: float = Field(60.0, gt=0)      # longest wait for one image's forward; then 503

    # knowledge base and KPL
    knowledge_base_dir: Path = BUNDLED_KNOWLEDGE_BASE_DIR   # corpus files, one per label set
    # where a class's description search runs. auto: cuda when the encoder runs on CUDA and faiss can search on
    # the GPU (the gpu extra), else cpu; cuda without that stops start-up (app/knowledge/index.py weighs the two)
    index_device: Literal["auto", "cpu", "cuda"] = "auto"
    kpl_balancing: Literal["reference", "sinkhorn"] = "reference"   # see ../shared/notes/kpl.md
    kpl_top_k_descriptions: int = Field(8, ge=1)
    kpl_tau_text: float = Field(0.01, gt=0)
    kpl_balance_iters: int = Field(20, ge=1)
    kpl_alpha: float = Field(0.6, ge=0, le=1)
    kpl_tau_image: float = Field(0.04, gt=0)
    kpl_lr: float = Field(10.0, gt=0)
    kpl_proxy_iters: int = Field(2000, ge=1)
    kpl_pool_root: Path | None = None          # server-side folders under this root may be fitted on
    kpl_max_pool_images: int = Field(20000, ge=2)
    # DICOM ingestion (STOW-RS, and C-STORE when dicom_port is set): routing rules and the durable inbox's worker
    dicom_routes_file: Path | None = None      # YAML rules imported at start when changed; else /routes' table
    ingest_lease_seconds: float = Field(300.0, gt=0)   # an instance a dead worker held comes back after this
    ingest_max_attempts: int = Field(8, ge=1)          # tries of an instance refused with 503 (busy) or crashing
    ingest_retry_seconds: float = Field(1.0, gt=0)     # the first retry's delay; doubled per attempt, at most 5 min
    ingest_workers: int = Field(4, ge=1)               # queued instances classified at once (decodes overlap)
    dicom_port: int | None = Field(None, ge=0, le=65535)   # the C-STORE / C-ECHO SCP; None: no DIMSE listener
    dicom_host: str | None = None              # the SCP's bind address; default: `host`
    dicom_ae_title: str = Field("MEDZERO", min_length=1, max_length=16)
    dicom_allowed_ae_titles: Annotated[list[str], NoDecode] = Field(default_factory=list)  # empty: any caller
    dicom_network_timeout_seconds: float = Field(30.0, gt=0)   # ACSE / DIMSE / network timeouts, SCP and SCU

    # where results go: an AI Results SR by C-STORE (AET@host:port) and/or STOW-RS, and a JSON webhook
    sr_destination: str | None = None          # AET@host:port ([v6 address]:port works too)
    sr_stow_url: str | None = None             # a DICOMweb base URL; the SR is POSTed to <url>/studies/<study>
    result_webhook_url: str | None = None      # each result's JSON is POSTed here
    institution_name: str | None = None        # written into the SR's equipment module
    delivery_max_attempts: int = Field(8, ge=1)         # then the delivery is a dead letter (visible in /results)
    delivery_retry_seconds: float = Field(5.0, gt=0)    # the first retry's delay; doubled per attempt, at most 1 h
    delivery_workers: int = Field(4, ge=1)              # deliveries under way at once (associations, HTTP posts)

    # method=fewshot: the cache model over a label set's support images (Tip-Adapter's defaults)
    fewshot_alpha: float = Field(1.0, ge=0, allow_inf_nan=False)   # weight of the cache logits
    fewshot_beta: float = Field(5.5, gt=0, allow_inf_nan=False)    # sharpness of the support affinity
    max_support_images: int = Field(4096, ge=1)        # support images one label set may hold

    # trained adapters (`medzero train meduna` bundles): every one under this folder is loaded at start-up
    adapters_dir: Path | None = None           # default: <data_dir>/adapters

    # decisions: below a label set's abstain_threshold the decision is 'uncertain'; "prediction_set" also answers
    # 'uncertain' unless a calibrated method's prediction set is a single class
    decision_rule: Literal["threshold", "prediction_set"] = "threshold"
    # access: "keys" (the default outside --demo) needs an API key (`medzero keys create`) on every route but
    # health, readiness and /metrics; "off" (the default with --demo) leaves them open
    auth: Literal["keys", "off"] | None = None
    admin_api_key: str | None = None           # an admin key from the environment, beside the stored ones
    # requests per minute one API key may make, per replica; then 429 + Retry-After (MEDZERO_AUTH=off: no keys, no
    # limit). Bursts up to rate_limit_burst (default: a tenth of a minute's worth, at least 10). 0: no limit
    rate_limit_per_minute: int = Field(1200, ge=0)
    rate_limit_burst: int | None = Field(None, ge=1)
    # the longest a request may take, body included: a body still arriving then gets 408, an answer not ready 503.
    # Pool uploads that fit or store state (KPL fits, support sets, adapter bundles) get the longer job limit
    request_timeout_seconds: float = Field(120.0, gt=0)
    job_request_timeout_seconds: float = Field(1800.0, gt=0)
    # browsers: origins allowed to call the API cross-origin (CORS); empty, the default: no CORS headers at all
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # metrics: label values come from closed sets; these label sets' names and classes are exported as they are
    metrics_label_sets: Annotated[list[str], NoDecode] = Field(default_factory=list, max_length=32)

    # LLM for `medzero kb generate` (an OpenAI-compatible chat-completions endpoint)
    llm_url: str | None = None                 # e.g. http://localhost:8001/v1
    llm_model: str | None = None
    llm_api_key: str | None = None
    llm_timeout_seconds: float = Field(60.0, gt=0)
    llm_max_retries: int = Field(4, ge=0)

    @field_validator("metrics_label_sets", "dicom_allowed_ae_titles", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("dicom_ae_title")
    @classmethod
    def _ae_title(cls, title: str) -> str:
        return ae_title(title)

    @field_validator("dicom_allowed_ae_titles")
    @classmethod
    def _ae_titles(cls, titles: list[str]) -> list[str]:
        return [ae_title(title) for title in titles]

    @field_validator("sr_destination")
    @classmethod
    def _ae_address(cls, address: str | None) -> str | None:
        if address is None:
            return None
        title, at, location = address.partition("@")
        host, colon, port = location.rpartition(":")
        if not (at and colon and host.strip("[]") and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{address!r} is not AET@host:port (port 1-65535)")
        return f"{ae_title(title)}@{host}:{int(port)}"

    @field_validator("sr_stow_url", "result_webhook_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            try:
                parts.port                     # noqa: B018 -- raises on a port that is not a number in range
            except ValueError as exc:
                raise ValueError(f"{url!r}: {exc}") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r} is not an http(s) URL with a host")
        return url

    @property
    def resolved_dicom_host(self) -> str:
        return self.dicom_host or self.host

    @property
    def resolved_adapters_dir(self) -> Path:
        return self.adapters_dir or self.data_dir / "adapters"

    def resolved_max_batch_size(self, device_type: str) -> int:
        return self.max_batch_size or (CUDA_MAX_BATCH_SIZE if device_type == "cuda" else CPU_MAX_BATCH_SIZE)

    @property
    def resolved_rate_limit_burst(self) -> int:
        return self.rate_limit_burst or max(10, self.rate_limit_per_minute // 10)

    @property
    def auth_mode(self) -> Literal["keys", "off"]:
        return self.auth or ("off" if self.demo else "keys")

    @property
    def resolved_replica_id(self) -> str:
        return self.replica_id or f"{socket.gethostname()}:{self.port}"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'medzero.db'}"
