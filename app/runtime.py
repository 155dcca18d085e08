"""Runtime: everything start-up builds once — store, encoder, batcher, label sets, knowledge base, methods,
classifier.

The server builds it in its lifespan and loads the model in the background, so /healthz answers at once and
/readyz turns ready only after the warm-up forward; jobs call `load_core` (same loader, same stores, same
knowledge base) and use the encoder directly.
"""
import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from app import metrics
from app.encoders.batcher import Batcher
from app.encoders.loader import Encoder, load_encoder
from app.errors import MedzeroError, NotReady
from app.knowledge.knowledge_base import KnowledgeBase
from app.methods.base import Method
from app.methods.kpl import KPL, KPLConfig
from app.methods.zero_shot import ZeroShot
from app.services.classify import Classifier
from app.services.kpl_fits import KPLFitService
from app.services.label_sets import LabelSetService
from app.settings import Settings
from app.storage.db import create_db_engine
from app.storage.kpl_fits import KPLFitRepository
from app.storage.label_sets import LabelSetRepository

log = logging.getLogger(__name__)
State = Literal["loading", "ready", "failed", "stopped"]


def kpl_config(settings: Settings) -> KPLConfig:
    return KPLConfig(top_k_descriptions=settings.kpl_top_k_descriptions, tau_text=settings.kpl_tau_text,
                     balance_iters=settings.kpl_balance_iters, balancing=settings.kpl_balancing,
                     alpha=settings.kpl_alpha, tau_image=settings.kpl_tau_image, lr=settings.kpl_lr,
                     proxy_iters=settings.kpl_proxy_iters)


@dataclass
class Core:
    """What both the server and the offline jobs need: the model and what depends on it."""
    encoder: Encoder
    label_sets: LabelSetService
    knowledge: KnowledgeBase
    kpl: KPL


def load_core(settings: Settings, repository: LabelSetRepository, fits: KPLFitRepository, *,
              progress: bool = False, rebuild_index: bool = False) -> Core:
    encoder = load_encoder(settings)
    label_sets = LabelSetService(repository, encoder)
    label_sets.install_builtins()
    label_sets.prepare_all()
    knowledge = KnowledgeBase(corpus_dir=settings.knowledge_base_dir, data_dir=settings.data_dir,
                              model_id=encoder.model_id, dim=encoder.embed_dim, encode_texts=encoder.encode_texts)
    changed = knowledge.sync(label_sets.list(), progress=progress, rebuild=rebuild_index)
    log.info("description index: %d descriptions for %s (%s)", knowledge.manifest.get("count", 0), encoder.model_id,
             f"re-embedded {', '.join(changed)}" if changed else "loaded as saved")
    label_sets.knowledge = knowledge
    return Core(encoder, label_sets, knowledge, KPL(knowledge, fits, kpl_config(settings)))


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = create_db_engine(settings.resolved_database_url)
        self.repository = LabelSetRepository(self.engine)
        self.fits = KPLFitRepository(self.engine)
        self.state: State = "loading"
        self.failure: str | None = None
        self._core: Core | None = None
        self._batcher: Batcher | None = None
        self._classifier: Classifier | None = None
        self._kpl_fits: KPLFitService | None = None
        self._load_task: asyncio.Task | None = None

    # -- what routes use; each raises NotReady until the model is loaded and warm
    @property
    def encoder(self) -> Encoder:
        self._require_ready()
        return self._core.encoder

    @property
    def label_sets(self) -> LabelSetService:
        self._require_ready()
        return self._core.label_sets

    @property
    def knowledge(self) -> KnowledgeBase:
        self._require_ready()
        return self._core.knowledge

    @property
    def classifier(self) -> Classifier:
        self._require_ready()
        return self._classifier

    @property
    def kpl_fits(self) -> KPLFitService:
        self._require_ready()
        return self._kpl_fits

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

    async def _load(self, on_failure: Callable[[MedzeroError], None] | None) -> None:
        started = time.perf_counter()
        try:
            core = await asyncio.to_thread(load_core, self.settings, self.repository, self.fits, progress=True)
        except MedzeroError as exc:
            self._fail(exc, on_failure)
            return
        except Exception as exc:   # anything unforeseen still leaves a clear state and one log line
            log.exception("start-up failed")
            self._fail(MedzeroError(f"start-up failed: {type(exc).__name__}: {exc}"), on_failure)
            return
        settings = self.settings
        batcher = Batcher(core.encoder.encode_images, max_batch_size=settings.max_batch_size,
                          max_wait_seconds=settings.max_wait_ms / 1000, max_queue_images=settings.max_queue_images)
        batcher.start()
        methods: dict[str, Method] = {m.name: m for m in (ZeroShot(), core.kpl)}
        classifier = Classifier(core.encoder, batcher, core.label_sets, methods,
                                decode_workers=settings.decode_workers, max_image_pixels=settings.max_image_pixels)
        self._core, self._batcher, self._classifier = core, batcher, classifier
        self._kpl_fits = KPLFitService(classifier, core.kpl, pool_root=settings.kpl_pool_root,
                                       max_pool_images=settings.kpl_max_pool_images,
                                       max_upload_bytes=settings.max_upload_bytes,
                                       chunk_images=max(1, min(256, settings.max_queue_images // 2)))
        load_seconds = time.perf_counter() - started
        metrics.MODEL_LOAD_SECONDS.set(load_seconds)
        metrics.MODEL.info({"model_id": core.encoder.model_id, "device": str(core.encoder.device),
                            "precision": settings.precision,
                            "pretrained_weights": str(core.encoder.has_pretrained_weights).lower()})
        metrics.READY.set(1)
        self.state = "ready"
        log.info("ready: %s on %s, %d label sets, %.1f s", core.encoder.model_id, core.encoder.device,
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
