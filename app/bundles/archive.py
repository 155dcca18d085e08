"""The bundle file: one tar (`.tar`, or zstd-compressed `.tar.zst`) whose first member is `bundle.json`, the
manifest, listing every other member with its size and sha256. Reading one never trusts it: a member that is
not a regular file (symlink, hard link, device), a path that is absolute or climbs out (`..`), a duplicate, a
file the manifest does not list (or a listed one missing), a size or hash that disagrees, a truncated archive or
a manifest of another format version is refused with BadBundle naming it, before anything lands where it is
unpacked: members are written into a temporary folder first and only a complete, checked folder is handed on.
"""
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from app.errors import InvalidInput

FORMAT = "medzero-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "bundle.json"
STAGING_PREFIX = ".medzero-bundle-"   # + the unpacking process's pid: a later import removes a dead one's
_CHUNK = 1 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class BadBundle(InvalidInput):
    code = "bad_bundle"


@dataclass(frozen=True)
class FileEntry:
    path: str           # POSIX, relative to the bundle's root
    size: int
    sha256: str
    kind: str           # model | text_tower | tokenizer | knowledge_base | index | label_sets | state


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def entry_for(root: Path, path: Path, kind: str) -> FileEntry:
    return FileEntry(path.relative_to(root).as_posix(), path.stat().st_size, sha256_of(path), kind)


def safe_member_path(name: str) -> PurePosixPath:
    """A member name as a relative path that stays inside the folder it is unpacked into, or BadBundle."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or name.startswith("\\") or ".." in path.parts or "\\" in name \
            or any(part in ("", ".") for part in name.split("/")) or ":" in path.parts[0]:
        raise BadBundle(f"bundle member {name!r} is not a plain relative path inside the bundle (absolute, '..', "
                        "or a drive): refused, nothing written")
    return path


def write_bundle(source: Path, manifest: dict, out: Path) -> Path:
    """Write `source`'s files (every one listed in manifest['files']) and the manifest into `out`, atomically
    (a temporary file renamed into place); zstd-compressed when `out` ends in .zst."""
    out.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    try:
        with os.fdopen(descriptor, "wb") as raw, _compressed_writer(raw, out.name.endswith(".zst")) as stream, \
                tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            body = json.dumps(manifest, indent=2, sort_keys=True).encode()
            info = tarfile.TarInfo(MANIFEST_NAME)
            info.size, info.mode = len(body), 0o644
            tar.addfile(info, io.BytesIO(body))
            for entry in manifest["files"]:
                path = source / entry["path"]
                info = tarfile.TarInfo(entry["path"])
                info.size, info.mode = path.stat().st_size, 0o644
                with open(path, "rb") as handle:
                    tar.addfile(info, handle)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return out


@contextmanager
def _compressed_writer(raw: io.BufferedWriter, compress: bool) -> Iterator[io.RawIOBase]:
    if not compress:
        yield raw
        return
    import zstandard
    with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(raw, closefd=False) as writer:
        yield writer


@contextmanager
def _reader(path: Path) -> Iterator[io.RawIOBase]:
    with open(path, "rb") as raw:
        compressed = raw.read(4) == _ZSTD_MAGIC
        raw.seek(0)
        if not compressed:
            yield raw
            return
        import zstandard
        with zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            yield reader


def check_manifest(manifest: object) -> dict:
    """The manifest's shape and format version, or BadBundle naming what is wrong."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadBundle(f"{MANIFEST_NAME} is not a medzero bundle manifest (format must be {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BadBundle(f"bundle format version {manifest.get('format_version')!r}: this medzero reads version "
                        f"{FORMAT_VERSION} (the manifest says medzero {manifest.get('medzero_version')!r} wrote it)")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
            and isinstance(f.get("sha256"), str) and len(f["sha256"]) == 64 for f in files):
        raise BadBundle(f"{MANIFEST_NAME}: `files` must list objects with path, size and a sha256 of 64 hex digits")
    if not isinstance(manifest.get("model"), dict) or not isinstance(manifest["model"].get("model_id"), str):
        raise BadBundle(f"{MANIFEST_NAME}: `model` with its model_id is missing")
    for entry in files:
        safe_member_path(entry["path"])
    return manifest


