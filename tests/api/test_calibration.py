"""Calibration over HTTP: /classify says when its probabilities are calibrated, returns conformal prediction sets,
abstains below a threshold; label-set updates and new KPL fits retire calibrations."""
from functools import partial
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.errors import InvalidInput
from app.services.calibration import CalibrationReport
from app.services.uploads import on_disk
from tests.conftest import metric, running_app, tiny_settings
from tests.factories import labelled_folder, png_bytes

LABEL_SET = "chest-xray-pneumonia"


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    return labelled_folder(tmp_path / "labelled", {"normal": 12, "pneumonia": 12})


def calibrate(client: TestClient, folder: Path, method: str = "zeroshot", label_set: str = LABEL_SET,
              **options) -> CalibrationReport:
    """What `medzero calibrate` does, on the running app's own runtime (its event loop, encoder and store)."""
    paths = sorted(folder.rglob("*.png"))
    files = [on_disk(path, path.name, 10 * 2**20) for path in paths]
    service = client.app.state.runtime.calibrations
    return client.portal.call(partial(service.calibrate, label_set, method, files, [p.parent.name for p in paths],
                                      **options))


def classify(client: TestClient, label_set: str = LABEL_SET, image: bytes | None = None, **form) -> dict:
    response = client.post("/classify", data={"label_set": label_set, **form},
                           files={"file": ("x.png", image or png_bytes())})
    assert response.status_code == 200, response.text
    return response.json()


def test_uncalibrated_answers_say_so(client: TestClient) -> None:
    answer = classify(client)
    assert answer["calibrated"] is False and answer["temperature"] is None and answer["prediction_set"] is None
    assert answer["decision"] == answer["predictions"][0]["label"] and answer["abstained"] is False
    assert answer["decision_rule"] == "top1"


def test_calibrated_probabilities_and_prediction_set(client: TestClient, labelled: Path) -> None:
    raw = classify(client)
    report = calibrate(client, labelled, coverage=0.8)
    calibration = report.calibration
    assert calibration.version == 1 and calibration.images["held_back"] == 12
    answer = classify(client)
    assert answer["calibrated"] is True and answer["prediction_set_coverage"] == 0.8
    assert answer["temperature"] == pytest.approx(calibration.temperature)
    # the raw similarities are unchanged; probabilities are softmax(logit_scale * similarity / T)
    similarities = torch.tensor([p["similarity"] for p in raw["predictions"]], dtype=torch.float64)
    logit_scale = client.app.state.runtime.encoder.logit_scale
    expected = (logit_scale * similarities / calibration.temperature).softmax(dim=0)
    by_label = {p["label"]: p["probability"] for p in answer["predictions"]}
    assert [by_label[p["label"]] for p in raw["predictions"]] == pytest.approx(expected.tolist(), abs=1e-4)
    # the API rounds probabilities to 6 decimals: compare away from the threshold
    surely_in = {label for label, p in by_label.items() if p >= calibration.set_threshold + 1e-6}
    maybe_in = {label for label, p in by_label.items() if p >= calibration.set_threshold - 1e-6}
    assert surely_in <= set(answer["prediction_set"]) <= maybe_in

    listed = client.get(f"/labels/{LABEL_SET}/calibration").json()
    assert [c["method"] for c in listed["data"]] == ["zeroshot"]
    held_back = listed["data"][0]["report"]
    assert set(held_back) >= {"before", "after", "prediction_sets"}
    assert held_back["after"]["nll"] <= held_back["before"]["nll"] + 0.05   # T was fitted on other images


def test_delete_calibration_goes_back_to_raw_probabilities(client: TestClient, labelled: Path) -> None:
    calibrate(client, labelled)
    assert classify(client)["calibrated"] is True
    assert client.delete(f"/labels/{LABEL_SET}/calibration/zeroshot").status_code == 204
    assert classify(client)["calibrated"] is False
    again = client.delete(f"/labels/{LABEL_SET}/calibration/zeroshot")
    assert again.status_code == 404 and again.json()["error"]["code"] == "calibration_not_found"
    assert client.delete(f"/labels/{LABEL_SET}/calibration/nope").json()["error"]["code"] == "unknown_method"


def test_a_label_set_update_retires_its_calibration(client: TestClient, tmp_path: Path) -> None:
    spec = {"name": "knee", "modality": "knee-xray", "classes": [{"name": "a"}, {"name": "b"}]}
    assert client.post("/labels", json=spec).status_code == 201
    calibrate(client, labelled_folder(tmp_path / "knee", {"a": 8, "b": 8}), label_set="knee")
    assert classify(client, "knee")["calibrated"] is True
    cautious = client.put("/labels/knee", json={**spec, "abstain_threshold": 0.99}).json()
    assert cautious["version"] == 1 and cautious["abstain_threshold"] == 0.99   # a decision setting: no new version
    answer = classify(client, "knee")
    assert answer["calibrated"] is True and answer["abstain_threshold"] == 0.99
    updated = {**spec, "classes": [{"name": "a", "synonyms": ["first"]}, {"name": "b"}]}
    assert client.put("/labels/knee", json=updated).json()["version"] == 2
    answer = classify(client, "knee")
    assert answer["calibrated"] is False and answer["abstain_threshold"] is None
    assert client.get("/labels/knee/calibration").json()["data"] == []


