"""/labels: lifecycle, validation, built-ins, persistence across restarts, embeddings keyed by model, the admin
key, the cost cap, a busy store, text embeddings on the encoder thread."""
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.services.builtin_label_sets import BUILTIN_LABEL_SETS
from app.storage.db import create_db_engine
from app.storage.label_sets import LabelSetRepository
from tests.conftest import encoder_thread_held, running_app, tiny_settings

WOUND = {"name": "wound-check", "modality": "photo", "description": "demo",
         "classes": [{"name": "healing", "synonyms": ["granulating wound"]},
                     {"name": "infected", "prompts": ["a photo of an infected wound with pus."],
                      "descriptions": ["purulent discharge"]}]}


def stored_embeddings(data_dir: Path, name: str, version: int, model_id: str) -> np.ndarray | None:
    repository = LabelSetRepository(create_db_engine(f"sqlite:///{data_dir / 'medzero.db'}"))
    return repository.class_embeddings(name, version, model_id)


def test_label_set_lifecycle(client: TestClient, tmp_path: Path) -> None:
    created = client.post("/labels", json=WOUND)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["version"] == 1 and not body["builtin"]
    assert [c["name"] for c in body["classes"]] == ["healing", "infected"]
    assert body["templates"] == ["a medical image showing {}.", "an image of {}."]   # unknown modality: generic

    assert client.get("/labels/wound-check").json()["classes"][1]["descriptions"] == ["purulent discharge"]
    assert "wound-check" in [ls["name"] for ls in client.get("/labels").json()["data"]]

    changed = {**WOUND, "classes": [*WOUND["classes"], {"name": "necrotic"}], "templates": ["a wound: {}."]}
    replaced = client.put("/labels/wound-check", json=changed)
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["version"] == 2 and replaced.json()["templates"] == ["a wound: {}."]
    vectors = stored_embeddings(tmp_path, "wound-check", 2, "medzero-tiny")
    assert vectors is not None and vectors.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert stored_embeddings(tmp_path, "wound-check", 1, "medzero-tiny") is None   # old version's cache dropped

    assert client.delete("/labels/wound-check").status_code == 204
    assert client.get("/labels/wound-check").status_code == 404
    assert client.delete("/labels/wound-check").status_code == 404


