"""`medzero kb build`: embed every description of the corpus (and of the registered label sets) with the
configured model's text tower and write its FAISS index and manifest from scratch."""
from app.runtime import load_core
from app.settings import Settings
from app.storage.db import create_db_engine
from app.storage.kpl_fits import KPLFitRepository
from app.storage.label_sets import LabelSetRepository


def main(settings: Settings, *, progress: bool = True) -> dict:
    """Returns the new index's manifest (model id, corpus hash, count, dimension, build time)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(settings.resolved_database_url)
    try:
        core = load_core(settings, LabelSetRepository(engine), KPLFitRepository(engine), progress=progress,
                         rebuild_index=True)
        return {**core.knowledge.manifest, "path": str(core.knowledge.directory)}
    finally:
        engine.dispose()
