"""Air-gapped model bundles: `medzero bundle export | verify | import`.

A bundle is what one server serves, in one file (app/bundles/archive.py): the open_clip model as a `local-dir:`
folder (open_clip_config.json, the weights as safetensors, the tokenizer files of a Hugging Face tokenizer), the
config of a Hugging Face text tower (BiomedCLIP's BERT) in its own folder, and optionally the description corpus,
the built FAISS index for this model and label sets. The bundled open_clip config names the text tower and
tokenizer by a placeholder, rewritten to absolute paths wherever the bundle is unpacked (open_clip hands those
names to transformers, which would otherwise go to the hub); the manifest keeps the pristine config.

`verify` unpacks into a temporary folder and builds the model there in a child process with the hub and
transformers offline, an empty Hugging Face home and proxies pointing at a closed port, then runs an image and a
text forward: a bundle that verifies loads without the network. `import` verifies, then renames the checked folder
into MEDZERO_DATA_DIR/models/ (an interrupted import leaves what was there), puts the index where the server looks
for it under the new model id, and registers the label sets.
"""
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import open_clip
import torch
from open_clip.factory import parse_model_name
from safetensors.torch import save, save_file

from app import __version__
from app.bundles.archive import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    BadBundle,
    FileEntry,
    entry_for,
    unpacked,
    write_bundle,
)
from app.domain import LabelSet, LabelSetSpec
from app.errors import InvalidInput
from app.knowledge.index import index_dir

log = logging.getLogger(__name__)

MODEL_DIR, TEXT_DIR, KB_DIR, INDEX_DIR = "model", "text", "knowledge_base", "index"
LABEL_SETS_FILE = "label_sets.json"
STATE_DIR, STATE_FILE = "state", "state.json"
CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"
TEXT_PLACEHOLDER = "medzero-bundle:text"       # text_cfg.hf_model_name in the bundled config
TOKENIZER_PLACEHOLDER = "medzero-bundle:model"  # text_cfg.hf_tokenizer_name (a local-dir model reads its own folder)
OFFLINE_CHECK_SECONDS = 600


IMPORT_STAMP = "imported.json"   # beside model/: the source model id, and the weights file it belongs to


def imported_model_id(model_name: str) -> str | None:
    """The model id of the machine a `local-dir:` model was exported from, when `bundle import` put it here and its
    weights file is the one imported (same size and modification time): the same weights keep the same id, so
    the index, class embeddings and method state made under it stay theirs. None otherwise."""
    schema, identifier = parse_model_name(model_name)
    if schema != "local-dir":
        return None
    folder = Path(identifier)
    try:
        stamp = json.loads((folder.parent / IMPORT_STAMP).read_text(encoding="utf-8"))
        weights = (folder / stamp["weights"]["file"]).stat()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (weights.st_size, weights.st_mtime_ns) != (stamp["weights"]["size"], stamp["weights"]["mtime_ns"]):
        log.warning("%s: the weights changed since `medzero bundle import`; serving them as a new model", folder)
        return None
    return stamp["model_id"]


class BundleConflict(InvalidInput):
    status_code, code = 409, "bundle_conflict"


@dataclass(frozen=True)
class Imported:
    folder: Path
    model_name: str                 # MEDZERO_MODEL_NAME to serve it
    knowledge_base_dir: Path | None
    label_sets: list[str]
    index: bool
    already_there: bool
    states: int = 0                 # method states stored (KPL fits, adapters, support sets, calibrations)


def _versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "open_clip_torch", "faiss-cpu", "transformers", "safetensors"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def spec_of(label_set: LabelSet) -> LabelSetSpec:
    """What was registered, without the store's version and timestamps: what a bundle carries and compares."""
    return LabelSetSpec.model_validate(label_set.model_dump(include=set(LabelSetSpec.model_fields)))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "model"


# -- export

