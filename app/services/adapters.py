"""Trained adapters as the server's method state: a bundle from `medzero train meduna` or `medzero train hica`
(adapter.safetensors + manifest.json, or one .tar.gz / .zip of them) is checked against what the server runs --
the model id, the label set's version and class order, the description corpus, and the tensors against the model
(the method's `from_bundle`) -- and stored as the label set's state of that method's kind (one transaction: a
valid bundle for the same label set and method replaces the old one, a refused one changes nothing).
Every bundle under MEDZERO_ADAPTERS_DIR is loaded at start-up the same way.
"""
import dataclasses
import hashlib
import io
import json
import logging
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from app.errors import AdapterMismatch, InvalidAdapter, UnknownAdapter
from app.methods.base import ClassHead
from app.methods.bundle import ADAPTER_FILE, MANIFEST_FILE, Adapter, AdapterMethod
from app.storage.method_states import MethodStateRepository, StateKey

log = logging.getLogger(__name__)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


class AdapterService:
    def __init__(self, methods: Sequence[AdapterMethod], states: MethodStateRepository, *,
                 head: Callable[[str], ClassHead], label_set_names: Callable[[], list[str]],
                 descriptions_hash: Callable[[str], str | None], embed_dim: int, vision_width: int | None,
                 max_member_bytes: int) -> None:
        self._methods = {method.name: method for method in methods}
        self._states = states
        self._head = head                        # sync: LabelSetService.head
        self._label_set_names = label_set_names
        self._descriptions_hash = descriptions_hash   # label set -> hash of its description group in the index
        self._max_member_bytes = max_member_bytes
        self._embed_dim = embed_dim
        self._vision_width = vision_width        # None: the vision tower takes no prompt tokens

    def install(self, files: dict[str, bytes]) -> Adapter:
        """Check a bundle ({file name: bytes}) and make it its label set's current adapter of its method."""
        manifest, adapter_bytes = read_bundle(files, self._max_member_bytes)
        method = self._method_of(manifest)
        head = self._head(_field(manifest, "label_set", str))
        adapter = self._checked(method, manifest, adapter_bytes, head)
        current = self._current(method, head)
        if current is not None and current.adapter_id == adapter.adapter_id:
            return current                       # the same bundle again (a restart): nothing to do
        stamp = self._states.add(self._key(method, head), *adapter.to_state())
        log.info("%s adapter %s for %s v%d loaded (%s)", method.name, adapter.adapter_id[:12], head.label_set,
                 head.version, head.model_id)
        return dataclasses.replace(adapter, version=stamp.version, created_at=stamp.created_at)

    def list_loaded(self) -> list[Adapter]:
        """The current adapter of every label set and method that has one (under the loaded model, current
        versions), by label set, then method."""
        return list(self._loaded())

    def _loaded(self) -> Iterator[Adapter]:
        for name in self._label_set_names():
            head = self._head(name)
            for method in self._methods.values():
                adapter = self._current(method, head)
                if adapter is not None:
                    yield adapter

    def get(self, adapter_id: str) -> Adapter:
        for adapter in self._loaded():
            if adapter.adapter_id == adapter_id or (len(adapter_id) >= 12
                                                    and adapter.adapter_id.startswith(adapter_id)):
                return adapter
        raise UnknownAdapter(f"no loaded adapter {adapter_id!r}; GET /adapters lists them")

    def delete(self, adapter_id: str) -> Adapter:
        adapter = self.get(adapter_id)
        method = self._methods[adapter.manifest.get("method", "meduna")]
        self._states.delete(method.state_kind, adapter.label_set, adapter.model_id)
        return adapter

    def load_dir(self, folder: Path) -> list[str]:
        """The bundles under `folder` (sub-folders with a manifest, archives, in name order) for label sets that
        have no adapter of that method yet: one uploaded or loaded before is never overridden by a restart (or a
        job), and of two bundles for one label set and method the first wins. A refused bundle is logged, never
        fatal. -> the ids loaded."""
        loaded = []
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            try:
                if path.is_dir() and (path / MANIFEST_FILE).is_file():
                    files = {name: (path / name).read_bytes() for name in (ADAPTER_FILE, MANIFEST_FILE)
                             if (path / name).is_file()}
                elif path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
                    files = {path.name: path.read_bytes()}
                else:
                    continue
                manifest, adapter_bytes = read_bundle(files, self._max_member_bytes)
                method = self._method_of(manifest)
                current = self._current(method, self._head(_field(manifest, "label_set", str)))
                if current is not None:
                    if current.adapter_id != hashlib.sha256(adapter_bytes).hexdigest():
                        log.info("adapter bundle %s not loaded: %s already has %s adapter %s", path,
                                 current.label_set, method.name, current.adapter_id[:12])
                    continue
                loaded.append(self.install(files).adapter_id)
            except Exception as exc:      # a bad bundle on disk must not stop the server from starting
                log.warning("adapter bundle %s not loaded: %s", path, exc)
        return loaded

    def _method_of(self, manifest: dict) -> AdapterMethod:
        name = manifest.get("method", "meduna")      # the first MedUnA bundles may predate the field
        method = self._methods.get(name) if isinstance(name, str) else None
        if method is None:
            raise InvalidAdapter(f"{MANIFEST_FILE} is for method {name!r}; this server loads bundles of "
                                 f"{', '.join(sorted(self._methods))}")
        return method

    def _current(self, method: AdapterMethod, head: ClassHead) -> Adapter | None:
        return self._states.current(self._key(method, head), method.load_state)

    @staticmethod
    def _key(method: AdapterMethod, head: ClassHead) -> StateKey:
        return StateKey(method.state_kind, head.label_set, head.version, head.model_id)

    def _checked(self, method: AdapterMethod, manifest: dict, adapter_bytes: bytes, head: ClassHead) -> Adapter:
        if manifest.get("format") != method.bundle_format:
            raise InvalidAdapter(f"manifest format {manifest.get('format')!r}; this server reads "
                                 f"{method.bundle_format!r} for {method.name}")
        for name, kind in (("model_id", str), ("label_set_version", int), ("class_names", list),
                           ("descriptions_hash", str), ("files", dict)):
            _field(manifest, name, kind)
        digest = hashlib.sha256(adapter_bytes).hexdigest()
        entry = manifest["files"].get(ADAPTER_FILE)
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if expected != digest:
            raise InvalidAdapter(f"{ADAPTER_FILE} has sha256 {digest[:16]}…, the manifest says "
                                 f"{str(expected)[:16]}…: a damaged or mixed-up bundle")
        live = {"model_id": head.model_id, "label_set_version": head.version, "class_names": list(head.class_names),
                "descriptions_hash": self._descriptions_hash(head.label_set)}
        for name, value in live.items():
            if manifest.get(name) != value:
                raise AdapterMismatch(f"{name} differs: the bundle has {manifest.get(name)!r}, the server "
                                      f"{value!r}; retrain with `medzero train {method.name}` against this "
                                      "server's model, label set and knowledge base")
        try:
            tensors = load_safetensors(adapter_bytes)
        except (SafetensorError, ValueError) as exc:
            raise InvalidAdapter(f"{ADAPTER_FILE} is not a safetensors file: {exc}") from exc
        return method.from_bundle(tensors, manifest, head, digest, embed_dim=self._embed_dim,
                                  vision_width=self._vision_width)


