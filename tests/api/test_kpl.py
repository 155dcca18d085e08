"""method=kpl over HTTP: per-image evidence, fitting a pool, classify with the fit, transductive batches."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.settings import BUNDLED_KNOWLEDGE_BASE_DIR
from tests.conftest import running_app, tiny_settings
from tests.factories import png_bytes

LABEL_SET = "chest-xray-pneumonia"


def pool(n: int = 12) -> list[tuple[str, tuple[str, bytes]]]:
    rng = np.random.default_rng(0)
    return [("files", (f"pool{i}.png", png_bytes(width=int(rng.integers(40, 90)), height=int(rng.integers(40, 90)),
                                                   mode="L" if i % 2 else "RGB"))) for i in range(n)]


def classify_kpl(client: TestClient, data: bytes, **form) -> dict:
    response = client.post("/classify", data={"label_set": LABEL_SET, "method": "kpl", **form},
                           files={"file": ("x.png", data)})
    assert response.status_code == 200, response.text
    return response.json()


def test_per_image_kpl_explains_with_the_best_fitting_descriptions(client: TestClient) -> None:
    body = classify_kpl(client, png_bytes())
    assert body["method"] == "kpl" and body["method_details"] is None
    for prediction in body["predictions"]:
        evidence = prediction["evidence"]
        assert evidence["proxy"] == "per-image" and len(evidence["descriptions"]) == 8
        similarities = [d["similarity"] for d in evidence["descriptions"]]
        assert similarities == sorted(similarities, reverse=True)
        assert all(d["source"] == "curated" for d in evidence["descriptions"])
    # the class proxy is the normalised mean of those descriptions: its similarity is their mean / |mean|
    top = body["predictions"][0]
    assert top["similarity"] >= np.mean([d["similarity"] for d in top["evidence"]["descriptions"]]) - 1e-5
    zeroshot = client.post("/classify", data={"label_set": LABEL_SET}, files={"file": ("x.png", png_bytes())}).json()
    assert zeroshot["predictions"][0].get("evidence") is None
    assert {p["similarity"] for p in zeroshot["predictions"]} != {p["similarity"] for p in body["predictions"]}


def test_fit_then_classify_uses_the_vision_proxies(client: TestClient) -> None:
    assert client.get(f"/labels/{LABEL_SET}/kpl").json()["error"]["code"] == "kpl_fit_not_found"
    files = pool() + [("files", ("broken.png", png_bytes()[:30]))]
    fitted = client.post(f"/labels/{LABEL_SET}/kpl", files=files)
    assert fitted.status_code == 201, fitted.text
    fit = fitted.json()
    assert fit["pool_size"] == 12 and fit["fit_version"] == 1 and fit["model"] == "medzero-tiny"
    assert sum(fit["class_balance"].values()) == pytest.approx(1.0, abs=1e-4)
    assert set(fit["evidence"]) == {"normal", "pneumonia"} and len(fit["evidence"]["normal"]) == 8
    assert fit["skipped"] == [{"filename": "broken.png", "result": None,
                               "error": {"code": "invalid_image", "message": fit["skipped"][0]["error"]["message"]}}]
    assert fit["config"]["balancing"] == "reference" and fit["config"]["proxy_iters"] == 2000
    assert client.get(f"/labels/{LABEL_SET}/kpl").json()["fit_version"] == 1

    body = classify_kpl(client, png_bytes())
    assert body["method_details"]["fit_version"] == 1 and body["method_details"]["pool_size"] == 12
    assert all(p["evidence"]["proxy"] == "fitted" for p in body["predictions"])
    fit_texts = {d["text"] for d in fit["evidence"]["normal"] + fit["evidence"]["pneumonia"]}
    assert {d["text"] for p in body["predictions"] for d in p["evidence"]["descriptions"]} == fit_texts

    assert client.post(f"/labels/{LABEL_SET}/kpl", files=pool(6)).json()["fit_version"] == 2   # versioned
    assert classify_kpl(client, png_bytes())["method_details"]["fit_version"] == 2

    assert client.delete(f"/labels/{LABEL_SET}/kpl").status_code == 204
    assert client.delete(f"/labels/{LABEL_SET}/kpl").status_code == 404
    assert classify_kpl(client, png_bytes())["predictions"][0]["evidence"]["proxy"] == "per-image"


def test_a_new_label_set_version_does_not_reuse_an_old_fit(client: TestClient) -> None:
    client.post(f"/labels/{LABEL_SET}/kpl", files=pool(6))
    spec = client.get(f"/labels/{LABEL_SET}").json()
    update = {k: spec[k] for k in ("name", "modality", "description", "classes")}
    assert client.put(f"/labels/{LABEL_SET}", json=update).json()["version"] == 2
    assert client.get(f"/labels/{LABEL_SET}/kpl").status_code == 404
    assert classify_kpl(client, png_bytes())["predictions"][0]["evidence"]["proxy"] == "per-image"


def test_transductive_batch_fits_on_its_own_images(client: TestClient) -> None:
    files = pool(8)
    response = client.post("/classify/batch?method=kpl&transductive=true", data={"label_set": LABEL_SET}, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["transductive"] and body["succeeded"] == 8
    first = body["results"][0]["result"]
    assert first["predictions"][0]["evidence"]["proxy"] == "transductive"
    assert first["method_details"]["pool_size"] == 8
    assert client.get(f"/labels/{LABEL_SET}/kpl").status_code == 404          # nothing stored
    refused = client.post("/classify/batch?transductive=true", data={"label_set": LABEL_SET}, files=files)
    assert refused.status_code == 422 and "kpl" in refused.json()["error"]["message"]


def test_label_set_descriptions_feed_kpl(client: TestClient) -> None:
    spec = {"name": "knee", "modality": "knee-xray", "classes": [
        {"name": "normal", "descriptions": ["a uniform joint space", "smooth articular surfaces"]},
        {"name": "oa"}]}                                                       # no descriptions: prompts
    assert client.post("/labels", json=spec).status_code == 201
    body = client.post("/classify", data={"label_set": "knee", "method": "kpl"},
                       files={"file": ("x.png", png_bytes())}).json()
    evidence = {p["label"]: p["evidence"] for p in body["predictions"]}
    assert evidence["oa"] == {"proxy": "prompts", "descriptions": []}
    assert {d["text"] for d in evidence["normal"]["descriptions"]} == {"a uniform joint space",
                                                                      "smooth articular surfaces"}
    assert evidence["normal"]["descriptions"][0]["source"] == "label_set"


def test_fit_refusals(client: TestClient) -> None:
    assert client.post("/labels/nope/kpl", files=pool(3)).status_code == 404
    too_few = client.post(f"/labels/{LABEL_SET}/kpl", files=pool(1))
    assert too_few.status_code == 422 and "at least 2" in too_few.json()["error"]["message"]
    neither = client.post(f"/labels/{LABEL_SET}/kpl", data={"label_set": LABEL_SET})
    assert neither.status_code == 422
    disabled = client.post(f"/labels/{LABEL_SET}/kpl", data={"folder": "pool"})
    assert disabled.status_code == 422 and "MEDZERO_KPL_POOL_ROOT" in disabled.json()["error"]["message"]


def test_fit_from_a_server_side_folder_stays_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "pools"
    (root / "cxr" / "nested").mkdir(parents=True)
    for i, (_, (_, data)) in enumerate(pool(5)):
        (root / "cxr" / ("nested" if i % 2 else "") / f"{i}.png").write_bytes(data)
    (tmp_path / "secret").mkdir()
    (root / "cxr" / "huge.png").write_bytes(bytes(300_000))
    with running_app(tiny_settings(tmp_path / "data", kpl_pool_root=root, max_upload_bytes=200_000)) as client:
        fitted = client.post(f"/labels/{LABEL_SET}/kpl", data={"folder": "cxr"})
        assert fitted.status_code == 201 and fitted.json()["pool_size"] == 5
        assert [(s["filename"], s["error"]["code"]) for s in fitted.json()["skipped"]] == [
            ("cxr/huge.png", "payload_too_large")]
        assert "medzero_kpl_fit_duration_seconds_count" in client.get("/metrics").text
        escape = client.post(f"/labels/{LABEL_SET}/kpl", data={"folder": "../secret"})
        assert escape.status_code == 422 and "outside" in escape.json()["error"]["message"]
        assert client.post(f"/labels/{LABEL_SET}/kpl", data={"folder": "missing"}).status_code == 422


def test_admin_key_guards_fit_and_delete(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, admin_api_key="s3cret")) as client:
        assert client.post(f"/labels/{LABEL_SET}/kpl", files=pool(3)).status_code == 401
        wrong = client.post(f"/labels/{LABEL_SET}/kpl", files=pool(3), headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
        assert client.post(f"/labels/{LABEL_SET}/kpl", files=pool(3), headers={"X-API-Key": "s3cret"}).status_code == 201
        assert client.get(f"/labels/{LABEL_SET}/kpl").status_code == 200     # reading needs no key
        assert client.delete(f"/labels/{LABEL_SET}/kpl").status_code == 401


def test_knowledge_base_status(client: TestClient) -> None:
    status = client.get("/kb").json()
    assert status["model_id"] == "medzero-tiny" and status["dim"] == 64 and status["count"] > 1000


def test_class_prior_steers_the_balancing(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, kpl_balancing="sinkhorn")) as client:
        prior = '{"normal": 0.9, "pneumonia": 0.1}'
        fitted = client.post(f"/labels/{LABEL_SET}/kpl", files=pool(20), data={"class_prior": prior}).json()
        assert fitted["config"]["class_prior"] == {"normal": 0.9, "pneumonia": 0.1}
        assert fitted["class_balance"]["normal"] >= 0.8
        for bad in ('{"normal": 1}', '{"normal": 1, "pneumonia": 0}', '{"normal": 1, "pneumonia": 1, "x": 1}', "[1]"):
            refused = client.post(f"/labels/{LABEL_SET}/kpl", files=pool(3), data={"class_prior": bad})
            assert refused.status_code == 422 and "class_prior" in refused.json()["error"]["message"]


def test_a_refit_after_delete_is_used_not_the_cached_old_one(client: TestClient) -> None:
    client.post(f"/labels/{LABEL_SET}/kpl", files=pool(12))
    assert classify_kpl(client, png_bytes())["method_details"]["pool_size"] == 12     # cached now
    client.delete(f"/labels/{LABEL_SET}/kpl")
    assert client.post(f"/labels/{LABEL_SET}/kpl", files=pool(5)).json()["fit_version"] == 1   # numbering restarts
    assert client.get(f"/labels/{LABEL_SET}/kpl").json()["pool_size"] == 5
    assert classify_kpl(client, png_bytes())["method_details"]["pool_size"] == 5


def test_a_recreated_label_set_gets_its_own_fit(client: TestClient) -> None:
    two = {"name": "x", "modality": "chest-xray", "classes": [{"name": "a"}, {"name": "b"}]}
    three = {**two, "classes": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}
    client.post("/labels", json=two)
    client.post("/labels/x/kpl", files=pool(6))
    client.post("/classify", data={"label_set": "x", "method": "kpl"}, files={"file": ("x.png", png_bytes())})
    client.delete("/labels/x")
    client.post("/labels", json=three)
    client.post("/labels/x/kpl", files=pool(6))
    answer = client.post("/classify", data={"label_set": "x", "method": "kpl"}, files={"file": ("x.png", png_bytes())})
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3


def test_a_pool_larger_than_the_queue_is_encoded_in_chunks(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, max_queue_images=8)) as client:
        fitted = client.post(f"/labels/{LABEL_SET}/kpl", files=pool(30)).json()
        assert fitted["pool_size"] == 30 and fitted["skipped"] == []


def test_transductive_batches_are_fitted_on_all_their_images_or_refused(client: TestClient) -> None:
    single = client.post("/classify?transductive=true&method=kpl", data={"label_set": LABEL_SET},
                         files={"file": ("x.png", png_bytes())})
    assert single.status_code == 422 and "/classify/batch" in single.json()["error"]["message"]
    lone = client.post("/classify/batch?method=kpl&transductive=true", data={"label_set": LABEL_SET},
                       files=pool(1))
    assert lone.status_code == 422 and "at least 2 images" in lone.json()["error"]["message"]
    with_bad_files = pool(6) + [("files", ("b.png", b"garbage")), ("files", ("c.png", png_bytes()[:50]))]
    refused = client.post("/classify/batch?method=kpl&transductive=true", data={"label_set": LABEL_SET},
                          files=with_bad_files)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "unusable_batch"
    assert "2 of 8 files" in error["message"] and "b.png (invalid_image)" in error["message"]
    assert "c.png (invalid_image)" in error["message"]
    assert client.get(f"/labels/{LABEL_SET}/kpl").status_code == 404          # nothing fitted, nothing stored
    # the same files without transductive: the good ones are answered, the bad ones get their own errors
    plain = client.post("/classify/batch?method=kpl", data={"label_set": LABEL_SET}, files=with_bad_files).json()
    assert plain["succeeded"] == 6 and plain["failed"] == 2


def test_an_overloaded_transductive_batch_is_refused_whole(client: TestClient) -> None:
    admission = client.app.state.runtime.admission
    held = client.portal.call(admission.try_acquire, admission.max_images - 3)   # room for 3 of the batch's 8
    try:
        refused = client.post("/classify/batch?method=kpl&transductive=true", data={"label_set": LABEL_SET},
                              files=pool(8))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["retry-after"] == "1"
    finally:
        client.portal.call(held.release)
    answered = client.post("/classify/batch?method=kpl&transductive=true", data={"label_set": LABEL_SET},
                           files=pool(8)).json()
    assert answered["succeeded"] == 8
    assert answered["results"][0]["result"]["method_details"]["pool_size"] == 8


def test_server_restart_loads_the_index_and_a_corpus_change_rebuilds_it(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(BUNDLED_KNOWLEDGE_BASE_DIR, corpus)
    settings = tiny_settings(tmp_path / "data", knowledge_base_dir=corpus)
    with running_app(settings) as client:
        first = client.get("/kb").json()
    with running_app(settings) as client:
        assert client.get("/kb").json() == first                     # loaded as saved, not rebuilt
    body = json.loads((corpus / "ham10000.json").read_text())
    body["classes"]["mel"].append({"text": "atypical pigment network with abrupt edge cut-off", "source": "curated"})
    (corpus / "ham10000.json").write_text(json.dumps(body))
    with running_app(settings) as client:
        changed = client.get("/kb").json()
        assert changed["count"] == first["count"] + 1 and changed["built_at"] > first["built_at"]
        assert changed["corpus_hash"] != first["corpus_hash"]
        answer = client.post("/classify", data={"label_set": "ham10000", "method": "kpl", "top_k": 7},
                             files={"file": ("x.png", png_bytes())}).json()
        mel = next(p for p in answer["predictions"] if p["label"] == "mel")
        assert len(mel["evidence"]["descriptions"]) == 8
    (corpus / "ham10000.json").write_text("{broken")
    with running_app(settings) as client:                          # a malformed corpus: a clear start-up failure
        detail = client.get("/readyz").json()["detail"]
        assert "ham10000.json" in detail and "not JSON" in detail