def test_a_new_kpl_fit_retires_the_kpl_calibration_only(client: TestClient, labelled: Path) -> None:
    calibrate(client, labelled, method="kpl")
    calibrate(client, labelled, method="zeroshot")
    assert classify(client, method="kpl")["calibrated"] is True
    pool = [("files", (p.name, p.read_bytes())) for p in sorted(labelled.rglob("*.png"))[:6]]
    assert client.post(f"/labels/{LABEL_SET}/kpl", files=pool).status_code == 201
    assert classify(client, method="kpl")["calibrated"] is False       # calibrated on per-image kpl, now fitted
    assert classify(client, method="zeroshot")["calibrated"] is True
    calibrate(client, labelled, method="kpl")                          # calibrating again covers the fit
    assert classify(client, method="kpl")["calibrated"] is True


def test_transductive_batches_are_not_calibrated(client: TestClient, labelled: Path) -> None:
    calibrate(client, labelled, method="kpl")
    files = [("files", (p.name, p.read_bytes())) for p in sorted(labelled.rglob("*.png"))[:4]]
    batch = client.post("/classify/batch", data={"label_set": LABEL_SET, "method": "kpl", "transductive": "true"},
                        files=files).json()
    assert all(item["result"]["calibrated"] is False for item in batch["results"])


def test_abstain_below_the_label_sets_threshold_or_the_requests(client: TestClient) -> None:
    spec = {"name": "cautious", "modality": "chest-xray", "abstain_threshold": 0.999,
            "classes": [{"name": "normal"}, {"name": "pneumonia"}]}
    created = client.post("/labels", json=spec)
    assert created.status_code == 201 and created.json()["abstain_threshold"] == 0.999
    before = metric(client, "medzero_decisions_total", method="zeroshot", outcome="uncertain", calibrated="false")
    unsure = classify(client, "cautious")
    assert unsure["decision"] == "uncertain" and unsure["abstained"] is True
    assert unsure["decision_rule"] == "threshold" and unsure["abstain_threshold"] == 0.999
    assert len(unsure["predictions"]) == 2                   # the ranking is still there
    assert metric(client, "medzero_decisions_total", method="zeroshot", outcome="uncertain",
                  calibrated="false") == before + 1
    decided = classify(client, "cautious", abstain_threshold="0")
    assert decided["abstained"] is False and decided["decision"] == decided["predictions"][0]["label"]
    batch = client.post("/classify/batch?abstain_threshold=0.999", data={"label_set": LABEL_SET},
                        files=[("files", ("a.png", png_bytes())), ("files", ("b.png", png_bytes(width=80)))]).json()
    assert [item["result"]["decision"] for item in batch["results"]] == ["uncertain", "uncertain"]
    refused = client.post("/classify", data={"label_set": LABEL_SET, "abstain_threshold": "1.5"},
                          files={"file": ("x.png", png_bytes())})
    assert refused.status_code == 422
    bad_spec = client.post("/labels", json={**spec, "name": "bad", "abstain_threshold": -0.1})
    assert bad_spec.status_code == 422


def test_prediction_set_decision_rule(tmp_path: Path) -> None:
    labelled = labelled_folder(tmp_path / "labelled", {"normal": 12, "pneumonia": 12})
    with running_app(tiny_settings(tmp_path / "data", decision_rule="prediction_set")) as client:
        assert classify(client)["decision_rule"] == "top1"          # nothing calibrated: nothing to go by
        calibrate(client, labelled, coverage=0.5)      # 6 conformal images can certify 50 %: sets of 1 or 2
        answers = [classify(client, image=path.read_bytes()) for path in sorted(labelled.rglob("*.png"))]
        assert {len(answer["prediction_set"]) for answer in answers} >= {1, 2}   # both cases below are seen
        for answer in answers:
            assert answer["decision_rule"] == "prediction_set"
            single = len(answer["prediction_set"]) == 1
            assert answer["abstained"] is not single
            assert answer["decision"] == (answer["prediction_set"][0] if single else "uncertain")


def test_calibration_refusals(client: TestClient, labelled: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="coverage"):
        calibrate(client, labelled, coverage=1.0)
    with pytest.raises(InvalidInput, match="at least 6"):
        calibrate(client, labelled_folder(tmp_path / "few", {"normal": 2, "pneumonia": 2}))
    with pytest.raises(InvalidInput, match="not classes"):
        calibrate(client, labelled_folder(tmp_path / "odd", {"normal": 4, "elsewhere": 4}))
