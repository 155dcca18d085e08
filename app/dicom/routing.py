"""Routing rules: which label set and method an incoming DICOM instance is classified with.

A YAML file (MEDZERO_DICOM_ROUTES_FILE) lists rules in order; the first whose every given condition holds wins:

    rules:
      - name: chest-radiographs
        modality: [CR, DX]                 # any of; DICOM Modality
        body_part: [CHEST]                 # any of; BodyPartExamined, case-insensitive
        label_set: chest-xray-pneumonia
        method: zeroshot
      - name: breast-ultrasound
        modality: [US]
        series_description: "(?i)breast"   # a regex searched in SeriesDescription
        sop_class_uid: ["1.2.840.10008.5.1.4.1.1.6.1"]
        label_set: breast-ultrasound

An instance no rule matches is skipped with a reason naming what it carried (Modality, BodyPartExamined, SOP
class) -- never SeriesDescription or any other free text, which may hold patient data.
"""
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydicom.dataset import Dataset
from pydicom.uid import UID

from app.errors import InvalidInput


class RouteRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    label_set: str = Field(min_length=1)
    method: str = "zeroshot"
    modality: list[str] | None = Field(None, description="Any of these Modality values.")
    body_part: list[str] | None = Field(None, description="Any of these BodyPartExamined values (case-insensitive).")
    sop_class_uid: list[str] | None = Field(None, description="Any of these SOP Class UIDs.")
    series_description: str | None = Field(None, description="A regex searched in SeriesDescription.")

    @field_validator("series_description")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"series_description is not a regex: {exc}") from None
        return pattern

    def matches(self, facts: "InstanceFacts") -> bool:
        return ((self.modality is None or facts.modality in self.modality)
                and (self.body_part is None or facts.body_part.upper() in {b.upper() for b in self.body_part})
                and (self.sop_class_uid is None or facts.sop_class_uid in self.sop_class_uid)
                and (self.series_description is None
                     or re.search(self.series_description, facts.series_description) is not None))


@dataclass(frozen=True)
class InstanceFacts:
    """What routing looks at, read once from a dataset."""
    modality: str
    body_part: str
    sop_class_uid: str
    series_description: str

    @classmethod
    def of(cls, dataset: Dataset) -> "InstanceFacts":
        return cls(str(dataset.get("Modality", "") or ""), str(dataset.get("BodyPartExamined", "") or ""),
                   str(dataset.get("SOPClassUID", "") or ""), str(dataset.get("SeriesDescription", "") or ""))

    def described(self) -> str:
        """For skip reasons and logs: the coded facts only (free text may carry patient data)."""
        sop_class = UID(self.sop_class_uid).name if self.sop_class_uid else "none"
        return (f"Modality={self.modality or 'none'}, BodyPartExamined={self.body_part or 'none'}, "
                f"SOP class={sop_class}")


@dataclass(frozen=True)
class Route:
    rule: str
    label_set: str
    method: str


@dataclass(frozen=True)
class Skip:
    reason: str


class RoutingTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[RouteRule] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _names_unique(cls, rules: list[RouteRule]) -> list[RouteRule]:
        names = [rule.name for rule in rules]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"rule names must be unique; repeated: {', '.join(repeated)}")
        return rules

    def route(self, dataset: Dataset) -> Route | Skip:
        """The first matching rule's label set and method, or why the instance is skipped."""
        facts = InstanceFacts.of(dataset)
        for rule in self.rules:
            if rule.matches(facts):
                return Route(rule.name, rule.label_set, rule.method)
        return Skip(f"no routing rule matches {facts.described()}" if self.rules
                    else "no routing rules are configured (MEDZERO_DICOM_ROUTES_FILE or PUT /routes)")


def load_routes(path: Path) -> RoutingTable:
    """A routing table from YAML; one InvalidInput naming the file and what is wrong with it."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput(f"cannot read routing rules {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InvalidInput(f"routing rules {path} are not YAML: {exc}") from exc
    try:
        return RoutingTable.model_validate(data if data is not None else {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors())
        raise InvalidInput(f"routing rules {path}: {problems}") from exc
