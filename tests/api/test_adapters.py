"""/adapters and method=meduna: a bundle from `medzero train meduna` round-trips through the server and changes
predictions; bundles made for something else are refused with nothing loaded; MEDZERO_ADAPTERS_DIR at start-up."""
import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.jobs import train_meduna
from app.jobs.train_meduna import MedUnAConfig
from app.methods.meduna import ImageStageConfig, TextStageConfig
from tests.conftest import running_app, tiny_settings
from tests.factories import labelled_folder, png_bytes

LABEL_SET = "chest-xray-pneumonia"
QUICK = MedUnAConfig(text=TextStageConfig(steps=60), image=ImageStageConfig(n_prompt_tokens=4, epochs=1,
                                                                            batch_size=6))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("meduna")
    images = labelled_folder(root / "images", {"normal": 6, "pneumonia": 6})
    train_meduna.main(tiny_settings(root / "data"), LABEL_SET, images, root / "bundle", config=QUICK,
                      progress=False)
    return root / "bundle"


def bundle_files(folder: Path, **manifest_changes) -> list[tuple[str, tuple[str, bytes]]]:
    manifest = json.loads((folder / "manifest.json").read_text()) | manifest_changes
    return [("files", ("adapter.safetensors", (folder / "adapter.safetensors").read_bytes())),
            ("files", ("manifest.json", json.dumps(manifest).encode()))]


def classify(client: TestClient, method: str) -> dict:
    response = client.post("/classify", data={"label_set": LABEL_SET, "method": method},
                           files={"file": ("x.png", png_bytes(width=70, height=60))})
    assert response.status_code == 200, response.text
    return response.json()


def test_no_adapter_is_409_naming_the_job(client: TestClient) -> None:
    refused = client.post("/classify", data={"label_set": LABEL_SET, "method": "meduna"},
                          files={"file": ("x.png", png_bytes())})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "adapter_not_found"
    assert "medzero train meduna --label-set chest-xray-pneumonia" in refused.json()["error"]["message"]


def test_bundle_round_trip_changes_predictions(client: TestClient, bundle: Path) -> None:
    uploaded = client.post("/adapters", files=bundle_files(bundle))
    assert uploaded.status_code == 201, uploaded.text
    adapter = uploaded.json()
    assert adapter["label_set"] == LABEL_SET and adapter["prompt_tokens"] == 4 and adapter["version"] == 1
    assert adapter["config"]["text"]["steps"] == 60 and "stage1" in adapter["metrics"]
    meduna, zeroshot = classify(client, "meduna"), classify(client, "zeroshot")
    assert meduna["method_details"]["adapter_id"] == adapter["id"]
    assert [p["probability"] for p in meduna["predictions"]] != [p["probability"] for p in zeroshot["predictions"]]
    assert client.get("/adapters").json()["count"] == 1
    assert client.get(f"/adapters/{adapter['id'][:12]}").json()["id"] == adapter["id"]
    batch = client.post("/classify/batch", data={"label_set": LABEL_SET, "method": "meduna"},
                        files=[("files", (f"{i}.png", png_bytes(width=50 + i))) for i in range(3)]).json()
    assert batch["succeeded"] == 3
    assert client.delete(f"/adapters/{adapter['id']}").status_code == 204
    assert client.get(f"/adapters/{adapter['id']}").status_code == 404
    assert client.post("/classify", data={"label_set": LABEL_SET, "method": "meduna"},
                       files={"file": ("x.png", png_bytes())}).status_code == 409


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_one_archive_is_a_bundle_too(client: TestClient, bundle: Path, kind: str) -> None:
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as archive:
            for name in ("adapter.safetensors", "manifest.json"):
                archive.write(bundle / name, f"cxr/{name}")
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for name in ("adapter.safetensors", "manifest.json"):
                archive.add(bundle / name, f"cxr/{name}")
    uploaded = client.post("/adapters", files=[("files", (f"cxr.{kind}", buffer.getvalue()))])
    assert uploaded.status_code == 201, uploaded.text
    assert classify(client, "meduna")["method_details"]["adapter_id"] == uploaded.json()["id"]


@pytest.mark.parametrize("change, status, field", [
    ({"model_id": "ViT-B-16"}, 409, "model_id"),
    ({"label_set_version": 2}, 409, "label_set_version"),
    ({"class_names": ["pneumonia", "normal"]}, 409, "class_names"),
    ({"descriptions_hash": "0000"}, 409, "descriptions_hash"),
    ({"files": {"adapter.safetensors": "x"}}, 422, "sha256"),
    ({"label_set_version": True}, 422, "label_set_version"),
    ({"files": {"adapter.safetensors": {"sha256": "0" * 64}}}, 422, "sha256"),
    ({"format": "something/9"}, 422, "format"),
])
def test_mismatched_bundles_are_refused_with_nothing_loaded(client: TestClient, bundle: Path, change: dict,
                                                            status: int, field: str) -> None:
    refused = client.post("/adapters", files=bundle_files(bundle, **change))
    assert refused.status_code == status and field in refused.json()["error"]["message"]
    assert client.get("/adapters").json()["count"] == 0


