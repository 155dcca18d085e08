"""Runtime: everything start-up builds once -- store, encoder, batcher, label sets, knowledge base, methods and
their state store, admission, the use cases -- for the server and for the offline jobs alike.

The server builds it in its lifespan and loads the model in the background (`start_loading`), so /healthz answers
at once and /readyz turns ready only after the warm-up forward; a job uses `Runtime.for_job(settings)`, which
loads the same way and waits. Either way all model work (image forwards, text embeddings for label sets and the
description index) runs on the batcher's one encoder thread.
"""
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from app import __version__, metrics
from app.dicom.scp import StoreSCP
from app.encoders.batcher import Batcher
from app.encoders.loader import Encoder, load_encoder
from app.encoders.visual_prompts import vision_width
from app.errors import MedzeroError, NotReady
from app.knowledge.index import resolve_index_device
from app.knowledge.knowledge_base import KnowledgeBase
from app.methods.base import Method
from app.methods.fewshot import FewShot, FewShotConfig
from app.methods.hica import HiCA
from app.methods.kpl import KPL, KPLConfig
from app.methods.meduna import MedUnA
from app.methods.zero_shot import ZeroShot
from app.services.adapters import AdapterService
from app.services.admission import Admission
from app.services.builtin_label_sets import BUILTIN_LABEL_SETS
from app.services.calibration import CalibrationService
from app.services.classify import Classifier, ImageLimits, MetricLabelSets, state_key
from app.services.delivery import DeliveryService, delivery_targets
from app.services.ingest import IngestService
from app.services.kpl_fits import KPLFitService
from app.services.label_sets import LabelSetService
from app.services.routing import RoutingService
from app.services.support_sets import SupportSetService
from app.settings import Settings
from app.storage.api_keys import ApiKeyRepository
from app.storage.db import create_db_engine
from app.storage.deliveries import DeliveryRepository
from app.storage.inbox import InboxRepository
from app.storage.label_sets import LabelSetRepository
from app.storage.method_states import MethodStateRepository
from app.storage.routes import RouteRepository

log = logging.getLogger(__name__)
State = Literal["loading", "ready", "failed", "stopped"]
IndexSync = Literal["sync", "rebuild", "skip"]   # load the saved description index and catch up; from scratch; not


def kpl_config(settings: Settings) -> KPLConfig:
    return KPLConfig(top_k_descriptions=settings.kpl_top_k_descriptions, tau_text=settings.kpl_tau_text,
                     balance_iters=settings.kpl_balance_iters, balancing=settings.kpl_balancing,
                     alpha=settings.kpl_alpha, tau_image=settings.kpl_tau_image, lr=settings.kpl_lr,
                     proxy_iters=settings.kpl_proxy_iters)


def prompt_width(encoder: Encoder) -> int | None:
    """The token width visual prompts need, or None when the vision tower is no transformer (no meduna)."""
    try:
        return vision_width(encoder.model.visual)
    except TypeError:
        return None


def metric_label_sets(settings: Settings) -> MetricLabelSets:
    """Built-in label sets with their own class names, plus the allow-listed ones with all of theirs."""
    allowed: dict[str, frozenset[str] | None] = {spec.name: frozenset(c.name for c in spec.classes)
                                                  for spec in BUILTIN_LABEL_SETS}
    return allowed | {name: None for name in settings.metrics_label_sets}


