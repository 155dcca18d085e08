"""The vocabulary every layer shares: label sets, their classes, and how a class becomes prompts.

A leaf like settings and errors (imports nothing from app): the HTTP schemas, the storage repository,
the methods and the jobs all speak in these types, so none of them needs to import another.
"""
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
ClassName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.()/+-]{0,79}$")]
Phrase = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300)]

# Prompt templates per modality; "{}" is replaced by each of a class's names. Written as a reader of that
# modality would caption it, following open_clip's zero-shot template lists.
DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "chest-xray": (
        "a chest X-ray showing {}.",
        "a chest radiograph with {}.",
        "a frontal chest X-ray of a patient with {}.",
        "{} on a chest X-ray.",
    ),
    "dermoscopy": (
        "a dermoscopy image of {}.",
        "a dermatoscopic image showing {}.",
        "a close-up photo of a skin lesion: {}.",
    ),
    "fundus": (
        "a fundus photograph showing {}.",
        "a retinal image with {}.",
        "a color fundus image of an eye with {}.",
    ),
    "breast-ultrasound": (
        "a breast ultrasound image showing {}.",
        "an ultrasound of the breast with {}.",
        "a sonogram of breast tissue showing {}.",
    ),
}
GENERIC_TEMPLATES: tuple[str, ...] = ("a medical image showing {}.", "an image of {}.")

# How a reader of each modality names the image, in words: the description index's prompts ("a chest X-ray of
# pneumonia, which has ...") and the LLM's prompt for new descriptions both say it this way.
MODALITY_NOUNS: dict[str, str] = {
    "chest-xray": "chest X-ray",
    "dermoscopy": "dermoscopy image",
    "fundus": "color fundus photograph",
    "breast-ultrasound": "breast ultrasound image",
}


def modality_noun(modality: str) -> str:
    """The modality as a noun phrase for the image ("knee-xray" -> "knee xray image" when it has no entry)."""
    return MODALITY_NOUNS.get(modality, f"{modality.replace('-', ' ')} image")


class LabelClass(BaseModel):
    """One class of a label set. `name` is what predictions return; the rest feeds the text encoder."""
    model_config = ConfigDict(extra="forbid")

    name: ClassName
    display_name: Phrase | None = Field(None, description="Used in prompts instead of the name.")
    synonyms: list[Phrase] = Field(default_factory=list, max_length=32,
                                   description="Other names; each is put into every template too.")
    prompts: list[Phrase] = Field(default_factory=list, max_length=64,
                                  description="Whole sentences added verbatim to the prompt ensemble.")
    descriptions: list[Phrase] = Field(default_factory=list, max_length=1000,
                                       description="Visual descriptions of the finding (used by KPL).")

    def terms(self) -> list[str]:
        """The names this class is called by in prompts, most specific first, without repeats."""
        first = self.display_name or self.name.replace("_", " ")
        return list(dict.fromkeys([first, *self.synonyms]))


class LabelSetSpec(BaseModel):
    """What a user registers: everything about a label set except its version and timestamps."""
    model_config = ConfigDict(extra="forbid")

    name: Slug
    modality: Slug = Field(description="e.g. chest-xray, dermoscopy, fundus, breast-ultrasound")
    description: str = Field("", max_length=2000)
    classes: list[LabelClass] = Field(min_length=2, max_length=1000)
    templates: list[Phrase] | None = Field(
        None, max_length=64, description="Prompt templates with one '{}'; default: the modality's own.")
    abstain_threshold: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False,
        description="Below this top probability /classify answers decision 'uncertain' (the ranked predictions "
                    "are still returned); a request may override it. None: always decide.")

    @field_validator("classes")
    @classmethod
    def _class_names_unique(cls, classes: list[LabelClass]) -> list[LabelClass]:
        names = [c.name for c in classes]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"class names must be unique; repeated: {', '.join(repeated)}")
        return classes

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str] | None) -> list[str] | None:
        for template in templates or ():
            if template.count("{}") != 1:
                raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
        return templates

    def effective_templates(self) -> tuple[str, ...]:
        if self.templates:
            return tuple(self.templates)
        return DEFAULT_TEMPLATES.get(self.modality, GENERIC_TEMPLATES)

    def class_prompts(self) -> list[list[str]]:
        """Per class, the prompt ensemble: every template x every term, plus the class's own prompts."""
        templates = self.effective_templates()
        return [[t.format(term) for term in c.terms() for t in templates] + list(c.prompts) for c in self.classes]


class LabelSet(LabelSetSpec):
    """A registered label set: the spec plus what the store adds."""
    version: int
    builtin: bool = False
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float
    similarity: float        # cosine similarity of the image to the class's text embedding