def test_a_bundle_missing_a_file_is_not_a_bundle(client: TestClient, bundle: Path) -> None:
    refused = client.post("/adapters", files=bundle_files(bundle)[:1])
    assert refused.status_code == 422 and "manifest.json" in refused.json()["error"]["message"]


def test_a_new_bundle_replaces_the_old_and_the_same_one_is_idempotent(client: TestClient, bundle: Path,
                                                                      tmp_path: Path) -> None:
    first = client.post("/adapters", files=bundle_files(bundle)).json()
    assert client.post("/adapters", files=bundle_files(bundle)).json()["version"] == first["version"]
    other = tmp_path / "other"
    train_meduna.main(tiny_settings(tmp_path / "data"), LABEL_SET,
                      labelled_folder(tmp_path / "images", {"normal": 4, "pneumonia": 4}, seed=5), other,
                      config=QUICK, progress=False)
    second = client.post("/adapters", files=bundle_files(other)).json()
    assert second["version"] == 2 and second["id"] != first["id"]
    assert client.get("/adapters").json()["count"] == 1
    assert classify(client, "meduna")["method_details"]["adapter_id"] == second["id"]


def test_adapters_dir_is_loaded_at_start_up_and_a_bad_bundle_does_not_stop_it(tmp_path: Path,
                                                                                bundle: Path) -> None:
    adapters = tmp_path / "data" / "adapters"
    shutil.copytree(bundle, adapters / "cxr", ignore=shutil.ignore_patterns("checkpoints"))
    (adapters / "broken").mkdir()
    (adapters / "broken" / "manifest.json").write_text("{not json")
    with running_app(tiny_settings(tmp_path / "data")) as client:
        assert client.app.state.runtime.state == "ready"
        assert [a["label_set"] for a in client.get("/adapters").json()["data"]] == [LABEL_SET]
        assert classify(client, "meduna")["method"] == "meduna"


def test_adapter_writes_need_the_admin_key(tmp_path: Path, bundle: Path) -> None:
    with running_app(tiny_settings(tmp_path, admin_api_key="k")) as client:
        assert client.post("/adapters", files=bundle_files(bundle)).status_code == 401
        uploaded = client.post("/adapters", files=bundle_files(bundle), headers={"X-API-Key": "k"})
        assert uploaded.status_code == 201
        assert client.get("/adapters").status_code == 200
        assert client.delete(f"/adapters/{uploaded.json()['id']}").status_code == 401


def test_a_restart_never_overrides_an_uploaded_adapter(tmp_path: Path, bundle: Path) -> None:
    adapters = tmp_path / "data" / "adapters"
    shutil.copytree(bundle, adapters / "a-first", ignore=shutil.ignore_patterns("checkpoints"))
    other = tmp_path / "other"
    train_meduna.main(tiny_settings(tmp_path / "train"), LABEL_SET,
                      labelled_folder(tmp_path / "images", {"normal": 4, "pneumonia": 4}, seed=8), other,
                      config=QUICK, progress=False)
    shutil.copytree(other, adapters / "b-second", ignore=shutil.ignore_patterns("checkpoints"))
    with running_app(tiny_settings(tmp_path / "data")) as client:
        [loaded] = client.get("/adapters").json()["data"]           # of two bundles for one label set, the first
        assert loaded["version"] == 1
        uploaded = client.post("/adapters", files=bundle_files(other)).json()
    with running_app(tiny_settings(tmp_path / "data")) as client:     # the folder still holds a-first
        [current] = client.get("/adapters").json()["data"]
        assert current["id"] == uploaded["id"] and current["version"] == uploaded["version"] == 2


def _nan_bundle(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    from safetensors.torch import load_file, save
    tensors = load_file(folder / "adapter.safetensors")
    tensors["adapter"][0, 0] = float("nan")
    data = save(tensors)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {"adapter.safetensors": {"sha256": hashlib.sha256(data).hexdigest()}}
    return [("files", ("adapter.safetensors", data)), ("files", ("manifest.json", json.dumps(manifest).encode()))]


def test_non_finite_weights_and_archive_bombs_are_refused(tmp_path: Path, bundle: Path) -> None:
    with running_app(tiny_settings(tmp_path, max_upload_bytes=200_000)) as client:
        nan = client.post("/adapters", files=_nan_bundle(bundle))
        assert nan.status_code == 422 and "NaN" in nan.json()["error"]["message"]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("manifest.json", b" " * 5_000_000)          # 5 MB of spaces: a few KB packed
            archive.write(bundle / "adapter.safetensors", "adapter.safetensors")
        assert len(buffer.getvalue()) < 200_000
        bomb = client.post("/adapters", files=[("files", ("bomb.zip", buffer.getvalue()))])
        assert bomb.status_code == 422 and "unpacks to 5000000 bytes" in bomb.json()["error"]["message"]
        twice = io.BytesIO()
        with zipfile.ZipFile(twice, "w") as archive:
            for folder in ("a", "b"):
                archive.write(bundle / "manifest.json", f"{folder}/manifest.json")
            archive.write(bundle / "adapter.safetensors", "adapter.safetensors")
        doubled = client.post("/adapters", files=[("files", ("twice.zip", twice.getvalue()))])
        assert doubled.status_code == 422 and "twice" in doubled.json()["error"]["message"]
        assert client.get("/adapters").json()["count"] == 0
