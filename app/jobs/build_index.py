"""`medzero kb build`: embed every description of the corpus (and of the registered label sets) with the
configured model's text tower and write its FAISS index and manifest from scratch."""
import asyncio

from app.runtime import Runtime
from app.settings import Settings


def main(settings: Settings, *, progress: bool = True) -> dict:
    """Returns the new index's manifest (model id, corpus hash, count, dimension, build time)."""
    return asyncio.run(_build(settings, progress))


async def _build(settings: Settings, progress: bool) -> dict:
    async with Runtime.for_job(settings, progress=progress, index="rebuild") as runtime:
        return {**runtime.knowledge.manifest, "path": str(runtime.knowledge.directory)}
