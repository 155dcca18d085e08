"""Air-gapped bundles: export -> verify offline -> import into a fresh data dir -> the imported server answers
/classify and method=kpl with the source server's probabilities; every kind of bad bundle is refused by name
with nothing written; an import killed midway leaves the previous model whole."""
import asyncio
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from app.bundles.archive import MANIFEST_NAME, BadBundle
from app.bundles.model_bundle import (
    IMPORT_STAMP,
    BundleConflict,
    export_bundle,
    import_bundle,
    verify_bundle,
)
from tests.conftest import free_port, running_app, tiny_settings
from tests.encoders.biomedclip_tiny import build_tiny_biomedclip
from tests.factories import png_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]
LABEL_SET = {"name": "bundled-knee", "modality": "knee-xray", "classes": [
    {"name": "normal", "descriptions": ["a uniform joint space", "smooth articular surfaces"]},
    {"name": "osteoarthritis", "descriptions": ["a narrowed joint space", "bony spurs at the margins"]}]}
IMAGES = [png_bytes(width=64 + 8 * i, height=48 + 4 * i) for i in range(3)]


def probabilities(client, label_set: str, method: str = "zeroshot") -> list[dict[str, float]]:
    found = []
    for data in IMAGES:
        answer = client.post("/classify", data={"label_set": label_set, "method": method},
                             files={"file": ("x.png", data)})
        assert answer.status_code == 200, answer.text
        found.append({p["label"]: p["probability"] for p in answer.json()["predictions"]})
    return found


def assert_same(found: list[dict[str, float]], expected: list[dict[str, float]]) -> None:
    assert [sorted(f) for f in found] == [sorted(e) for e in expected]
    for got, want in zip(found, expected):
        assert got == pytest.approx(want, abs=1e-6)


def pool(n: int) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (f"pool{i}.png", png_bytes(width=40 + 7 * i, height=90 - 5 * i, mode="L" if i % 2 else "RGB")))
            for i in range(n)]


def answers(client) -> dict:
    return {"zeroshot": probabilities(client, LABEL_SET["name"]),
            "kpl": probabilities(client, LABEL_SET["name"], "kpl"),           # with the stored KPL fit
            "fewshot": probabilities(client, LABEL_SET["name"], "fewshot"),   # with the stored support set
            "builtin kpl": probabilities(client, "chest-xray-pneumonia", "kpl")}


def source_answers(settings) -> dict:
    with running_app(settings) as client:
        assert client.post("/labels", json=LABEL_SET).status_code == 201
        assert client.post(f"/labels/{LABEL_SET['name']}/kpl", files=pool(8)).status_code == 201
        support = client.post(f"/labels/{LABEL_SET['name']}/support", files=pool(4),
                              data={"classes": ["normal", "osteoarthritis"] * 2})
        assert support.status_code == 200, support.text
        found = answers(client)
        found["fit"] = client.get(f"/labels/{LABEL_SET['name']}/kpl").json()
        found["served"] = client.get("/bundle").json()
        return found


def round_trip(source, bundle: Path) -> dict:
    expected = source_answers(source)
    manifest = asyncio.run(export_bundle(source, bundle, label_sets=[LABEL_SET["name"]], with_index=True,
                                         with_state=True, progress=False))
    assert manifest["contents"]["state"]
    assert manifest["contents"]["label_sets"] == [LABEL_SET["name"]]
    return {"expected": expected, "manifest": manifest}


def serve_imported(target_dir: Path, bundle: Path) -> tuple[dict, dict]:
    imported = asyncio.run(import_bundle(tiny_settings(target_dir), bundle, progress=False))
    assert imported.states == 2                                  # the KPL fit and the support set
    settings = tiny_settings(target_dir, model_name=imported.model_name, knowledge_base_dir=imported.knowledge_base_dir)
    with running_app(settings) as client:
        found = answers(client)
        seen = {"imported": imported, "kb": client.get("/kb").json(), "served": client.get("/bundle").json(),
                "fit": client.get(f"/labels/{LABEL_SET['name']}/kpl").json(),
                "model": client.get("/readyz").json()["model"]}
    again = asyncio.run(import_bundle(tiny_settings(target_dir), bundle, progress=False))
    assert again.already_there and again.states == 0             # importing twice stores nothing twice
    return found, seen


def check_trip(trip: dict, found: dict, seen: dict) -> None:
    expected = trip["expected"]
    for kind in ("zeroshot", "kpl", "fewshot", "builtin kpl"):
        assert_same(found[kind], expected[kind])
    assert seen["model"] == trip["manifest"]["model"]["model_id"]     # the same weights keep the source's id
    assert seen["fit"]["pool_size"] == expected["fit"]["pool_size"] == 8
    assert seen["fit"]["class_balance"] == expected["fit"]["class_balance"]