def remove_abandoned_staging(parent: Path) -> list[Path]:
    """Delete staging folders that an unpack killed midway left in `parent` (its process is gone): a bundle can be
    gigabytes. A folder whose process still runs (an import under way) is left alone."""
    removed = []
    for folder in parent.glob(f"{STAGING_PREFIX}*"):
        pid = folder.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process: alive
        return True
    return True


@contextmanager
def unpacked(bundle: Path, parent: Path | None = None) -> Iterator[tuple[dict, Path]]:
    """(manifest, folder) of a checked bundle unpacked into a temporary folder (under `parent` when given, so a
    caller can rename it into place on the same file system); the folder is removed when the block ends unless
    the caller moved it. BadBundle before the block runs for anything the module docstring lists."""
    if not bundle.is_file():
        raise BadBundle(f"{bundle}: no such bundle file")
    if parent is not None:
        remove_abandoned_staging(parent)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
    try:
        manifest = _extract_checked(bundle, staging)
        yield manifest, staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_checked(bundle: Path, staging: Path) -> dict:
    manifest: dict | None = None
    expected: dict[str, dict] = {}
    seen: set[str] = set()
    try:
        with _reader(bundle) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    kind = "a symlink" if member.issym() else "a hard link" if member.islnk() else \
                        "a folder" if member.isdir() else "a special file"
                    raise BadBundle(f"bundle member {member.name!r} is {kind}: a bundle holds regular files only")
                path = safe_member_path(member.name)
                if member.name in seen:
                    raise BadBundle(f"bundle member {member.name!r} appears twice")
                seen.add(member.name)
                if manifest is None:
                    if member.name != MANIFEST_NAME:
                        raise BadBundle(f"the bundle's first member is {member.name!r}, not {MANIFEST_NAME}")
                    try:
                        manifest = check_manifest(json.loads(tar.extractfile(member).read()))
                    except ValueError as exc:
                        raise BadBundle(f"{MANIFEST_NAME} is not valid JSON: {exc}") from None
                    expected = {entry["path"]: entry for entry in manifest["files"]}
                    continue
                entry = expected.get(member.name)
                if entry is None:
                    raise BadBundle(f"bundle member {member.name!r} is not listed in {MANIFEST_NAME}")
                _copy_checked(tar.extractfile(member), staging / path, entry)
    except (tarfile.TarError, EOFError) as exc:
        raise BadBundle(f"{bundle.name} is not a complete tar archive ({exc}): truncated or not a bundle") from None
    except Exception as exc:   # zstandard's own ZstdError, for a cut or corrupt frame
        if type(exc).__name__ == "ZstdError":
            raise BadBundle(f"{bundle.name}: the zstd stream is corrupt or truncated ({exc})") from None
        raise
    if manifest is None:
        raise BadBundle(f"{bundle.name} is empty: no {MANIFEST_NAME}")
    missing = sorted(set(expected) - seen)
    if missing:
        raise BadBundle(f"{len(missing)} file(s) listed in {MANIFEST_NAME} are not in the bundle, e.g. {missing[0]!r}: "
                        "truncated?")
    return manifest


def _copy_checked(source: io.BufferedReader, target: Path, entry: dict) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(target, "xb") as handle:
        while chunk := source.read(_CHUNK):
            size += len(chunk)
            if size > entry["size"]:
                break
            digest.update(chunk)
            handle.write(chunk)
    if size != entry["size"]:
        found = "more" if size > entry["size"] else f"{size}"
        raise BadBundle(f"bundle member {entry['path']!r} holds {found} bytes, not the {entry['size']} listed")
    if digest.hexdigest() != entry["sha256"]:
        raise BadBundle(f"bundle member {entry['path']!r}: sha256 {digest.hexdigest()[:16]}… does not match the "
                        f"manifest's {entry['sha256'][:16]}…: the file was changed or damaged")
