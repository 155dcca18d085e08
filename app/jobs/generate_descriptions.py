"""`medzero kb generate --label-set NAME`: LLM-written visual descriptions for each class of a label set, appended
to knowledge_base/<NAME>.json with their provenance (source ``llm:<model>``).

The label set is the registered one (the database) or, when none is registered under that name, the built-in one.
The configured text encoder (the server's runtime, without the description index) tells near-duplicate phrases
apart. Prints nothing: the CLI prints the report it returns.
"""
import asyncio

from app.domain import LabelSetSpec
from app.errors import LabelSetNotFound
from app.knowledge.generate import GenerationReport, check_llm_settings, generate_descriptions
from app.runtime import Runtime
from app.services.builtin_label_sets import BUILTIN_LABEL_SETS
from app.settings import Settings
from app.storage.label_sets import LabelSetRepository


def main(settings: Settings, label_set_name: str, n_per_class: int, *, progress: bool = True) -> GenerationReport:
    check_llm_settings(settings)          # a missing MEDZERO_LLM_URL is refused before the model loads
    return asyncio.run(_generate(settings, label_set_name, n_per_class, progress))


async def _generate(settings: Settings, label_set_name: str, n_per_class: int, progress: bool) -> GenerationReport:
    async with Runtime.for_job(settings, progress=progress, index="skip") as runtime:
        label_set = find_label_set(runtime.repository, label_set_name)
        encoder, batcher = runtime.encoder, runtime.batcher
        return await asyncio.to_thread(
            generate_descriptions, settings, label_set=label_set, n_per_class=n_per_class,
            encode_texts=lambda texts: batcher.run_sync(encoder.encode_texts, texts), progress=progress)


def find_label_set(repository: LabelSetRepository, name: str) -> LabelSetSpec:
    """The registered label set called `name`, else the built-in one; LabelSetNotFound when neither exists."""
    try:
        return repository.get(name)
    except LabelSetNotFound:
        pass
    for spec in BUILTIN_LABEL_SETS:
        if spec.name == name:
            return spec
    known = ", ".join(spec.name for spec in BUILTIN_LABEL_SETS)
    raise LabelSetNotFound(f"no label set named {name!r} is registered, nor built in (built-in: {known})")
