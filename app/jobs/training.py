"""What every offline training job shares (`medzero train meduna`, `medzero train hica`): reading images as
/classify reads them, the label set's description embeddings, resumable checkpoints of one run, and the bundle
(adapter.safetensors + manifest.json) the server loads through /adapters."""
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from app import __version__
from app.errors import InvalidInput, MedzeroError
from app.imaging.decode import decode_image
from app.methods.base import ClassHead
from app.methods.bundle import ADAPTER_FILE, MANIFEST_FILE
from app.runtime import Runtime
from app.settings import Settings

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"


def refuse_to_overwrite(out_dir: Path, force: bool) -> None:
    finished = [name for name in (ADAPTER_FILE, MANIFEST_FILE) if (out_dir / name).exists()]
    if finished and not force:
        raise InvalidInput(f"{out_dir} already holds a trained adapter ({', '.join(finished)}); pass --force to "
                           "replace it (nothing was changed)")


def decode_training_image(path: Path, settings: Settings) -> Image.Image:
    """A file decoded as /classify decodes an upload (same size, pixel and aspect limits)."""
    if path.stat().st_size > settings.max_upload_bytes:
        raise InvalidInput(f"file larger than MEDZERO_MAX_UPLOAD_BYTES={settings.max_upload_bytes}")
    return decode_image(path.read_bytes(), max_pixels=settings.max_image_pixels,
                        max_aspect_ratio=settings.max_aspect_ratio).image


def usable_images(paths: Sequence[Path], settings: Settings) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files that decode as /classify would decode them; the others with their error."""
    usable, skipped = [], []
    for path in paths:
        try:
            decode_training_image(path, settings)
            usable.append(path)
        except MedzeroError as exc:
            skipped.append((str(path), f"{exc.code}: {exc}"))
    return usable, skipped


def description_features(runtime: Runtime, head: ClassHead) -> tuple[torch.Tensor, torch.Tensor]:
    """Every description of every class, as the description index holds it (normalised), and its class; a class
    without descriptions is represented by its prompt ensemble, as KPL does."""
    vectors, labels = [], []
    for c, class_name in enumerate(head.class_names):
        found, _ = runtime.knowledge.class_descriptions(head.label_set, class_name)
        found = found if len(found) else head.class_weights[c:c + 1].numpy()
        vectors.append(torch.from_numpy(np.asarray(found, dtype=np.float32)))
        labels.append(torch.full((len(found),), c, dtype=torch.long))
    return F.normalize(torch.cat(vectors), dim=-1), torch.cat(labels)


def run_fingerprint(run: dict, *tensors: torch.Tensor) -> str:
    """What a checkpoint must match to be resumed from: the run's JSON description (model, label set, version,
    config, images) and the data tensors it learns from."""
    digest = hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode())
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def start_fresh(checkpoints: Path) -> None:
    """An earlier run's checkpoints go: a later --resume must not find them."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    for stale in checkpoints.glob("*.pt"):
        stale.unlink()


def save_checkpoint(state: dict, path: Path) -> None:
    """Via a temporary name: a job killed while saving leaves the previous checkpoint, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def latest_checkpoint(checkpoints: Path, fingerprint: str) -> dict | None:
    """The newest checkpoint of this very run (same model, label set, images and settings), or None."""
    others = []
    epochs = sorted((p for p in checkpoints.glob("epoch-*.pt") if p.stem[len("epoch-"):].isdigit()),
                    key=lambda p: int(p.stem[len("epoch-"):]), reverse=True)
    for path in epochs + [checkpoints / "stage1.pt"]:
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False)   # resumable on another device
            if state.get("fingerprint") == fingerprint:
                log.info("resuming from %s", path.name)
                return state
            others.append(path.name)
    if others:
        raise InvalidInput(f"the checkpoints in {checkpoints} ({', '.join(others[:3])}) are from another run "
                           "(model, label set, images or settings differ); train into a new --out, or drop --resume")
    return None


def manifest_identity(runtime: Runtime, head: ClassHead, *, method: str, bundle_format: str) -> dict:
    """The manifest fields the server checks a bundle by (app.services.adapters), and provenance."""
    knowledge = runtime.knowledge.manifest
    return {
        "format": bundle_format, "method": method, "model_id": head.model_id, "label_set": head.label_set,
        "label_set_version": head.version, "class_names": list(head.class_names),
        "corpus_hash": knowledge.get("corpus_hash"),
        "descriptions_hash": knowledge.get("groups", {}).get(head.label_set),   # what the job learned from
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "medzero_version": __version__, "torch_version": torch.__version__,
    }


def write_bundle(out_dir: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> dict:
    """adapter.safetensors, then manifest.json (with the adapter's sha256), each via a temporary name; -> the
    manifest as written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_tmp = out_dir / f".{ADAPTER_FILE}.tmp"
    save_file({name: value.detach().cpu().contiguous().float() for name, value in tensors.items()},
              str(adapter_tmp), metadata={"format": manifest["format"]})
    digest = hashlib.sha256(adapter_tmp.read_bytes()).hexdigest()
    manifest_tmp = out_dir / f".{MANIFEST_FILE}.tmp"
    text = json.dumps({**manifest, "files": {ADAPTER_FILE: {"sha256": digest}}}, indent=2)
    manifest_tmp.write_text(text)
    os.replace(adapter_tmp, out_dir / ADAPTER_FILE)
    os.replace(manifest_tmp, out_dir / MANIFEST_FILE)
    return json.loads(text)
