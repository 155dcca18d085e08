"""/classify and /classify/batch with the real app: every input type, every refusal, batch equals single."""
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import encoder_thread_held, metric, running_app, tiny_settings
from tests.factories import jpeg_bytes, make_dicom_bytes, png_bytes, png_header_bytes, shared_data_dir, tiff_bytes

LABEL_SET = "chest-xray-findings"
N_CLASSES = 7


def classify(client: TestClient, data: bytes, **form) -> "httpx.Response":  # noqa: F821
    return client.post("/classify", data={"label_set": LABEL_SET, **form},
                       files={"file": ("upload.bin", data, "application/octet-stream")})


@pytest.mark.parametrize("name, data, fmt", [
    ("png", png_bytes(width=100, height=80), "png"),
    ("grey png", png_bytes(width=64, height=64, mode="L"), "png"),
    ("jpeg", jpeg_bytes(width=120, height=90), "jpeg"),
    ("tiff", tiff_bytes(width=70, height=70), "tiff"),
    ("dicom monochrome2 8-bit", make_dicom_bytes(), "dicom"),
    ("dicom monochrome1", make_dicom_bytes(photometric="MONOCHROME1"), "dicom"),
    ("dicom 16-bit rescaled, windowed", make_dicom_bytes(bits_allocated=16, bits_stored=12, rescale_slope=2.0,
                                                         rescale_intercept=-1024, window_center=500,
                                                         window_width=2000), "dicom"),
])
def test_classify_each_format(client: TestClient, name: str, data: bytes, fmt: str) -> None:
    response = classify(client, data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["input_format"] == fmt and body["method"] == "zeroshot" and body["model"] == "medzero-tiny"
    assert body["label_set"] == LABEL_SET and body["label_set_version"] == 1
    predictions = body["predictions"]
    assert len(predictions) == N_CLASSES
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-4)
    assert [p["probability"] for p in predictions] == sorted((p["probability"] for p in predictions), reverse=True)
    assert all(-1.0 <= p["similarity"] <= 1.0 for p in predictions)
    assert body["elapsed_ms"] > 0


def test_probabilities_follow_similarities(client: TestClient) -> None:
    """softmax(logit_scale * cosine): the ratio of two probabilities is exp(scale * similarity gap)."""
    predictions = classify(client, png_bytes()).json()["predictions"]
    scale = client.app.state.runtime.encoder.logit_scale
    first, second = predictions[0], predictions[1]
    assert first["probability"] / second["probability"] == pytest.approx(
        np.exp(scale * (first["similarity"] - second["similarity"])), rel=1e-3)


def test_top_k_and_query_parameters(client: TestClient) -> None:
    assert len(classify(client, png_bytes(), top_k="3").json()["predictions"]) == 3
    assert len(classify(client, png_bytes(), top_k="99").json()["predictions"]) == N_CLASSES
    by_query = client.post("/classify?label_set=breast-ultrasound&top_k=1", files={"file": ("a", png_bytes())})
    assert by_query.status_code == 200 and by_query.json()["label_set"] == "breast-ultrasound"
    assert len(by_query.json()["predictions"]) == 1
    assert classify(client, png_bytes(), top_k="0").status_code == 422


def test_same_image_same_answer_in_any_container(client: TestClient) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (96, 96), dtype=np.uint8)
    as_png = io.BytesIO()
    Image.fromarray(pixels).save(as_png, "PNG")
    as_dicom = make_dicom_bytes(pixels=pixels, rows=96, columns=96)
    png_answer = classify(client, as_png.getvalue()).json()["predictions"]
    dicom_answer = classify(client, as_dicom).json()["predictions"]
    assert [p["label"] for p in png_answer] == [p["label"] for p in dicom_answer]
    for a, b in zip(png_answer, dicom_answer):
        assert a["similarity"] == pytest.approx(b["similarity"], abs=1e-4)


def noise_png(side: int) -> bytes:
    """Random pixels barely compress: side*side*3 bytes on the wire."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A 20000x20000 greyscale PNG that compresses to ~400 kB of zeros: small on the wire, 400 MP decoded."""
    return png_header_bytes(width=20000, height=20000)


