"""method=fewshot over HTTP: support images uploaded per class, counted, used by the cache model (an uploaded
image labelled against the zero-shot answer flips it), per-request alpha / beta / base, refusals, removal."""
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import running_app, tiny_settings
from tests.factories import png_bytes

LABEL_SET = "chest-xray-pneumonia"
QUERY = png_bytes(width=70, height=50)


def classify(client: TestClient, method: str, **form) -> dict:
    answer = client.post("/classify", data={"label_set": LABEL_SET, "method": method, **form},
                         files={"file": ("query.png", QUERY)})
    assert answer.status_code == 200, answer.text
    return answer.json()


def upload(client: TestClient, shots: list[tuple[bytes, str]], **form) -> dict:
    answer = client.post(f"/labels/{LABEL_SET}/support", data={"classes": [c for _, c in shots], **form},
                         files=[("files", (f"shot{i}.png", data)) for i, (data, _) in enumerate(shots)])
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_support_images_flip_the_zero_shot_answer(client: TestClient) -> None:
    empty = client.get(f"/labels/{LABEL_SET}/support").json()
    assert empty["support_version"] is None and empty["counts"] == {"normal": 0, "pneumonia": 0}
    refused = client.post("/classify", data={"label_set": LABEL_SET, "method": "fewshot"},
                          files={"file": ("query.png", QUERY)})
    assert refused.status_code == 409 and f"POST /labels/{LABEL_SET}/support" in refused.json()["error"]["message"]

    zero_shot = classify(client, "zeroshot")
    other = next(p["label"] for p in zero_shot["predictions"] if p["label"] != zero_shot["decision"])
    stored = upload(client, [(QUERY, other), (png_bytes(width=40, height=90, mode="L"), zero_shot["decision"]),
                             (b"not an image", other)])
    assert stored["added"] == 2 and [s["filename"] for s in stored["skipped"]] == ["shot2.png"]
    assert stored["counts"] == {zero_shot["decision"]: 1, other: 1} and stored["support_version"] == 1

    fewshot = classify(client, "fewshot", cache_alpha="50")
    assert fewshot["decision"] == other                       # the identical support image decides
    assert fewshot["method_details"]["shots"] == stored["counts"]
    silent = classify(client, "fewshot", cache_alpha="0")
    assert [p["probability"] for p in silent["predictions"]] == [p["probability"] for p in zero_shot["predictions"]]
    on_kpl = classify(client, "fewshot", cache_base="kpl", cache_beta="2")
    assert on_kpl["method_details"]["cache_base"] == "kpl" and on_kpl["method_details"]["cache_beta"] == 2

    again = upload(client, [(png_bytes(width=55, height=55), "pneumonia")])
    assert again["images"] == 3 and again["support_version"] == 2
    replaced = upload(client, [(png_bytes(width=60, height=45), "normal")], replace="true")
    assert replaced["counts"] == {"normal": 1, "pneumonia": 0}
    assert client.delete(f"/labels/{LABEL_SET}/support").status_code == 204
    assert client.post("/classify", data={"label_set": LABEL_SET, "method": "fewshot"},
                       files={"file": ("query.png", QUERY)}).status_code == 409


@pytest.mark.parametrize(("form", "files", "status", "code"), [
    ({"classes": ["pneumonia", "normal"]}, 1, 422, "invalid_input"),         # a class per file
    ({"classes": ["effusion"]}, 1, 422, "invalid_input"),                    # not a class of the label set
])
def test_bad_uploads_are_refused_before_any_image_is_read(client: TestClient, form: dict, files: int, status: int,
                                                          code: str) -> None:
    answer = client.post(f"/labels/{LABEL_SET}/support", data=form,
                         files=[("files", (f"{i}.png", png_bytes())) for i in range(files)])
    assert answer.status_code == status and answer.json()["error"]["code"] == code
    assert client.get(f"/labels/{LABEL_SET}/support").json()["images"] == 0


def test_options_belong_to_fewshot_and_uploads_to_admins(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, admin_api_key="s3cret")) as client:
        wrong = client.post("/classify", data={"label_set": LABEL_SET, "cache_alpha": "2"},
                            files={"file": ("query.png", QUERY)})
        assert wrong.status_code == 422 and "method=fewshot" in wrong.json()["error"]["message"]
        assert client.post("/classify", data={"label_set": LABEL_SET, "method": "fewshot", "cache_beta": "0"},
                           files={"file": ("query.png", QUERY)}).status_code == 422
        shots = {"data": {"classes": ["normal"]}, "files": [("files", ("a.png", png_bytes()))]}
        assert client.post(f"/labels/{LABEL_SET}/support", **shots).status_code == 401
        assert client.post(f"/labels/{LABEL_SET}/support", headers={"X-API-Key": "s3cret"}, **shots).status_code == 200
        assert client.post("/labels/no-such-set/support", headers={"X-API-Key": "s3cret"}, **shots).status_code == 404
