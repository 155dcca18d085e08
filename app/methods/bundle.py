"""A trained adapter bundle, for every method that has one (`medzero train meduna`, `medzero train hica`): the
folder (or one .tar.gz / .zip of it) with adapter.safetensors and manifest.json. The manifest's `method` says
whose it is and `format` its version; its identity fields (model id, label set, version, class order, description
corpus) are checked against the server by app.services.adapters, its tensors by the method's `from_bundle`."""
from datetime import datetime
from typing import Protocol

import torch

from app.methods.base import ClassHead, StatefulMethod

ADAPTER_FILE, MANIFEST_FILE = "adapter.safetensors", "manifest.json"


class Adapter(Protocol):
    """A bundle as the server keeps it: the label set's current state of its method's kind."""
    adapter_id: str                    # sha256 of its adapter.safetensors
    label_set: str
    label_set_version: int
    model_id: str
    class_names: tuple[str, ...]
    manifest: dict
    version: int
    created_at: datetime | None

    def to_state(self) -> tuple[dict, dict]: ...


class AdapterMethod(StatefulMethod, Protocol):
    bundle_format: str                 # the manifest `format` this server reads for the method

    def from_bundle(self, tensors: dict[str, torch.Tensor], manifest: dict, head: ClassHead, adapter_id: str, *,
                    embed_dim: int, vision_width: int | None) -> Adapter:
        """The bundle's tensors checked against this model and label set (InvalidAdapter naming what is wrong)."""
        ...
