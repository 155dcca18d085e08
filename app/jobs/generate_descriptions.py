"""`medzero kb generate --label-set NAME`: LLM-written visual descriptions for each class of a label set, appended
to knowledge_base/<NAME>.json with their provenance (source ``llm:<model>``).

The label set is the registered one (the database) or, when none is registered under that name, the built-in one.
The configured text encoder is loaded only to tell near-duplicate phrases apart. Prints nothing: the CLI prints
the report it returns.
"""
from app.domain import LabelSetSpec
from app.encoders.loader import load_encoder
from app.errors import LabelSetNotFound
from app.knowledge.generate import GenerationReport, check_llm_settings, generate_descriptions
from app.services.builtin_label_sets import BUILTIN_LABEL_SETS
from app.settings import Settings
from app.storage.db import create_db_engine
from app.storage.label_sets import LabelSetRepository


def main(settings: Settings, label_set_name: str, n_per_class: int, *, progress: bool = True) -> GenerationReport:
    label_set = find_label_set(settings, label_set_name)
    check_llm_settings(settings)          # a missing MEDZERO_LLM_URL is refused before the model loads
    encoder = load_encoder(settings)
    return generate_descriptions(settings, label_set=label_set, n_per_class=n_per_class,
                                 encode_texts=encoder.encode_texts, progress=progress)


def find_label_set(settings: Settings, name: str) -> LabelSetSpec:
    """The registered label set called `name`, else the built-in one; LabelSetNotFound when neither exists."""
    engine = create_db_engine(settings.resolved_database_url)
    try:
        return LabelSetRepository(engine).get(name)
    except LabelSetNotFound:
        pass
    finally:
        engine.dispose()
    for spec in BUILTIN_LABEL_SETS:
        if spec.name == name:
            return spec
    known = ", ".join(spec.name for spec in BUILTIN_LABEL_SETS)
    raise LabelSetNotFound(f"no label set named {name!r} is registered, nor built in (built-in: {known})")