def test_tiny_model_round_trip_answers_as_the_source(tmp_path: Path) -> None:
    source = tiny_settings(tmp_path / "source")
    bundle = tmp_path / "tiny.tar.zst"
    trip = round_trip(source, bundle)
    report = verify_bundle(bundle)
    assert report["check"]["embed_dim"] == trip["manifest"]["model"]["embed_dim"]
    index_built_at = json.loads(next((tmp_path / "source" / "kb").glob("*/manifest.json")).read_text())["built_at"]

    found, seen = serve_imported(tmp_path / "target", bundle)
    check_trip(trip, found, seen)
    served = trip["expected"]["served"]
    # GET /bundle: both sites serve the weights the bundle holds, and the same label set
    weights = trip["manifest"]["model"]["weights_sha256"]
    assert served["model"]["weights_sha256"] == weights == seen["served"]["model"]["weights_sha256"]
    assert seen["served"]["imported_bundle"]["weights_sha256"] == weights and served["imported_bundle"] is None
    def label_set_hashes(manifest: dict) -> dict:
        return {s["name"]: s["sha256"] for s in manifest["contents"]["label_sets"]}
    assert label_set_hashes(seen["served"])[LABEL_SET["name"]] == label_set_hashes(served)[LABEL_SET["name"]]
    assert {f["sha256"] for f in seen["served"]["files"]} == {f["sha256"] for f in served["files"]}
    assert seen["imported"].model_name.startswith("local-dir:") and seen["imported"].index
    assert seen["kb"]["built_at"] == index_built_at           # the bundled index, not one embedded again


def test_biomedclip_shaped_model_needs_nothing_but_the_bundle(tmp_path: Path) -> None:
    model_dir = build_tiny_biomedclip(tmp_path / "hub")
    source = tiny_settings(tmp_path / "source", model_name=f"local-dir:{model_dir}")
    bundle = tmp_path / "biomedclip.tar"
    trip = round_trip(source, bundle)
    assert trip["manifest"]["model"]["hf_text_tower"]
    kinds = {entry["kind"] for entry in trip["manifest"]["files"]}
    assert {"model", "text_tower", "tokenizer", "index", "label_sets"} <= kinds
    shutil.rmtree(tmp_path / "hub")                # the BERT config and tokenizer it was built from: gone
    verify_bundle(bundle)                          # builds in a child with no network and no HF cache

    check_trip(trip, *serve_imported(tmp_path / "target", bundle))


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("bundle")
    bundle = work / "good.tar"
    asyncio.run(export_bundle(tiny_settings(work / "source"), bundle, label_sets=[], progress=False))
    return bundle


def members(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(bundle) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]