def test_class_embeddings_are_prompt_ensembles(client: TestClient, tmp_path: Path) -> None:
    client.post("/labels", json=WOUND)
    encoder = client.app.state.runtime.encoder
    expected = encoder.encode_texts(["a medical image showing healing.", "an image of healing.",
                                     "a medical image showing granulating wound.", "an image of granulating wound."])
    expected = expected.mean(0) / expected.mean(0).norm()
    stored = stored_embeddings(tmp_path, "wound-check", 1, "medzero-tiny")
    np.testing.assert_allclose(stored[0], expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("body, fragment", [
    ({**WOUND, "classes": WOUND["classes"][:1]}, "at least 2"),
    ({**WOUND, "classes": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({**WOUND, "name": "Bad Name!"}, "name"),
    ({**WOUND, "templates": ["no slot here"]}, "exactly one"),
    ({**WOUND, "surprise": 1}, "surprise"),
    ({"name": "x", "classes": [{"name": "a"}, {"name": "b"}]}, "modality"),
])
def test_invalid_label_sets_are_422_naming_the_problem(client: TestClient, body: dict, fragment: str) -> None:
    response = client.post("/labels", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"
    assert fragment in response.json()["error"]["message"]


def test_duplicate_name_is_409_and_leaves_the_original(client: TestClient) -> None:
    assert client.post("/labels", json=WOUND).status_code == 201
    duplicate = client.post("/labels", json={**WOUND, "classes": [{"name": "x"}, {"name": "y"}]})
    assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "label_set_exists"
    assert [c["name"] for c in client.get("/labels/wound-check").json()["classes"]] == ["healing", "infected"]


def test_unknown_and_mismatched_names(client: TestClient) -> None:
    assert client.get("/labels/nope").json()["error"]["code"] == "label_set_not_found"
    assert client.put("/labels/nope", json={**WOUND, "name": "nope"}).status_code == 404
    client.post("/labels", json=WOUND)
    renamed = client.put("/labels/wound-check", json={**WOUND, "name": "other"})
    assert renamed.status_code == 422 and "renaming" in renamed.json()["error"]["message"]


def test_builtins_installed_once(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path)
    with running_app(settings) as client:
        listed = {ls["name"]: ls for ls in client.get("/labels").json()["data"]}
        assert set(listed) == {spec.name for spec in BUILTIN_LABEL_SETS}
        assert all(ls["builtin"] for ls in listed.values())
        assert [c["name"] for c in listed["ham10000"]["classes"]] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
        assert listed["chest-xray-pneumonia"]["templates"][0] == "a chest X-ray showing {}."
        assert client.delete("/labels/ham10000").status_code == 204
    with running_app(settings) as client:       # a deleted built-in stays deleted
        assert client.get("/labels/ham10000").status_code == 404
        assert client.get("/labels/breast-ultrasound").status_code == 200


def test_label_sets_survive_restart(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path)
    with running_app(settings) as client:
        client.post("/labels", json=WOUND)
        client.put("/labels/wound-check", json={**WOUND, "description": "second"})
    with running_app(settings) as client:
        restored = client.get("/labels/wound-check").json()
        assert restored["version"] == 2 and restored["description"] == "second"
        assert client.post("/classify", data={"label_set": "wound-check"},
                           files={"file": ("x.png", _png())}).status_code == 200


def test_embeddings_are_recomputed_when_the_model_changes(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path)) as client:
        client.post("/labels", json=WOUND)
    assert stored_embeddings(tmp_path, "wound-check", 1, "medzero-tiny-b") is None
    with running_app(tiny_settings(tmp_path, model_name="medzero-tiny-b")) as client:
        response = client.post("/classify", data={"label_set": "wound-check"}, files={"file": ("x.png", _png())})
        assert response.status_code == 200 and response.json()["model"] == "medzero-tiny-b"
    other = stored_embeddings(tmp_path, "wound-check", 1, "medzero-tiny-b")
    assert other is not None and other.shape == (2, 48)                 # the other model's width
    assert stored_embeddings(tmp_path, "wound-check", 1, "medzero-tiny").shape == (2, 64)   # first model's kept


def test_label_writes_wait_for_the_model(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, model_name="no-such-model")) as client:
        assert client.get("/readyz").status_code == 503
        assert "not an open_clip architecture" in client.get("/readyz").json()["detail"]
        refused = client.post("/labels", json=WOUND)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        assert refused.headers["retry-after"] == "5"
        assert client.get("/labels").status_code == 200      # reads still work from the store


def _png() -> bytes:
    from tests.factories import png_bytes
    return png_bytes(width=80, height=60)


def test_label_set_writes_need_the_admin_key_when_one_is_set(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, admin_api_key="s3cret")) as client:
        key = {"X-API-Key": "s3cret"}
        for refused in (client.post("/labels", json=WOUND), client.put("/labels/ham10000", json=WOUND),
                        client.delete("/labels/ham10000"),
                        client.post("/labels", json=WOUND, headers={"X-API-Key": "wrong"})):
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        assert client.get("/labels/ham10000").status_code == 200                    # reads need no key
        assert client.get("/labels/wound-check").status_code == 404                 # nothing was written
        assert client.post("/labels", json=WOUND, headers=key).status_code == 201
        assert client.put("/labels/wound-check", json=WOUND, headers=key).json()["version"] == 2
        assert client.delete("/labels/wound-check", headers=key).status_code == 204


def test_the_text_encoding_cost_of_one_write_is_capped(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, max_label_set_texts=40)) as client:
        many_names = {**WOUND, "classes": [{"name": f"c{i}", "synonyms": [f"synonym {j}" for j in range(5)]}
                                           for i in range(4)]}          # 4 classes x 2 templates x 6 names = 48
        refused = client.post("/labels", json=many_names)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_label_set"
        assert "48 text encodings" in refused.json()["error"]["message"]
        assert "MEDZERO_MAX_LABEL_SET_TEXTS=40" in refused.json()["error"]["message"]
        assert client.get("/labels/wound-check").status_code == 404
        assert client.post("/labels", json=WOUND).status_code == 201              # 2x2 + 2x1 + 1 prompt + 1 desc
        assert client.put("/labels/wound-check", json=many_names).status_code == 422
        assert client.get("/labels/wound-check").json()["version"] == 1           # the old version stays


def test_a_write_locked_out_by_another_writer_is_503_and_nothing_is_lost(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, db_busy_timeout_ms=200)) as client:
        assert client.post("/labels", json=WOUND).status_code == 201
        other = sqlite3.connect(tmp_path / "medzero.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")                    # e.g. a `medzero kpl fit` job writing meanwhile
        try:
            busy = client.put("/labels/wound-check", json={**WOUND, "description": "second"})
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "store_busy"
            assert int(busy.headers["retry-after"]) >= 1
            assert client.get("/labels/wound-check").json()["version"] == 1
        finally:
            other.execute("ROLLBACK")
            other.close()
        retried = client.put("/labels/wound-check", json={**WOUND, "description": "second"})
        assert retried.status_code == 200 and retried.json()["version"] == 2


def test_label_set_text_embeddings_wait_for_the_encoder_thread(client: TestClient) -> None:
    """Registration embeds its prompts (and its descriptions for the index) on the encoder's own thread: while
    that thread is busy, the write waits instead of running a text forward beside an image forward."""
    with encoder_thread_held(client) as release, ThreadPoolExecutor(1) as pool:
        created = pool.submit(client.post, "/labels", json=WOUND)
        time.sleep(0.5)
        waiting = not created.done()
        release.set()
        assert created.result().status_code == 201
    assert waiting, "the label set was embedded while the encoder thread was busy"