def source_model_config(model_name: str, cache_dir: Path | None) -> dict:
    """The open_clip model_cfg the loaded model was built from: a local-dir folder's, the hub repo's (from the
    cache), or a built-in config's."""
    schema, identifier = parse_model_name(model_name)
    if schema == "local-dir":
        return json.loads((Path(identifier) / CONFIG_FILE).read_text(encoding="utf-8"))["model_cfg"]
    if schema == "hf-hub":
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(identifier, CONFIG_FILE, cache_dir=cache_dir)
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
        return loaded.get("model_cfg", loaded)
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise InvalidInput(f"open_clip has no config named {model_name!r} to bundle")
    return config


def exported_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights as a bundle holds them: fp32 on the CPU, each tensor its own (safetensors refuses shared
    storage)."""
    return {name: tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype)
            .contiguous().clone() for name, tensor in model.state_dict().items()}


def stage_model(encoder, model_name: str, cache_dir: Path | None, staging: Path) -> tuple[list[FileEntry], dict]:
    """Write the loaded model under staging/model (and staging/text for a Hugging Face text tower); its files and
    the pristine open_clip config (placeholders for the paths)."""
    from app.encoders.loader import hub_session
    model_dir = staging / MODEL_DIR
    model_dir.mkdir(parents=True)
    entries: list[FileEntry] = []
    with hub_session(True, cache_dir):          # everything comes from what this machine already holds
        model_cfg = json.loads(json.dumps(source_model_config(model_name, cache_dir)))
        text_cfg = model_cfg.setdefault("text_cfg", {})
        if text_cfg.get("hf_model_name"):
            from transformers import AutoConfig
            AutoConfig.from_pretrained(text_cfg["hf_model_name"]).save_pretrained(staging / TEXT_DIR)
            text_cfg["hf_model_name"] = TEXT_PLACEHOLDER
            text_cfg["hf_model_pretrained"] = False   # its weights are in the bundle's checkpoint
            entries += [entry_for(staging, path, "text_tower") for path in sorted((staging / TEXT_DIR).iterdir())]
        if "hf_tokenizer_name" in text_cfg:
            hf_tokenizer = getattr(encoder.tokenizer, "tokenizer", None)
            if hf_tokenizer is None:
                raise InvalidInput(f"{model_name}: its config names a Hugging Face tokenizer, but the loaded "
                                   "tokenizer has none to save")
            before = set(model_dir.iterdir())
            hf_tokenizer.save_pretrained(model_dir)
            text_cfg["hf_tokenizer_name"] = TOKENIZER_PLACEHOLDER
            entries += [entry_for(staging, path, "tokenizer") for path in sorted(set(model_dir.iterdir()) - before)]
    save_file(exported_state(encoder.model), str(model_dir / WEIGHTS_FILE))
    config = {"model_cfg": model_cfg, "preprocess_cfg": open_clip.get_model_preprocess_cfg(encoder.model)}
    (model_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    entries += [entry_for(staging, model_dir / WEIGHTS_FILE, "model"), entry_for(staging, model_dir / CONFIG_FILE,
                                                                                  "model")]
    return entries, config


async def export_bundle(settings, out: Path, *, label_sets: list[str] | None = None, with_index: bool = False,
                        with_knowledge_base: bool = True, with_state: bool = False, progress: bool = True) -> dict:
    """Write the bundle of what `settings` serve to `out`; returns its manifest."""
    from app.encoders.loader import choose_model
    from app.runtime import Runtime
    settings = settings.model_copy(update={"engine": "torch", "device": "cpu", "precision": "fp32"})
    model_name = choose_model(settings)[0]
    async with Runtime.for_job(settings, progress=progress, index="sync" if with_index else "skip") as runtime:
        encoder = runtime.encoder
        known = {label_set.name: label_set for label_set in runtime.label_sets.list()}
        wanted = label_sets if label_sets is not None else [n for n, s in known.items() if not s.builtin]
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise InvalidInput(f"no label set named {', '.join(map(repr, unknown))} here (medzero labels list)")
        with tempfile.TemporaryDirectory(prefix=".medzero-export-", dir=out.parent if out.parent.exists() else None
                                         ) as work:
            staging = Path(work)
            files, config = stage_model(encoder, model_name, settings.cache_dir, staging)
            if with_knowledge_base:
                (staging / KB_DIR).mkdir()
                for corpus_file in sorted(settings.knowledge_base_dir.glob("*.json")):
                    shutil.copy2(corpus_file, staging / KB_DIR / corpus_file.name)
                    files.append(entry_for(staging, staging / KB_DIR / corpus_file.name, "knowledge_base"))
            if with_index:
                (staging / INDEX_DIR).mkdir()
                for path in sorted(runtime.knowledge.directory.iterdir()):
                    shutil.copy2(path, staging / INDEX_DIR / path.name)
                    files.append(entry_for(staging, staging / INDEX_DIR / path.name, "index"))
            if wanted:
                specs = [{"version": known[name].version, "spec": spec_of(known[name]).model_dump(mode="json")}
                         for name in wanted]
                (staging / LABEL_SETS_FILE).write_text(json.dumps(specs, indent=2), encoding="utf-8")
                files.append(entry_for(staging, staging / LABEL_SETS_FILE, "label_sets"))
            if with_state:
                files += stage_state(runtime.states, [known[name] for name in wanted], encoder.model_id, staging)
            weights = next(f for f in files if f.path == f"{MODEL_DIR}/{WEIGHTS_FILE}")
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "medzero_version": __version__, "versions": _versions(),
                "model": {"model_id": encoder.model_id, "source": model_name, "weights_sha256": weights.sha256,
                          "pretrained_weights": encoder.has_pretrained_weights, "embed_dim": encoder.embed_dim,
                          "hf_text_tower": (staging / TEXT_DIR).is_dir(), "open_clip_config": config},
                "contents": {"knowledge_base": with_knowledge_base, "index": with_index, "label_sets": wanted,
                             "state": (staging / STATE_FILE).is_file()},
                "files": [asdict(entry) for entry in files],
            }
            write_bundle(staging, manifest, out)
    return manifest


def stage_state(states, label_sets: list, model_id: str, staging: Path) -> list[FileEntry]:
    """Each label set's current learned state under this model, every kind (KPL fit, adapters, support set,
    calibrations): state/<label set>/<kind>.npz (the stored arrays) and state.json (kind, meta, version, time)."""
    records, entries = [], []
    for label_set in label_sets:
        for stored in states.newest_of_each_kind(label_set.name, label_set.version, model_id):
            path = staging / STATE_DIR / label_set.name / f"{_slug(stored.kind)}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(stored.blob)
            entries.append(entry_for(staging, path, "state"))
            records.append({"label_set": label_set.name, "kind": stored.kind, "arrays": entries[-1].path,
                            "meta": stored.meta, "version": stored.version,
                            "created_at": stored.created_at.isoformat()})
    if not records:
        return []
    (staging / STATE_FILE).write_text(json.dumps(records, indent=2), encoding="utf-8")
    return [*entries, entry_for(staging, staging / STATE_FILE, "state")]


def restore_state(states, folder: Path, label_set_versions: dict[str, int], model_id: str) -> int:
    """Store the bundle's states under this data dir's versions of their label sets; how many were new. A
    calibration is re-pointed at its method's state as stored here (it names that state's version and time)."""
    from app.storage.method_states import StateKey
    records = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    stamps: dict[tuple[str, str, int, str], tuple[int, str]] = {}    # source (set, kind, version, time) -> here
    added = 0
    for record in sorted(records, key=lambda r: r["kind"].startswith("calibration.")):   # methods first
        version = label_set_versions[record["label_set"]]
        meta = json.loads(json.dumps(record["meta"]))
        for holder in (meta, meta.get("manifest")):
            if isinstance(holder, dict) and "label_set_version" in holder:
                holder["label_set_version"] = version
        if record["kind"].startswith("calibration."):
            source = (record["label_set"], record["kind"].removeprefix("calibration."),
                      meta.get("method_state_version"), meta.get("method_state_created_at"))
            if source in stamps:
                meta["method_state_version"], meta["method_state_created_at"] = stamps[source]
        key = StateKey(record["kind"], record["label_set"], version, model_id)
        blob = (folder / record["arrays"]).read_bytes()
        created_at = datetime.fromisoformat(record["created_at"])
        current = next((stored for stored in states.newest_of_each_kind(record["label_set"], version, model_id)
                        if stored.kind == record["kind"]), None)
        if current is not None and (current.blob, current.meta, current.created_at) == (blob, meta, created_at):
            stamp_here = (current.version, current.created_at.isoformat())     # imported before: not again
        else:
            stored = states.add_packed(key, blob, meta, created_at)
            stamp_here = (stored.version, stored.created_at.isoformat())
            added += 1
        stamps[(record["label_set"], record["kind"], record["version"], record["created_at"])] = stamp_here
    return added


# -- verify

def localise(folder: Path, manifest: dict) -> Path:
    """Write the model's open_clip config with the placeholders replaced by this folder's paths; the model dir."""
    config = json.loads(json.dumps(manifest["model"]["open_clip_config"]))
    text_cfg = config["model_cfg"].get("text_cfg", {})
    if text_cfg.get("hf_model_name") == TEXT_PLACEHOLDER:
        text_cfg["hf_model_name"] = str((folder / TEXT_DIR).resolve())
    if text_cfg.get("hf_tokenizer_name") == TOKENIZER_PLACEHOLDER:
        text_cfg["hf_tokenizer_name"] = str((folder / MODEL_DIR).resolve())
    (folder / MODEL_DIR / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder / MODEL_DIR


_OFFLINE_CHECK = """
import json, sys, time
import open_clip, torch
from PIL import Image
started = time.perf_counter()
name = "local-dir:" + sys.argv[1]
model, _, preprocess = open_clip.create_model_and_transforms(name, require_pretrained=True)
tokenizer = open_clip.get_tokenizer(name)
with torch.inference_mode():
    image = model.encode_image(preprocess(Image.new("RGB", (64, 48), (90, 120, 150))).unsqueeze(0))
    text = model.encode_text(tokenizer(["a chest x-ray"]))