@pytest.mark.parametrize("data, status, code", [
    (b"", 422, "invalid_image"),
    (b"this is not an image at all" * 10, 422, "invalid_image"),
    (png_bytes()[:60], 422, "invalid_image"),
    (jpeg_bytes()[:200], 422, "invalid_image"),
    (b"GIF89a" + bytes(100), 415, "unsupported_media_type"),
    (b"%PDF-1.7\n" + bytes(100), 415, "unsupported_media_type"),
    (make_dicom_bytes(number_of_frames=3), 422, "unsupported_dicom"),
    (make_dicom_bytes(with_pixel_data=False), 422, "unsupported_dicom"),
])
def test_bad_input_is_a_clear_4xx(client: TestClient, data: bytes, status: int, code: str) -> None:
    response = classify(client, data)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, max_image_pixels=1_000_000)) as client:
        response = classify(client, bomb_png())
        assert response.status_code == 413 and response.json()["error"]["code"] == "image_too_large"
        big_dicom = make_dicom_bytes(rows=1200, columns=1000)
        assert classify(client, big_dicom).json()["error"]["code"] == "image_too_large"


def test_upload_over_the_limit_is_413(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, max_upload_bytes=20_000)) as client:
        noisy = noise_png(300)                             # ~270 kB: over the limit
        assert len(noisy) > 20_000
        response = classify(client, noisy)
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
        assert classify(client, png_bytes(width=32, height=32)).status_code == 200   # still serving


def test_a_body_over_the_limit_while_streaming_is_one_413_counted_once(tmp_path: Path) -> None:
    """No Content-Length (chunked): the limit stops the body as it arrives; the multipart parser's own failure
    (a 400) is replaced by the 413 and not counted besides it."""
    with running_app(tiny_settings(tmp_path, max_upload_bytes=10_000)) as client:
        boundary = "xyz"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label_set\"\r\n\r\n{LABEL_SET}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()

        def body():
            yield head
            for _ in range(200):
                yield bytes(32_768)
            yield f"\r\n--{boundary}--\r\n".encode()

        before = {code: metric(client, "medzero_errors_total", code=code) for code in ("payload_too_large", "http_400")}
        response = client.post("/classify", content=body(),
                               headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
        assert metric(client, "medzero_errors_total", code="payload_too_large") == before["payload_too_large"] + 1
        assert metric(client, "medzero_errors_total", code="http_400") == before["http_400"]


def test_no_permits_left_is_503_before_the_image_is_decoded(client: TestClient) -> None:
    admission = client.app.state.runtime.admission
    held = client.portal.call(admission.try_acquire, admission.max_images)      # every permit in flight
    try:
        decodes = metric(client, "medzero_stage_duration_seconds_count", stage="decode")
        single = classify(client, png_bytes())
        batch = client.post("/classify/batch", data={"label_set": LABEL_SET}, files=[("files", ("a", png_bytes()))])
        for refused in (single, batch):
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
            assert refused.headers["retry-after"] == "1"
            assert "MEDZERO_MAX_IN_FLIGHT_IMAGES" in refused.json()["error"]["message"]
        assert metric(client, "medzero_stage_duration_seconds_count", stage="decode") == decodes   # nothing decoded
    finally:
        client.portal.call(held.release)
    assert classify(client, png_bytes()).status_code == 200
    assert admission.images_in_flight == 0                                   # every request gave its permits back


def test_a_batch_larger_than_all_permits_is_413(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, max_in_flight_images=3)) as client:
        four = [("files", (f"{i}.png", png_bytes())) for i in range(4)]
        refused = client.post("/classify/batch", data={"label_set": LABEL_SET}, files=four)
        assert refused.status_code == 413 and "MEDZERO_MAX_IN_FLIGHT_IMAGES=3" in refused.json()["error"]["message"]
        assert client.post("/classify/batch", data={"label_set": LABEL_SET}, files=four[:3]).status_code == 200


def test_batch_bodies_are_bounded_before_they_are_read(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, max_concurrent_batch_bodies=2)) as client:
        admission = client.app.state.runtime.admission
        assert client.portal.call(admission.try_enter_batch_body) and client.portal.call(admission.try_enter_batch_body)
        try:
            files = [("files", ("a.png", png_bytes()))]
            refused = client.post("/classify/batch", data={"label_set": LABEL_SET}, files=files)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "MEDZERO_MAX_CONCURRENT_BATCH_BODIES" in refused.json()["error"]["message"]
            fit = client.post("/labels/chest-xray-pneumonia/kpl", files=files)
            assert fit.status_code == 503 and fit.json()["error"]["code"] == "overloaded"
            assert classify(client, png_bytes()).status_code == 200               # single images are not batch bodies
        finally:
            client.portal.call(admission.leave_batch_body)
            client.portal.call(admission.leave_batch_body)
        assert client.post("/classify/batch", data={"label_set": LABEL_SET}, files=files).status_code == 200


