"""method=hica over HTTP: a bundle from `medzero train hica` is loaded through /adapters beside a MedUnA one, serves
/classify and /classify/batch through its tuned tower (the loaded model stays as it was), and a bundle that does not
fit this model or label set is refused with nothing loaded."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from app.jobs import train_hica, train_meduna
from app.jobs.train_hica import HiCAConfig
from app.jobs.train_meduna import MedUnAConfig
from app.methods.hica_config import AlignConfig, PreAdaptConfig, TuningConfig
from app.methods.meduna import ImageStageConfig, TextStageConfig
from tests.conftest import tiny_settings
from tests.factories import labelled_folder, png_bytes

LABEL_SET = "chest-xray-pneumonia"
QUICK = HiCAConfig(tuning=TuningConfig(lr=0.05, text_lr=0.01), pre=PreAdaptConfig(epochs=1, text_steps=20),
                   align=AlignConfig(epochs=3, batch_size=4), seed=1)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hica")
    shots = labelled_folder(root / "shots", {"normal": 3, "pneumonia": 3})
    settings = tiny_settings(root / "data")
    train_hica.main(settings, LABEL_SET, shots, root / "hica", config=QUICK, progress=False)
    meduna = MedUnAConfig(text=TextStageConfig(steps=20), image=ImageStageConfig(n_prompt_tokens=2, epochs=1,
                                                                                  batch_size=6))
    train_meduna.main(settings, LABEL_SET, shots, root / "meduna", config=meduna, progress=False)
    return {"hica": root / "hica", "meduna": root / "meduna"}


def bundle_files(folder: Path, adapter: bytes | None = None, **manifest_changes) -> list:
    manifest = json.loads((folder / "manifest.json").read_text()) | manifest_changes
    return [("files", ("adapter.safetensors", adapter or (folder / "adapter.safetensors").read_bytes())),
            ("files", ("manifest.json", json.dumps(manifest).encode()))]


def classify(client: TestClient, method: str, image: bytes | None = None) -> dict:
    response = client.post("/classify", data={"label_set": LABEL_SET, "method": method},
                           files={"file": ("x.png", image or png_bytes(width=70, height=60))})
    assert response.status_code == 200, response.text
    return response.json()


def test_no_hica_adapter_is_409_naming_the_job(client: TestClient) -> None:
    refused = client.post("/classify", data={"label_set": LABEL_SET, "method": "hica"},
                          files={"file": ("x.png", png_bytes())})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "adapter_not_found"
    assert "medzero train hica --label-set chest-xray-pneumonia" in refused.json()["error"]["message"]


def test_hica_bundle_serves_beside_meduna_and_leaves_the_model_alone(client: TestClient,
                                                                     bundles: dict[str, Path]) -> None:
    model = client.app.state.runtime.encoder.model
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    zeroshot = classify(client, "zeroshot")
    uploaded = client.post("/adapters", files=bundle_files(bundles["hica"]))
    assert uploaded.status_code == 201, uploaded.text
    hica = uploaded.json()
    assert hica["method"] == "hica" and hica["prompt_tokens"] is None and hica["version"] == 1
    assert hica["tuned_weights"] and all(".attn." in name for name in hica["tuned_weights"])
    assert hica["config"]["align"]["epochs"] == 3 and "stage2" in hica["metrics"]
    assert client.post("/adapters", files=bundle_files(bundles["meduna"])).status_code == 201
    listed = client.get("/adapters").json()
    assert listed["count"] == 2 and sorted(a["method"] for a in listed["data"]) == ["hica", "meduna"]

    answer = classify(client, "hica")
    assert answer["method"] == "hica" and answer["method_details"]["adapter_id"] == hica["id"]
    assert [p["probability"] for p in answer["predictions"]] != [p["probability"] for p in zeroshot["predictions"]]
    assert classify(client, "meduna")["method_details"]["adapter_id"] != hica["id"]
    batch = client.post("/classify/batch", data={"label_set": LABEL_SET, "method": "hica"},
                        files=[("files", (f"{i}.png", png_bytes(width=50 + i))) for i in range(3)]).json()
    assert batch["succeeded"] == 3
    single = classify(client, "hica", png_bytes(width=50))          # batched and single forwards through the tuned tower agree
    assert [p["probability"] for p in batch["results"][0]["result"]["predictions"]] == pytest.approx(
        [p["probability"] for p in single["predictions"]], abs=1e-5)
    assert classify(client, "zeroshot")["predictions"] == zeroshot["predictions"]
    assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())

    assert client.delete(f"/adapters/{hica['id']}").status_code == 204
    assert [a["method"] for a in client.get("/adapters").json()["data"]] == ["meduna"]
    assert client.post("/classify", data={"label_set": LABEL_SET, "method": "hica"},
                       files={"file": ("x.png", png_bytes())}).status_code == 409


@pytest.mark.parametrize("change, status, field", [
    ({"model_id": "ViT-B-16"}, 409, "model_id"),
    ({"label_set_version": 2}, 409, "label_set_version"),
    ({"class_names": ["pneumonia", "normal"]}, 409, "class_names"),
    ({"format": "medzero-meduna/1"}, 422, "format"),
    ({"method": "tip"}, 422, "method"),
    ({"tuning": {"mode": "lora", "blocks": 2, "lora_rank": 8, "lora_alpha": 8.0}}, 422, "shape"),
    ({"tuning": {"mode": "lora", "blocks": 1, "lora_rank": 4, "lora_alpha": 8.0}}, 422, "do not fit"),
    ({"tuning": {"mode": "lora", "blocks": 2, "lora_rank": 4, "lora_alpha": float("nan")}}, 422, "lora_alpha"),
    ({"tuning": {"mode": "lora", "blocks": 2, "lora_rank": 4, "lora_alpha": 1e38}}, 422, "lora_alpha"),
    ({"temperature": 0}, 422, "temperature"),
    ({"temperature": 1e-30}, 422, "temperature"),
])
def test_mismatched_hica_bundles_are_refused_with_nothing_loaded(client: TestClient, bundles: dict[str, Path],
                                                                 change: dict, status: int, field: str) -> None:
    refused = client.post("/adapters", files=bundle_files(bundles["hica"], **change))
    assert refused.status_code == status, refused.text
    assert field in refused.json()["error"]["message"]
    assert client.get("/adapters").json()["count"] == 0


def test_tower_tensors_for_another_architecture_are_refused(client: TestClient, bundles: dict[str, Path],
                                                            tmp_path: Path) -> None:
    tensors = load_file(bundles["hica"] / "adapter.safetensors")
    name = next(n for n in tensors if n.startswith("tower.") and n.endswith(".lora_a"))
    renamed = {("tower.transformer.resblocks.99.attn.in_proj_weight.lora_a" if n == name else n): v
               for n, v in tensors.items()}
    save_file(renamed, str(tmp_path / "adapter.safetensors"))
    data = (tmp_path / "adapter.safetensors").read_bytes()
    files = bundle_files(bundles["hica"], data,
                         files={"adapter.safetensors": {"sha256": hashlib.sha256(data).hexdigest()}})
    refused = client.post("/adapters", files=files)
    assert refused.status_code == 422 and "resblocks.99" in refused.json()["error"]["message"]
    assert client.get("/adapters").json()["count"] == 0
    float8 = {n: (v.to(torch.float8_e4m3fn) if n == "class_embeddings" else v) for n, v in tensors.items()}
    save_file(float8, str(tmp_path / "adapter.safetensors"))         # an odd dtype: converted, never a 500
    data = (tmp_path / "adapter.safetensors").read_bytes()
    files = bundle_files(bundles["hica"], data,
                         files={"adapter.safetensors": {"sha256": hashlib.sha256(data).hexdigest()}})
    assert client.post("/adapters", files=files).status_code == 201
