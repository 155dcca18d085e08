"""The one Settings class: every MEDZERO_* environment variable, with defaults that serve on a laptop.

Built once (by the CLI, a job, or a test) and passed down; nothing else in medzero reads os.environ.
"""
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models"
DEMO_MODEL_NAME = "medzero-tiny"   # models/medzero-tiny.json: random init, offline, for --demo and tests
DEFAULT_MODEL_NAME = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEDZERO_", env_file=".env", extra="ignore",
                                      protected_namespaces=())

    # serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    data_dir: Path = Path("data")
    database_url: str | None = None            # SQLAlchemy URL; default sqlite:///<data_dir>/medzero.db

    # model: any open_clip id, untouched
    model_name: str = DEFAULT_MODEL_NAME       # built-in name, hf-hub:org/repo, or local-dir:/path
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
    decode_workers: int = Field(2, ge=1)

    # micro-batching
    max_batch_size: int = Field(32, ge=1)                  # images per encoder forward
    max_wait_ms: float = Field(5.0, ge=0)                  # longest wait for announced images still decoding
    max_queue_images: int = Field(512, ge=1)               # more waiting than this -> 503 Overloaded

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'medzero.db'}"