@dataclass(frozen=True)
class Core:
    """What loading builds: the model and everything that depends on it."""
    encoder: Encoder
    batcher: Batcher
    label_sets: LabelSetService
    knowledge: KnowledgeBase
    classifier: Classifier
    kpl_fits: KPLFitService
    calibrations: CalibrationService
    adapters: AdapterService
    support_sets: SupportSetService
    routing: RoutingService
    ingest: IngestService
    deliveries: DeliveryService


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.startup_seconds: float | None = None      # start to ready: model, engine, label sets, index
        self.max_batch_size: int | None = None         # images per forward, once the encoder's device is known
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = create_db_engine(settings.resolved_database_url, busy_timeout_ms=settings.db_busy_timeout_ms)
        self.repository = LabelSetRepository(self.engine)
        self.states = MethodStateRepository(self.engine)
        self.inbox = InboxRepository(self.engine, owner=settings.resolved_replica_id)
        self.api_keys = ApiKeyRepository(self.engine)
        self._workers: list[asyncio.Task] = []
        self._scp: StoreSCP | None = None
        self.admission = Admission(settings.max_in_flight_images, settings.max_concurrent_batch_bodies)
        self._state: State = "loading"
        self._failure: str | None = None
        self._core: Core | None = None
        self._batcher: Batcher | None = None
        self._load_task: asyncio.Task | None = None

    @classmethod
    @asynccontextmanager
    async def for_job(cls, settings: Settings, *, progress: bool = True,
                      index: IndexSync = "sync") -> AsyncIterator["Runtime"]:
        """The server's runtime for an offline job: loaded (raising what start-up would report), then stopped."""
        runtime = cls(settings)
        try:
            await runtime.load(progress=progress, index=index)
            yield runtime
        finally:
            await runtime.stop()

    # -- what routes and jobs use; each raises NotReady until the model is loaded and warm
    @property
    def encoder(self) -> Encoder:
        return self._ready_core().encoder

    @property
    def batcher(self) -> Batcher:
        return self._ready_core().batcher

    @property
    def label_sets(self) -> LabelSetService:
        return self._ready_core().label_sets

    @property
    def knowledge(self) -> KnowledgeBase:
        return self._ready_core().knowledge

    @property
    def classifier(self) -> Classifier:
        return self._ready_core().classifier

    @property
    def kpl_fits(self) -> KPLFitService:
        return self._ready_core().kpl_fits

    @property
    def calibrations(self) -> CalibrationService:
        return self._ready_core().calibrations

    @property
    def adapters(self) -> AdapterService:
        return self._ready_core().adapters

    @property
    def support_sets(self) -> SupportSetService:
        return self._ready_core().support_sets

    @property
    def routing(self) -> RoutingService:
        return self._ready_core().routing

    @property
    def ingest(self) -> IngestService:
        return self._ready_core().ingest

    @property
    def deliveries(self) -> DeliveryService:
        return self._ready_core().deliveries

    @property
    def dicom_port(self) -> int | None:
        """The port the C-STORE SCP listens on (the bound one when MEDZERO_DICOM_PORT=0), or None."""
        return self._scp.port if self._scp else None

    def _start_dicom(self, core: Core) -> None:
        """The server's DICOM side, not a job's: the inbox worker (classifies what was queued, also before a
        crash), the delivery worker (SRs and webhooks) and, when MEDZERO_DICOM_PORT is set, the C-STORE SCP."""
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(core.ingest.run(), name="medzero-ingest"),
                         loop.create_task(core.deliveries.run(), name="medzero-deliveries")]
        settings = self.settings
        if settings.dicom_port is not None:
            self._scp = StoreSCP(core.ingest, ae_title=settings.dicom_ae_title,
                                 allowed_ae_titles=settings.dicom_allowed_ae_titles,
                                 timeout_seconds=settings.dicom_network_timeout_seconds,
                                 max_instance_bytes=settings.max_upload_bytes)
            self._scp.start(settings.resolved_dicom_host, settings.dicom_port)
            if not settings.dicom_allowed_ae_titles:
                log.warning("the DICOM SCP accepts any calling AE title; set MEDZERO_DICOM_ALLOWED_AE_TITLES")

    @property
    def state(self) -> State:
        """ready | loading | failed | stopped; a batching task or DICOM worker that died makes a ready server
        'failed'."""
        if self._state == "ready" and ((self._batcher is not None and self._batcher.failure)
                                       or self._dead_worker() is not None):
            return "failed"
        return self._state

    @property
    def failure(self) -> str | None:
        dead = self._dead_worker()
        return (self._failure or (self._batcher.failure if self._batcher is not None else None)
                or (f"the {dead.get_name()} task stopped: {dead.exception()!r}" if dead is not None else None))

    def _dead_worker(self) -> asyncio.Task | None:
        """A DICOM worker that ended by itself (they retry every error, so only a bug can end one)."""
        return next((w for w in self._workers if w.done() and not w.cancelled()), None)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def _ready_core(self) -> Core:
        if not self.ready:
            detail = f": {self.failure}" if self.failure else "; retry shortly"
            raise NotReady(f"the model is {self.state}{detail}")
        return self._core

    # -- lifecycle
    def start_loading(self, on_failure: Callable[[MedzeroError], None] | None = None) -> None:
        """Load in the background; `on_failure` lets the CLI end the process with the error."""
        self._load_task = asyncio.get_running_loop().create_task(self._load_reporting(on_failure),
                                                                 name="medzero-load")

    async def _load_reporting(self, on_failure: Callable[[MedzeroError], None] | None) -> None:
        try:
            await self.load(progress=True, serve_dicom=True)
        except MedzeroError as exc:
            log.error("cannot start: %s", exc)
            if on_failure is not None:
                on_failure(exc)

    async def load(self, *, progress: bool = False, index: IndexSync = "sync", serve_dicom: bool = False) -> None:
        """Load the encoder, start the batcher, then build what depends on them (and, for the server, start the
        DICOM workers and listener before turning ready); MedzeroError when it cannot."""
        started = time.perf_counter()
        try:
            encoder = await asyncio.to_thread(load_encoder, self.settings)
            self.max_batch_size = self.settings.resolved_max_batch_size(encoder.device.type)
            self._batcher = Batcher(encoder.encode_images, max_batch_size=self.max_batch_size,
                                    max_wait_seconds=self.settings.max_wait_ms / 1000,
                                    timeout_seconds=self.settings.encode_timeout_seconds)
            self._batcher.start()
            self._core = await asyncio.to_thread(self._build, encoder, self._batcher, progress, index)
            if serve_dicom:
                self._start_dicom(self._core)
        except MedzeroError as exc:
            self._fail(str(exc))
            raise
        except Exception as exc:   # anything unforeseen still leaves a clear state and one log line
            log.exception("start-up failed")
            self._fail(f"start-up failed: {type(exc).__name__}: {exc}")
            raise MedzeroError(self._failure) from exc
        load_seconds = time.perf_counter() - started
        self.startup_seconds = load_seconds
        metrics.MODEL_LOAD_SECONDS.set(load_seconds)
        metrics.MODEL.info({"model_id": encoder.model_id, "device": str(encoder.device),
                            "precision": self.settings.precision,
                            "pretrained_weights": str(encoder.has_pretrained_weights).lower()})
        engine = encoder.image_engine
        if engine is not None:
            metrics.IMAGE_ENGINE.info({"engine": engine.choice.engine, "precision": engine.choice.precision,
                                       "reason": engine.reason})
            metrics.ENGINE_SETUP_SECONDS.set(engine.seconds)
        metrics.READY.set(1)
        self._state = "ready"
        log.info("ready: %s on %s, %d label sets, %.1f s", encoder.model_id, encoder.device,
                 len(self.repository.list()), load_seconds)

    def _build(self, encoder: Encoder, batcher: Batcher, progress: bool, index: IndexSync) -> Core:
        settings = self.settings

        def encode_texts(texts: Sequence[str]) -> torch.Tensor:
            return batcher.run_sync(encoder.encode_texts, texts)

        knowledge = KnowledgeBase(corpus_dir=settings.knowledge_base_dir, data_dir=settings.data_dir,
                                  model_id=encoder.model_id, dim=encoder.embed_dim, encode_texts=encode_texts,
                                  index_device=resolve_index_device(settings.index_device, encoder.device.type))
        label_sets = LabelSetService(self.repository, encode_texts=encode_texts, model_id=encoder.model_id,
                                     knowledge=knowledge, max_texts=settings.max_label_set_texts)
        label_sets.install_builtins()
        label_sets.prepare_all()
        if index != "skip":
            changed = knowledge.sync(label_sets.list(), progress=progress, rebuild=index == "rebuild")
            log.info("description index: %d descriptions for %s, searched on %s (%s)",
                     knowledge.manifest.get("count", 0), encoder.model_id, knowledge.index_device,
                     f"re-embedded {', '.join(changed)}" if changed else "loaded as saved")
        kpl, meduna, hica = KPL(knowledge, kpl_config(settings)), MedUnA(), HiCA(encoder.model.visual)
        fewshot = FewShot(FewShotConfig(alpha=settings.fewshot_alpha, beta=settings.fewshot_beta), kpl=kpl,
                          kpl_state=lambda head: self.states.current(state_key(kpl, head), kpl.load_state))
        methods: dict[str, Method] = {m.name: m for m in (ZeroShot(), kpl, meduna, hica, fewshot)}
        classifier = Classifier(preprocess=encoder.preprocess, logit_scale=encoder.logit_scale, batcher=batcher,
                                label_sets=label_sets, states=self.states, methods=methods, admission=self.admission,
                                decode_workers=settings.decode_workers,
                                limits=ImageLimits(settings.max_image_pixels, settings.max_aspect_ratio),
                                metric_label_sets=metric_label_sets(settings), decision_rule=settings.decision_rule,
                                pool_chunk_images=max(1, min(256, settings.max_in_flight_images // 2)),
                                permit_timeout_seconds=settings.encode_timeout_seconds)
        kpl_fits = KPLFitService(classifier, kpl, self.states, pool_root=settings.kpl_pool_root,
                                 max_pool_images=settings.kpl_max_pool_images,
                                 max_upload_bytes=settings.max_upload_bytes)
        adapters = AdapterService([meduna, hica], self.states, head=label_sets.head,
                                  label_set_names=lambda: [ls.name for ls in label_sets.list()],
                                  descriptions_hash=lambda name: knowledge.manifest.get("groups", {}).get(name),
                                  embed_dim=encoder.embed_dim, vision_width=prompt_width(encoder),
                                  max_member_bytes=settings.max_upload_bytes)
        loaded = adapters.load_dir(settings.resolved_adapters_dir)
        if loaded:
            log.info("adapters: %d bundles under %s", len(loaded), settings.resolved_adapters_dir)
        routing = RoutingService(RouteRepository(self.engine), settings.dicom_routes_file)
        routing.load()
        deliveries = DeliveryService(DeliveryRepository(self.engine, owner=settings.resolved_replica_id), self.inbox,
                                     settings,
                                     pretrained_weights=lambda: encoder.has_pretrained_weights,
                                     software_version=__version__)
        ingest = IngestService(self.inbox, routing, classifier, deliveries=delivery_targets(settings),
                               on_result=deliveries.wake, lease_seconds=settings.ingest_lease_seconds,
                               max_attempts=settings.ingest_max_attempts, retry_seconds=settings.ingest_retry_seconds,
                               workers=settings.ingest_workers, max_pixels=settings.max_image_pixels)
        support_sets = SupportSetService(classifier, fewshot, self.states, max_images=settings.max_support_images)
        return Core(encoder, batcher, label_sets, knowledge, classifier, kpl_fits,
                    CalibrationService(classifier, self.states), adapters, support_sets, routing, ingest, deliveries)

    def _fail(self, reason: str) -> None:
        self._state, self._failure = "failed", reason

    async def stop(self) -> None:
        metrics.READY.set(0)
        self._state = "stopped"
        if self._scp is not None:
            await asyncio.to_thread(self._scp.stop)
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            await asyncio.gather(self._load_task, return_exceptions=True)
        if self._batcher is not None:
            await self._batcher.stop()
        if self._core is not None:
            self._core.classifier.close()
        self.engine.dispose()