assert torch.isfinite(image).all() and torch.isfinite(text).all(), "the warm-up forward gave non-finite values"
print(json.dumps({"embed_dim": int(image.shape[-1]), "seconds": round(time.perf_counter() - started, 2)}))
"""


def check_offline(model_dir: Path) -> dict:
    """Build the model from `model_dir` alone in a child process with no network and no Hugging Face cache, and
    run an image and a text forward; its {embed_dim, seconds}, or BadBundle with the child's last error line."""
    with tempfile.TemporaryDirectory(prefix="medzero-offline-home-") as empty_home:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HOME": empty_home, "HF_HUB_CACHE": str(Path(empty_home) / "hub"), "XDG_CACHE_HOME": empty_home,
               "TORCH_HOME": empty_home, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": ""}
        env.pop("HF_TOKEN", None)
        try:
            child = subprocess.run([sys.executable, "-c", _OFFLINE_CHECK, str(model_dir)], env=env, cwd=empty_home,
                                   capture_output=True, text=True, timeout=OFFLINE_CHECK_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            raise BadBundle(f"the bundled model did not build within {OFFLINE_CHECK_SECONDS} s offline") from None
    if child.returncode != 0:
        last = next((line for line in reversed(child.stderr.strip().splitlines()) if line.strip()), "no output")
        raise BadBundle(f"the bundled model does not build offline from the bundle alone: {last[:400]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def verify_bundle(bundle: Path) -> dict:
    """Hashes, manifest, and an offline build + warm-up forward in a temporary folder: {manifest, check}."""
    with unpacked(bundle) as (manifest, folder):
        check = check_offline(localise(folder, manifest))
        if check["embed_dim"] != manifest["model"].get("embed_dim"):
            raise BadBundle(f"the bundled model embeds into {check['embed_dim']} dimensions, the manifest says "
                            f"{manifest['model'].get('embed_dim')}")
        return {"manifest": manifest, "check": check}


def table_of_contents(manifest: dict) -> str:
    """The bundle's files by kind, for `verify` and `import` to print."""
    lines = [(f"medzero bundle v{manifest['format_version']} · model {manifest['model']['model_id']} · written by "
              f"medzero {manifest.get('medzero_version')} on {manifest.get('created_at')}"),
             "  " + ", ".join(f"{package} {version}" for package, version in manifest.get("versions", {}).items())]
    for entry in manifest["files"]:
        lines.append(f"  {entry['kind']:<14} {entry['size']:>12,}  {entry['sha256'][:12]}  {entry['path']}")
    contents = manifest["contents"]
    index = "yes" if contents.get("index") else "no"
    corpus = "yes" if contents.get("knowledge_base") else "no"
    lines.append(f"  label sets: {', '.join(contents.get('label_sets') or []) or 'none'}; index: {index}; "
                 f"knowledge base: {corpus}")
    return "\n".join(lines)


# -- import

def model_folder(data_dir: Path, manifest: dict) -> Path:
    """One folder per source model id: a second bundle of the same model (other weights, corpus...) replaces the
    first only with --force."""
    model_id = manifest["model"]["model_id"]
    return data_dir / "models" / f"{_slug(model_id)}-{hashlib.sha256(model_id.encode()).hexdigest()[:10]}"


def _same_files(folder: Path, manifest: dict) -> bool:
    try:
        existing = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return sorted((f["path"], f["sha256"]) for f in existing.get("files", [])) == sorted(
        (f["path"], f["sha256"]) for f in manifest["files"])


def _bundled_label_sets(folder: Path, manifest: dict) -> list[LabelSetSpec]:
    if not manifest["contents"].get("label_sets"):
        return []
    try:
        return [LabelSetSpec.model_validate(item["spec"])
                for item in json.loads((folder / LABEL_SETS_FILE).read_text(encoding="utf-8"))]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadBundle(f"{LABEL_SETS_FILE} is not a list of label sets: {str(exc).splitlines()[0][:300]}") from None


async def import_bundle(settings, bundle: Path, *, force: bool = False, progress: bool = True) -> Imported:
    """Verify `bundle`, move its model (and corpus) into settings.data_dir/models/, its index under the new model
    id, and register its label sets. BundleConflict, before anything is written, for a model folder or label set
    already there with other contents (unless `force`)."""
    from app.encoders.loader import model_id_for
    from app.runtime import Runtime
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    with unpacked(bundle, parent=data_dir) as (manifest, staging):
        specs = _bundled_label_sets(staging, manifest)
        target = model_folder(data_dir, manifest)
        already_there = target.is_dir() and _same_files(target, manifest)
        if target.exists() and not already_there and not force:
            raise BundleConflict(f"{target} already holds another bundle of {manifest['model']['model_id']} "
                                 "(different files): pass --force to replace it")
        stored = {label_set.name: label_set for label_set in Runtime(settings).repository.list()}
        clashes = [spec.name for spec in specs if spec.name in stored and spec_of(stored[spec.name]) != spec]
        if clashes and not force:
            raise BundleConflict(f"label set(s) {', '.join(clashes)} already exist here with other classes or "
                                 "prompts: pass --force to replace them (each gets a new version)")
        check_offline(localise(staging, manifest))
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if not already_there:
            target.parent.mkdir(parents=True, exist_ok=True)
            retired = target.with_name(f".{target.name}.replaced-{time.time_ns()}") if target.exists() else None
            if retired is not None:
                os.rename(target, retired)
            os.rename(staging, target)          # one rename: the folder is there whole, or not at all
            if retired is not None:
                shutil.rmtree(retired, ignore_errors=True)
    model_dir = localise(target, manifest)
    model_name = f"local-dir:{model_dir}"
    weights = (model_dir / WEIGHTS_FILE).stat()
    (target / IMPORT_STAMP).write_text(json.dumps({"model_id": manifest["model"]["model_id"], "weights": {
        "file": WEIGHTS_FILE, "size": weights.st_size, "mtime_ns": weights.st_mtime_ns}}), encoding="utf-8")
    knowledge_base_dir = target / KB_DIR if manifest["contents"].get("knowledge_base") else None
    if manifest["contents"].get("index"):
        _place_index(target / INDEX_DIR, index_dir(data_dir, model_id_for(model_name, None)),
                     model_id_for(model_name, None))
    serving = settings.model_copy(update={"model_name": model_name, "pretrained": None, "engine": "torch",
                                          **({"knowledge_base_dir": knowledge_base_dir} if knowledge_base_dir else {})})
    # the label sets first, the index after: the bundled index holds their descriptions, and a sync before they
    # exist here would drop those rows only to embed them again
    async with Runtime.for_job(serving, progress=progress, index="skip") as runtime:
        here = {label_set.name: label_set for label_set in runtime.label_sets.list()}   # built-ins now too
        for spec in specs:
            if spec.name not in here:
                runtime.label_sets.create(spec)
            elif (spec.name in clashes or spec.name not in stored) and spec_of(here[spec.name]) != spec:
                runtime.label_sets.replace(spec.name, spec)     # a clash (--force), or a built-in as bundled
        runtime.knowledge.sync(runtime.label_sets.list(), progress=progress)
        states = 0
        if manifest["contents"].get("state"):
            versions = {spec.name: runtime.label_sets.get(spec.name).version for spec in specs}
            states = restore_state(runtime.states, target, versions, runtime.encoder.model_id)
    return Imported(target, model_name, knowledge_base_dir, [spec.name for spec in specs],
                    bool(manifest["contents"].get("index")), already_there, states)


def _place_index(source: Path, destination: Path, model_id: str) -> None:
    """The bundled index under this data dir's folder for the imported model id (the same weights: the same
    vectors), written to a temporary folder and renamed into place."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        for path in source.iterdir():
            shutil.copy2(path, staging / path.name)
        index_manifest = json.loads((staging / "manifest.json").read_text(encoding="utf-8"))
        index_manifest["model_id"] = model_id
        (staging / "manifest.json").write_text(json.dumps(index_manifest, indent=2), encoding="utf-8")
        if destination.exists():
            shutil.rmtree(destination)
        os.rename(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- GET /bundle

_served_weights: dict[int, str] = {}      # id(model) -> the sha256 its bundle's weights file would have


def served_manifest(runtime) -> dict:
    """What a running server serves, in the bundle manifest's form: two sites compare these (and a bundle's
    manifest) to see whether they run the same weights, corpus, index and label sets."""
    settings, encoder = runtime.settings, runtime.encoder
    schema, identifier = parse_model_name(settings.model_name)
    imported = Path(identifier).parent / MANIFEST_NAME if schema == "local-dir" else None
    bundle = json.loads(imported.read_text(encoding="utf-8")) if imported is not None and imported.is_file() else None
    if id(encoder.model) not in _served_weights:
        # the bytes `bundle export` would write for these weights: comparable with any bundle's manifest
        _served_weights[id(encoder.model)] = hashlib.sha256(save(exported_state(encoder.model))).hexdigest()
    corpus_dir = settings.knowledge_base_dir
    files = [asdict(entry_for(corpus_dir, path, "knowledge_base")) for path in sorted(corpus_dir.glob("*.json"))]
    index = runtime.knowledge.manifest
    label_sets = [{"name": label_set.name, "version": label_set.version, "builtin": label_set.builtin,
                   "sha256": hashlib.sha256(json.dumps(spec_of(label_set).model_dump(mode="json"),
                                                       sort_keys=True).encode()).hexdigest()}
                  for label_set in runtime.label_sets.list()]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "medzero_version": __version__, "versions": _versions(),
        "model": {"model_id": encoder.model_id, "source": settings.model_name,
                  "weights_sha256": _served_weights[id(encoder.model)],
                  "pretrained_weights": encoder.has_pretrained_weights, "embed_dim": encoder.embed_dim},
        "contents": {"knowledge_base": True, "label_sets": label_sets,
                     "index": {key: index.get(key) for key in ("model_id", "corpus_hash", "count", "built_at")}},
        "imported_bundle": None if bundle is None else {"created_at": bundle.get("created_at"),
                                                        "model_id": bundle["model"]["model_id"],
                                                        "weights_sha256": bundle["model"]["weights_sha256"]},
        "files": files,
    }