def test_concurrent_requests_share_encoder_forwards(client: TestClient) -> None:
    """Requests that arrive while the encoder is busy wait in its queue and go through in one forward."""
    batcher = client.app.state.runtime.batcher
    with encoder_thread_held(client) as release:
        count, single = (metric(client, "medzero_encoder_batch_size_count"),
                         metric(client, "medzero_encoder_batch_size_bucket", le="1.0"))
        with ThreadPoolExecutor(6) as pool:
            answers = [pool.submit(classify, client, png_bytes(width=40 + i, height=40)) for i in range(6)]
            deadline = time.monotonic() + 30
            while batcher.pending_images < 6:
                assert time.monotonic() < deadline, "the requests never reached the encoder queue"
                time.sleep(0.01)
            release.set()
            assert all(answer.result().status_code == 200 for answer in answers)
    forwards = metric(client, "medzero_encoder_batch_size_count") - count
    assert 1 <= forwards < 6                                                # fewer forwards than requests
    assert metric(client, "medzero_encoder_batch_size_bucket", le="1.0") - single < forwards   # one held > 1 image


def test_an_extreme_aspect_ratio_is_refused_before_the_resize(client: TestClient) -> None:
    strip = png_header_bytes(width=10, height=200_000)                      # 2 MP: under the pixel limit
    response = classify(client, strip)
    assert response.status_code == 422 and response.json()["error"]["code"] == "extreme_aspect_ratio"
    assert "MEDZERO_MAX_ASPECT_RATIO" in response.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


def test_unknown_label_set_and_method(client: TestClient) -> None:
    missing = client.post("/classify", data={"label_set": "nope"}, files={"file": ("a", png_bytes())})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "label_set_not_found"
    unknown = classify(client, png_bytes(), method="magic")
    assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "unknown_method"
    assert "zeroshot" in unknown.json()["error"]["message"]
    no_set = client.post("/classify", files={"file": ("a", png_bytes())})
    assert no_set.status_code == 422 and "label_set" in no_set.json()["error"]["message"]
    no_file = client.post("/classify", data={"label_set": LABEL_SET})
    assert no_file.status_code == 422 and "file" in no_file.json()["error"]["message"]


def test_batch_equals_single_and_isolates_bad_files(client: TestClient) -> None:
    images = [png_bytes(width=40 + 7 * i, height=50) for i in range(4)]
    files = [("files", (f"img{i}.png", data)) for i, data in enumerate(images)]
    files.insert(2, ("files", ("broken.png", images[0][:40])))
    response = client.post("/classify/batch", data={"label_set": LABEL_SET}, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["succeeded"] == 4 and body["failed"] == 1
    assert [r["filename"] for r in body["results"]] == ["img0.png", "img1.png", "broken.png", "img2.png", "img3.png"]
    assert body["results"][2]["error"]["code"] == "invalid_image" and body["results"][2]["result"] is None
    batch_answers = [r["result"]["predictions"] for r in body["results"] if r["result"]]
    for data, batch_answer in zip(images, batch_answers):
        single = classify(client, data).json()["predictions"]
        assert [p["label"] for p in single] == [p["label"] for p in batch_answer]
        for a, b in zip(single, batch_answer):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)


def test_batch_limits(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, max_batch_files=2, max_upload_bytes=30_000)) as client:
        three = [("files", (f"{i}.png", png_bytes(width=20, height=20))) for i in range(3)]
        assert client.post("/classify/batch", data={"label_set": LABEL_SET}, files=three).status_code == 413
        mixed = [("files", ("small.png", png_bytes(width=20, height=20))),
                 ("files", ("big.png", noise_png(300)))]
        body = client.post("/classify/batch", data={"label_set": LABEL_SET}, files=mixed).json()
        assert body["results"][0]["result"] and body["results"][1]["error"]["code"] == "payload_too_large"
        unknown = client.post("/classify/batch", data={"label_set": "nope"}, files=mixed[:1])
        assert unknown.status_code == 404


def test_real_images_and_dicoms(client: TestClient) -> None:
    data_dir = shared_data_dir()
    if data_dir is None:
        pytest.skip("../shared/data is not here")
    pngs = sorted((data_dir / "datasets").glob("*/*/*.png"))[::60]
    dicoms = sorted((data_dir / "dicom").glob("*.dcm"))
    for path in [*pngs, *dicoms]:
        response = classify(client, path.read_bytes())
        assert response.status_code == 200, f"{path.name}: {response.text}"
        assert len(response.json()["predictions"]) == N_CLASSES
