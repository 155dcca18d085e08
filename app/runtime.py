"""Runtime: everything start-up builds once — store, encoder, batcher, label sets, methods, classifier.

The server builds it in its lifespan and loads the model in the background, so /healthz answers at once and
/readyz turns ready only after the warm-up forward; jobs build it with `Runtime.for_job` (same loader, same
stores) and wait for the load.
"""
import asyncio
import logging
import time
from collections.abc import Callable
from typing import Literal

from app import metrics
from app.encoders.batcher import Batcher
from app.encoders.loader import Encoder, load_encoder
from app.errors import MedzeroError, NotReady
from app.methods.base import Method
from app.methods.zero_shot import ZeroShot
from app.services.classify import Classifier
from app.services.label_sets import LabelSetService
from app.settings import Settings
from app.storage.db import create_db_engine
from app.storage.label_sets import LabelSetRepository

log = logging.getLogger(__name__)
State = Literal["loading", "ready", "failed", "stopped"]


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = create_db_engine(settings.resolved_database_url)
        self.repository = LabelSetRepository(self.engine)
        self.state: State = "loading"
        self.failure: str | None = None
        self._encoder: Encoder | None = None
        self._batcher: Batcher | None = None
        self._label_sets: LabelSetService | None = None
        self._classifier: Classifier | None = None
        self._load_task: asyncio.Task | None = None

    # -- what routes use; each raises NotReady until the model is loaded and warm
    @property
    def encoder(self) -> Encoder:
        self._require_ready()
        return self._encoder

    @property
    def label_sets(self) -> LabelSetService:
        self._require_ready()
        return self._label_sets

    @property
    def classifier(self) -> Classifier:
        self._require_ready()
        return self._classifier

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def _require_ready(self) -> None:
        if self.state != "ready":
            detail = f": {self.failure}" if self.failure else "; retry shortly"
            raise NotReady(f"the model is {self.state}{detail}")

    # -- lifecycle
    def start_loading(self, on_failure: Callable[[MedzeroError], None] | None = None) -> None:
        """Load in the background; `on_failure` lets the CLI end the process with the error."""
        self._load_task = asyncio.get_running_loop().create_task(self._load(on_failure), name="medzero-load")

    async def wait_loaded(self) -> None:
        if self._load_task is not None:
            await asyncio.shield(self._load_task)
        self._require_ready()

    async def _load(self, on_failure: Callable[[MedzeroError], None] | None) -> None:
        started = time.perf_counter()
        try:
            encoder = await asyncio.to_thread(load_encoder, self.settings)
            label_sets = LabelSetService(self.repository, encoder)
            await asyncio.to_thread(label_sets.install_builtins)
            await asyncio.to_thread(label_sets.prepare_all)
        except MedzeroError as exc:
            self._fail(exc, on_failure)
            return
        except Exception as exc:   # anything unforeseen still leaves a clear state and one log line
            log.exception("start-up failed")
            self._fail(MedzeroError(f"start-up failed: {type(exc).__name__}: {exc}"), on_failure)
            return
        batcher = Batcher(encoder.encode_images, max_batch_size=self.settings.max_batch_size,
                          max_wait_seconds=self.settings.max_wait_ms / 1000,
                          max_queue_images=self.settings.max_queue_images)
        batcher.start()
        methods: dict[str, Method] = {m.name: m for m in (ZeroShot(),)}
        self._encoder, self._batcher, self._label_sets = encoder, batcher, label_sets
        self._classifier = Classifier(encoder, batcher, label_sets, methods,
                                      decode_workers=self.settings.decode_workers,
                                      max_image_pixels=self.settings.max_image_pixels)
        load_seconds = time.perf_counter() - started
        metrics.MODEL_LOAD_SECONDS.set(load_seconds)
        metrics.MODEL.info({"model_id": encoder.model_id, "device": str(encoder.device),
                            "precision": self.settings.precision,
                            "pretrained_weights": str(encoder.has_pretrained_weights).lower()})
        metrics.READY.set(1)
        self.state = "ready"
        log.info("ready: %s on %s, %d label sets, %.1f s", encoder.model_id, encoder.device,
                 len(self.repository.list()), load_seconds)

    def _fail(self, exc: MedzeroError, on_failure: Callable[[MedzeroError], None] | None) -> None:
        self.state, self.failure = "failed", str(exc)
        log.error("cannot start: %s", exc)
        if on_failure is not None:
            on_failure(exc)

    async def stop(self) -> None:
        metrics.READY.set(0)
        self.state = "stopped"
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            await asyncio.gather(self._load_task, return_exceptions=True)
        if self._batcher is not None:
            await self._batcher.stop()
        if self._classifier is not None:
            self._classifier.close()
        self.engine.dispose()