def rewrite(bundle: Path, out: Path, edit) -> Path:
    """A copy of `bundle` whose (member, bytes) list `edit` changed."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in edit(members(bundle)):
            tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return out


def with_manifest(items, change):
    manifest = json.loads(items[0][1])
    change(manifest)
    body = json.dumps(manifest).encode()
    info = tarfile.TarInfo(MANIFEST_NAME)
    info.size = len(body)
    return [(info, body), *items[1:]]


def flip_a_byte(items):
    (member, data), rest = items[1], items[2:]
    return [items[0], (member, bytes([data[0] ^ 1]) + data[1:]), *rest]


def extra_member(name: str, kind: bytes = tarfile.REGTYPE, link: str = ""):
    def edit(items):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        info.size = 4 if kind == tarfile.REGTYPE else 0
        return [*items, (info, b"evil" if kind == tarfile.REGTYPE else b"")]
    return edit


def listed_escape(items):
    body = b"evil"
    items = extra_member("../escaped.txt")(items)
    return with_manifest(items, lambda m: m["files"].append(
        {"path": "../escaped.txt", "size": 4, "sha256": hashlib.sha256(body).hexdigest(),
         "kind": "model"}))


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_BUNDLES = {
    "a truncated tar": (lambda b, out: written(out, b.read_bytes()[:len(b.read_bytes()) // 2]),
                        "not a complete tar archive|not in the bundle"),
    "a hash mismatch": (lambda b, out: rewrite(b, out, flip_a_byte), "sha256 .* does not match"),
    "a path escaping the folder": (lambda b, out: rewrite(b, out, listed_escape), "not a plain relative path"),
    "an absolute path": (lambda b, out: rewrite(b, out, extra_member("/etc/evil")), "not a plain relative path"),
    "a symlink": (lambda b, out: rewrite(b, out, extra_member("model/link", tarfile.SYMTYPE, "/etc/passwd")),
                  "is a symlink"),
    "a hard link": (lambda b, out: rewrite(b, out, extra_member("model/hard", tarfile.LNKTYPE, "bundle.json")),
                    "is a hard link"),
    "an unlisted file": (lambda b, out: rewrite(b, out, extra_member("model/extra.bin")), "not listed"),
    "another format version": (lambda b, out: rewrite(b, out, lambda items: with_manifest(
        items, lambda m: m.update(format_version=99))), "format version 99"),
    "not a bundle at all": (lambda b, out: written(out, b"PK\x03\x04 a zip, not a tar" * 50),
                            "not a complete tar archive"),
    "a truncated zstd stream": (lambda b, out: written(out, _zstd(b)[:5000]),
                                "zstd stream is corrupt or truncated|not a complete tar"),
}


def _zstd(bundle: Path) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor().compress(bundle.read_bytes())


@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_bad_bundles_are_refused_by_name_and_nothing_is_written(tmp_path: Path, good_bundle: Path,
                                                               case: str) -> None:
    make, message = BAD_BUNDLES[case]
    bad = make(good_bundle, tmp_path / "bad.tar")
    with pytest.raises(BadBundle, match=message):
        verify_bundle(bad)
    target = tmp_path / "target"
    with pytest.raises(BadBundle, match=message):
        asyncio.run(import_bundle(tiny_settings(target), bad, progress=False))
    assert not (target / "models").exists()
    assert [p.name for p in target.iterdir() if p.name.startswith(".")] == []      # no staging left behind
    assert not (tmp_path / "escaped.txt").exists() and not (target / "escaped.txt").exists()


def other_bundle(tmp_path: Path) -> Path:
    """A bundle of the same model whose corpus file has other bytes (the same descriptions, indented)."""
    corpus = tmp_path / "corpus"
    shutil.copytree(REPO_ROOT / "knowledge_base", corpus)
    reindented = json.loads((corpus / "chest-xray-pneumonia.json").read_text())
    (corpus / "chest-xray-pneumonia.json").write_text(json.dumps(reindented, indent=1))
    other = tmp_path / "other.tar.zst"
    asyncio.run(export_bundle(tiny_settings(tmp_path / "other-source", knowledge_base_dir=corpus), other,
                              label_sets=[], progress=False))
    return other


def test_a_different_bundle_of_the_same_model_needs_force(tmp_path: Path, good_bundle: Path) -> None:
    target = tiny_settings(tmp_path / "target")
    first = asyncio.run(import_bundle(target, good_bundle, progress=False))
    again = asyncio.run(import_bundle(target, good_bundle, progress=False))
    assert again.already_there and again.folder == first.folder

    other = other_bundle(tmp_path)
    stamp = (first.folder / MANIFEST_NAME).read_bytes()
    with pytest.raises(BundleConflict, match="--force"):
        asyncio.run(import_bundle(target, other, progress=False))
    assert (first.folder / MANIFEST_NAME).read_bytes() == stamp
    replaced = asyncio.run(import_bundle(target, other, force=True, progress=False))
    assert replaced.folder == first.folder and (first.folder / MANIFEST_NAME).read_bytes() != stamp


def files_of(folder: Path) -> dict[Path, bytes]:
    return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_an_import_killed_midway_leaves_a_whole_model(tmp_path: Path, good_bundle: Path) -> None:
    data_dir = tmp_path / "target"
    first = asyncio.run(import_bundle(tiny_settings(data_dir), good_bundle, progress=False))
    other = other_bundle(tmp_path)
    env = {**os.environ, "MEDZERO_DATA_DIR": str(data_dir), "MEDZERO_MODEL_NAME": "medzero-tiny",
           "MEDZERO_LOG_LEVEL": "warning", "MEDZERO_ENGINE": "torch"}
    def staging() -> list[Path]:
        return [p for p in data_dir.iterdir() if p.name.startswith(".medzero-bundle-")]

    for when in ("unpacking", 1.0, 2.5):      # once the bundle is being unpacked, then at fixed times
        child = subprocess.Popen([sys.executable, "-m", "app", "bundle", "import", str(other), "--force",
                                  "--no-progress"], cwd=REPO_ROOT, env=env)
        if when == "unpacking":
            deadline = time.monotonic() + 120
            while not staging() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert staging(), "the import never started unpacking"
        else:
            time.sleep(when)
        child.send_signal(signal.SIGKILL)
        child.wait()
        # whichever bundle the folder holds now, it holds it whole: every file its manifest lists, unchanged
        manifest = json.loads((first.folder / MANIFEST_NAME).read_text())
        for entry in manifest["files"]:
            if entry["path"] != "model/open_clip_config.json":      # rewritten with this folder's paths
                assert hashlib.sha256((first.folder / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
        listed = {Path(e["path"]) for e in manifest["files"]} | {Path(MANIFEST_NAME)}
        assert listed <= set(files_of(first.folder)) <= listed | {Path(IMPORT_STAMP)}
    finished = asyncio.run(import_bundle(tiny_settings(data_dir), other, force=True, progress=False))
    assert finished.folder == first.folder
    # what the killed imports had unpacked is gone: the next import removed the dead processes' staging
    assert [p.name for p in data_dir.iterdir() if p.name.startswith(".medzero-bundle-")] == []


def test_the_cli_exports_verifies_and_imports(tmp_path: Path) -> None:
    env = {**os.environ, "MEDZERO_LOG_LEVEL": "warning", "MEDZERO_ENGINE": "torch", "MEDZERO_MODEL_NAME": "medzero-tiny"}

    def medzero(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app", "bundle", *args], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=300, check=False)

    bundle = tmp_path / "site.tar.zst"
    exported = medzero("export", "--out", str(bundle), "--data-dir", str(tmp_path / "source"), "--no-progress")
    assert exported.returncode == 0, exported.stderr
    assert "model/open_clip_model.safetensors" in exported.stdout and bundle.is_file()
    verified = medzero("verify", str(bundle))
    assert verified.returncode == 0 and "builds offline from the bundle alone" in verified.stdout, verified.stderr
    imported = medzero("import", str(bundle), "--data-dir", str(tmp_path / "target"), "--no-progress")
    assert imported.returncode == 0, imported.stderr
    printed = dict(line.strip().split("=", 1) for line in imported.stdout.splitlines() if line.startswith("  MEDZERO_"))
    assert Path(printed["MEDZERO_MODEL_NAME"].removeprefix("local-dir:"), "open_clip_model.safetensors").is_file()
    # `medzero serve` with exactly what import printed answers /classify under the source's model id
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=REPO_ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, env={**env, **printed, "MEDZERO_PORT": str(port),
                                                                 "MEDZERO_AUTH": "off"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        assert ready.json()["model"] == "medzero-tiny"
        answer = httpx.post(f"http://127.0.0.1:{port}/classify", data={"label_set": "chest-xray-pneumonia"},
                            files={"file": ("x.png", png_bytes())}, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2
    finally:
        server.terminate()
        server.wait(timeout=30)
    unknown = medzero("export", "--out", str(tmp_path / "x.tar"), "--label-sets", "nope", "--data-dir",
                      str(tmp_path / "source"), "--no-progress")
    assert unknown.returncode == 1 and "no label set named 'nope'" in unknown.stderr
    broken = written(tmp_path / "broken.tar", bundle.read_bytes()[:20000])
    refused = medzero("verify", str(broken))
    assert refused.returncode == 1 and "truncated" in refused.stderr and not (tmp_path / "x.tar").exists()


def test_biomedclip_from_a_hub_cache_travels_with_its_bert_config_and_tokenizer(tmp_path: Path) -> None:
    """The default model's shape as a hub cache holds it: the open_clip repo names a second repo (its BERT) for
    the text tower and tokenizer, the files open_clip users copy by hand for an offline BiomedCLIP."""
    from tests.encoders.test_biomedclip_shape import cache_like_the_hub
    model_dir = build_tiny_biomedclip(tmp_path / "built")
    cache = tmp_path / "hub-cache"
    model_name = cache_like_the_hub(cache, model_dir, with_text_tower_repo=True)
    source = tiny_settings(tmp_path / "source", model_name=model_name, cache_dir=cache, hub_offline=True)
    bundle = tmp_path / "biomedclip-hub.tar"
    manifest = asyncio.run(export_bundle(source, bundle, label_sets=[], with_knowledge_base=False, progress=False))
    assert manifest["model"]["model_id"] == model_name and manifest["model"]["hf_text_tower"]
    text_cfg = manifest["model"]["open_clip_config"]["model_cfg"]["text_cfg"]
    assert "acme" not in json.dumps(text_cfg)               # no hub repo left for transformers to fetch
    shutil.rmtree(cache)
    shutil.rmtree(tmp_path / "built")
    assert verify_bundle(bundle)["check"]["embed_dim"] == manifest["model"]["embed_dim"]


def test_a_calibration_still_applies_to_its_fit_after_the_trip(tmp_path: Path) -> None:
    """State is stored anew on the target (its own versions and label-set version); a calibration names the state
    it was made on by version and creation time, so restore_state re-points it at that state as stored there."""
    from types import SimpleNamespace

    import numpy as np

    from app.bundles.model_bundle import restore_state, stage_state
    from app.domain import LabelSetSpec
    from app.methods.calibration import Calibration, calibration_kind
    from app.storage.db import create_db_engine
    from app.storage.label_sets import LabelSetRepository
    from app.storage.method_states import MethodStateRepository, StateKey

    spec, model_id = LabelSetSpec.model_validate(LABEL_SET), "medzero-tiny"
    embeddings = np.eye(2, 8, dtype=np.float32)

    def store(folder: Path) -> tuple[LabelSetRepository, MethodStateRepository]:
        engine = create_db_engine(f"sqlite:///{folder / 'medzero.db'}")
        return LabelSetRepository(engine), MethodStateRepository(engine)

    source_sets, source = store(tmp_path / "source")
    label_set = source_sets.create(spec, model_id=model_id, class_embeddings=embeddings)
    key = StateKey("kpl", spec.name, label_set.version, model_id)
    source.add(key, {"proxies": np.ones((2, 8), np.float32)}, {"label_set_version": 1, "n": 1})
    fit = source.add(key, {"proxies": np.full((2, 8), 2, np.float32)}, {"label_set_version": 1, "n": 2})  # v2
    calibration = Calibration("kpl", spec.name, label_set.version, model_id, temperature=1.7, coverage=0.9,
                              set_threshold=0.2, method_state_version=fit.version,
                              method_state_created_at=fit.created_at.isoformat(), images={"temperature": 10})
    source.add(StateKey(calibration_kind("kpl"), spec.name, label_set.version, model_id), *calibration.to_state())
    staging = tmp_path / "staging"
    entries = stage_state(source, [label_set], model_id, staging)
    assert {Path(e.path).name for e in entries} == {"kpl.npz", "calibration.kpl.npz", "state.json"}

    target_sets, target = store(tmp_path / "target")
    target_sets.create(spec, model_id=model_id, class_embeddings=embeddings)
    changed = spec.model_copy(update={"description": "v2 here"})
    here = target_sets.replace(changed, model_id=model_id, class_embeddings=embeddings)        # version 2 here
    assert restore_state(target, staging, {spec.name: here.version}, model_id) == 2
    assert restore_state(target, staging, {spec.name: here.version}, model_id) == 0            # not twice

    def decode(arrays, meta, version, created_at):
        return SimpleNamespace(arrays=arrays, meta=meta, version=version, created_at=created_at)

    fit_here = target.current(StateKey("kpl", spec.name, here.version, model_id), decode)
    assert fit_here.version == 1 and (fit_here.arrays["proxies"] == 2).all()      # only the current fit travels
    assert fit_here.meta["label_set_version"] == here.version
    calibration_here = target.current(StateKey(calibration_kind("kpl"), spec.name, here.version, model_id),
                                      Calibration.from_state)
    assert calibration_here.temperature == 1.7 and calibration_here.applies_to(fit_here)


def test_a_meduna_adapter_on_a_built_in_label_set_survives_the_trip(tmp_path: Path) -> None:
    from app.jobs import train_meduna
    from tests.api.test_adapters import QUICK, bundle_files
    from tests.factories import labelled_folder

    label_set = "chest-xray-pneumonia"
    images = labelled_folder(tmp_path / "images", {"normal": 6, "pneumonia": 6})
    train_meduna.main(tiny_settings(tmp_path / "train"), label_set, images, tmp_path / "adapter", config=QUICK,
                      progress=False)
    source = tiny_settings(tmp_path / "source")
    with running_app(source) as client:
        assert client.post("/adapters", files=bundle_files(tmp_path / "adapter")).status_code == 201
        expected = probabilities(client, label_set, "meduna")
        adapter_id = client.get("/adapters").json()["data"][0]["id"]
    bundle = tmp_path / "adapter.tar"
    asyncio.run(export_bundle(source, bundle, label_sets=[label_set], with_state=True, with_knowledge_base=False,
                              progress=False))
    imported = asyncio.run(import_bundle(tiny_settings(tmp_path / "target"), bundle, progress=False))
    assert imported.states == 1
    with running_app(tiny_settings(tmp_path / "target", model_name=imported.model_name)) as client:
        assert_same(probabilities(client, label_set, "meduna"), expected)
        assert client.get("/adapters").json()["data"][0]["id"] == adapter_id