def read_bundle(files: dict[str, bytes], max_member_bytes: int) -> tuple[dict, bytes]:
    """{name: bytes} of the two bundle files, or of one archive holding them -> (manifest, adapter bytes)."""
    if len(files) == 1:
        [(name, data)] = files.items()
        if name.endswith(ARCHIVE_SUFFIXES):
            files = _unpack(name, data, max_member_bytes)
    by_name = {Path(name).name: data for name, data in files.items()}
    missing = [name for name in (ADAPTER_FILE, MANIFEST_FILE) if name not in by_name]
    if missing:
        raise InvalidAdapter(f"a bundle needs {ADAPTER_FILE} and {MANIFEST_FILE} (or one .tar.gz/.zip of them); "
                             f"missing {', '.join(missing)}")
    try:
        manifest = json.loads(by_name[MANIFEST_FILE])
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(f"{MANIFEST_FILE} is not JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise InvalidAdapter(f"{MANIFEST_FILE} must be a JSON object")
    return manifest, by_name[ADAPTER_FILE]


def _unpack(name: str, data: bytes, max_member_bytes: int) -> dict[str, bytes]:
    """The bundle files of an archive: regular files only, by base name (no paths, links or devices), each at most
    `max_member_bytes` unpacked (an archive bomb is refused before it is inflated), each once."""
    wanted = {ADAPTER_FILE, MANIFEST_FILE}
    found: dict[str, bytes] = {}

    def take(member_name: str, size: int, read: Callable[[], bytes]) -> None:
        base = Path(member_name).name
        if base not in wanted:
            return
        if base in found:
            raise InvalidAdapter(f"{name} holds {base} twice")
        if size > max_member_bytes:
            raise InvalidAdapter(f"{base} in {name} unpacks to {size} bytes; MEDZERO_MAX_UPLOAD_BYTES="
                                 f"{max_member_bytes}")
        found[base] = read()

    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for info in archive.infolist():
                    if not info.is_dir():
                        take(info.filename, info.file_size, lambda info=info: archive.read(info))
        else:
            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                for member in archive.getmembers():
                    if member.isfile():
                        take(member.name, member.size, lambda member=member: archive.extractfile(member).read())
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InvalidAdapter(f"{name} is not a readable archive: {exc}") from exc
    return found


def _field(manifest: dict, name: str, kind: type):
    value = manifest.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidAdapter(f"{MANIFEST_FILE} needs {name!r} ({kind.__name__}); got {value!r}")
    return value

