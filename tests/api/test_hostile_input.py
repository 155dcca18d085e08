"""Hostile and bad input over HTTP, against the real app (tiny random-init model, real SQLite, auth off).

Every answer is a success or a 4xx JSON refusal shaped {"error": {"code", "message"}} (app/main.py's one
mapping), never a 5xx nor an exception escaping the app (TestClient re-raises those): drawn bytes and content
types on /classify and /classify/batch, malformed multipart bodies, wrong content types, label sets past every
limit of app/domain.py, Unicode edge cases (NUL, lone surrogates, RTL override, combining marks, emoji, ZWJ,
NFC/NFD), path traversal. Afterwards the server is healthy and GET /labels shows exactly what succeeded.

One app serves the whole module (building one per hypothesis example would cost a model load each); every
test reads /labels before and after and accounts for what it created.
"""
import json
import unicodedata
from collections.abc import Iterator
from urllib.parse import unquote

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.domain import LabelSetSpec
from app.errors import ExtremeAspectRatio, ImageTooLarge, InvalidImage, UnsupportedDicom, UnsupportedMediaType
from app.imaging.decode import ACCEPTED_FORMATS
from tests.conftest import running_app, tiny_settings
from tests.factories import jpeg_bytes, make_dicom_bytes, png_bytes
from tests.imaging.test_decode_properties import absurd_dicoms, mutated_seed

LABEL_SET = "breast-ultrasound"      # a built-in one
DECODER_CODES = {InvalidImage.code, UnsupportedMediaType.code, UnsupportedDicom.code, ImageTooLarge.code,
                 ExtremeAspectRatio.code}
PNG = png_bytes(width=32, height=32)
# One app per module, so no example pays for a model load: the fixture is module-scoped, not per example.
HTTP = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:pydicom"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with running_app(tiny_settings(tmp_path_factory.mktemp("hostile"))) as c:
        yield c


def label_names(client: TestClient) -> set[str]:
    listing = client.get("/labels")
    assert listing.status_code == 200
    return {label_set["name"] for label_set in listing.json()["data"]}


@pytest.fixture
def labels_unchanged_but(client: TestClient) -> Iterator[set[str]]:
    """Yields a set the test adds the names it created to; afterwards the server is healthy and /labels holds
    exactly what it held before plus those (nothing half-written, nothing lost)."""
    before = label_names(client)
    created: set[str] = set()
    yield created
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert label_names(client) == before | created


def assert_answered(response: httpx.Response) -> dict:
    """A success, or a 4xx refusal in the service's one error shape; returns the JSON body."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    if response.status_code >= 400:
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"code", "message"}, body
        assert isinstance(body["error"]["code"], str) and body["error"]["code"]
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def assert_refused(response: httpx.Response, status: int, code: str | None = None) -> dict:
    body = assert_answered(response)
    assert response.status_code == status, f"{response.status_code}: {response.text[:500]}"
    if code is not None:
        assert body["error"]["code"] == code, body
    return body


# --- /classify and /classify/batch with drawn bytes ---------------------------------------------------------

CONTENT_TYPES = st.sampled_from(["image/png", "image/jpeg", "application/dicom", "application/octet-stream",
                                 "text/plain", "multipart/mixed; boundary=x", "image/png; charset=utf-99", "",
                                 "application/json", "*/*", "image/gif"])
# None or "": the part is a form field, not a file (as browsers send an empty file input). httpx itself refuses
# control characters in a filename; the raw multipart cases below send those.
FILENAMES = st.one_of(st.none(), st.sampled_from(["a.png", "../../etc/passwd", "a\\b.dcm", "", "x" * 300, "é.jpg",
                                                  "\u202egnp.exe", '"quoted".png', "a;name=label_set", "%00.png"]))
UPLOADS = st.one_of(st.binary(max_size=2048), mutated_seed(), absurd_dicoms(),
                    st.sampled_from([PNG, jpeg_bytes(), make_dicom_bytes()]))


def check_classified(result: dict) -> None:
    assert result["label_set"] == LABEL_SET and result["method"] == "zeroshot"
    assert result["input_format"] in ACCEPTED_FORMATS
    probabilities = [p["probability"] for p in result["predictions"]]
    assert len(probabilities) == 3 and abs(sum(probabilities) - 1) < 1e-3


@HTTP
@given(data=UPLOADS, content_type=CONTENT_TYPES, filename=FILENAMES)
def test_classify_answers_every_upload(client: TestClient, labels_unchanged_but: set[str], data: bytes,
                                       content_type: str, filename: str | None) -> None:
    response = client.post("/classify", data={"label_set": LABEL_SET},
                           files={"file": (filename, data, content_type)})
    body = assert_answered(response)
    if not filename:
        assert response.status_code == 422 and body["error"]["code"] == "validation_error", body
    elif response.status_code == 200:
        check_classified(body)
    else:   # the label set and method are fine: only the bytes can be refused, and only by the decoder
        assert body["error"]["code"] in DECODER_CODES, body


@HTTP
@given(uploads=st.lists(st.tuples(UPLOADS, CONTENT_TYPES, FILENAMES), min_size=1, max_size=4))
def test_classify_batch_answers_every_file(client: TestClient, labels_unchanged_but: set[str],
                                           uploads: list[tuple[bytes, str, str | None]]) -> None:
    files = [("files", (filename, data, content_type)) for data, content_type, filename in uploads]
    response = client.post("/classify/batch", data={"label_set": LABEL_SET}, files=files)
    body = assert_answered(response)
    if not all(filename for _, _, filename in uploads):   # a part that is a field, not a file: the whole request
        assert response.status_code == 422 and body["error"]["code"] == "validation_error", body
        return
    assert response.status_code == 200, body
    assert len(body["results"]) == len(uploads)
    assert body["succeeded"] + body["failed"] == len(uploads)
    for item in body["results"]:
        assert (item["result"] is None) != (item["error"] is None), item
        if item["result"] is not None:
            check_classified(item["result"])
        else:
            assert item["error"]["code"] in DECODER_CODES, item


FORM_TEXT = st.one_of(st.text(max_size=40), st.sampled_from(
    ["a\x00b", "\x00", LABEL_SET + "\x00", "x" * 10_000, "../breast-ultrasound", "breast-ultrasound/", " ",
     "BREAST-ULTRASOUND", "breast-ultrasound\n", "1e999", "-1", "0", "nan", "inf", "true", "[]", "{}", "kpl",
     "zeroshot\x00"]))


@HTTP
@given(fields=st.dictionaries(st.sampled_from(["label_set", "method", "top_k", "transductive", "abstain_threshold",
                                               "cache_alpha", "cache_beta", "cache_base", "class_prior"]),
                              FORM_TEXT, max_size=4),
       query=st.dictionaries(st.sampled_from(["label_set", "method", "top_k", "abstain_threshold"]), FORM_TEXT,
                             max_size=2))
def test_classify_answers_every_form_field(client: TestClient, labels_unchanged_but: set[str],
                                           fields: dict[str, str], query: dict[str, str]) -> None:
    response = client.post("/classify", data=fields, params=query, files={"file": ("a.png", PNG, "image/png")})
    body = assert_answered(response)
    label_set = fields.get("label_set") or query.get("label_set")
    if label_set is not None and "\x00" in label_set:
        assert response.status_code == 422, body   # refused before the store: PostgreSQL would fail on the NUL
    if response.status_code == 200:
        assert body["label_set"] == label_set


@pytest.mark.parametrize("label_set", ["a\x00b", "\x00", "x" * 10_000, "../breast-ultrasound", "Breast-Ultrasound",
                                       "breast-ultrasound\n", "breast\u2011ultrasound", "ｂｒｅａｓｔ"])
def test_classify_refuses_what_cannot_be_a_label_set_name(client: TestClient, labels_unchanged_but: set[str],
                                                          label_set: str) -> None:
    """422 before any lookup; the message does not echo 10,000 characters back."""
    for path, files in (("/classify", {"file": ("a.png", PNG)}), ("/classify/batch", [("files", ("a.png", PNG))])):
        body = assert_refused(client.post(path, data={"label_set": label_set}, files=files), 422, "invalid_input")
        assert len(body["error"]["message"]) < 400
    assert_refused(client.post("/classify", params={"label_set": label_set}, files={"file": ("a.png", PNG)}), 422)


def test_classify_still_finds_a_valid_label_set(client: TestClient, labels_unchanged_but: set[str]) -> None:
    ok = client.post("/classify", data={"label_set": LABEL_SET}, files={"file": ("a.png", PNG)})
    check_classified(assert_answered(ok))
    assert_refused(client.post("/classify", data={"label_set": "no-such-set"}, files={"file": ("a.png", PNG)}), 404,
                   "label_set_not_found")


# --- malformed multipart bodies -----------------------------------------------------------------------------


def multipart(parts: list[tuple[list[bytes], bytes]], boundary: bytes = b"b0undary", *, close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + content + b"\r\n"
                    for headers, content in parts)
    return body + (b"--" + boundary + b"--\r\n" if close else b"")


def field(name: bytes, value: bytes) -> tuple[list[bytes], bytes]:
    return [b'Content-Disposition: form-data; name="' + name + b'"'], value


def file_part(name: bytes = b"file", content: bytes = PNG, *extra: bytes,
              content_type: bytes = b"image/png") -> tuple[list[bytes], bytes]:
    return [b'Content-Disposition: form-data; name="' + name + b'"; filename="a.png"',
            b"Content-Type: " + content_type, *extra], content


def form_type(boundary: bytes = b"b0undary") -> dict[str, str]:
    return {"content-type": "multipart/form-data; boundary=" + boundary.decode("latin-1")}


LS = field(b"label_set", LABEL_SET.encode())
NESTED = multipart([file_part()], b"inner")
MALFORMED_BODIES = {
    # name: (path, body, headers, expected status or None for "any 4xx")
    "nested multipart/mixed as the file": (
        "/classify", multipart([LS, file_part(b"file", NESTED, content_type=b"multipart/mixed; boundary=inner")]),
        form_type(), 422),
    "nested multipart/form-data, three deep": (
        "/classify", multipart([LS, file_part(b"file", multipart([file_part(b"x", NESTED)], b"mid"),
                                              content_type=b"multipart/form-data; boundary=mid")]), form_type(), 422),
    "missing boundary": ("/classify", multipart([LS, file_part()]), {"content-type": "multipart/form-data"}, 400),
    "empty boundary": ("/classify", multipart([LS, file_part()], b""), {"content-type": "multipart/form-data; "
                                                                        "boundary="}, None),
    "boundary not in body": ("/classify", multipart([LS, file_part()]), form_type(b"other"), None),
    "boundary of 200 characters": ("/classify", multipart([LS, file_part()], b"x" * 200), form_type(b"x" * 200), 200),
    "boundary of 5000 characters": ("/classify", multipart([LS, file_part()], b"y" * 5000), form_type(b"y" * 5000),
                                    None),
    "quoted boundary with spaces": ("/classify", multipart([LS, file_part()], b"a b'c"),
                                    {"content-type": 'multipart/form-data; boundary="a b\'c"'}, None),
    "unterminated body": ("/classify", multipart([LS, file_part()], close=False), form_type(), None),
    "only the closing boundary": ("/classify", b"--b0undary--\r\n", form_type(), 422),
    "garbage body": ("/classify", bytes(range(256)) * 8, form_type(), None),
    "empty body": ("/classify", b"", form_type(), 422),
    "part without a name": ("/classify", multipart([LS, ([b'Content-Disposition: form-data; filename="a.png"'], PNG),
                                                    file_part()]), form_type(), 400),
    "part without Content-Disposition": ("/classify", multipart([LS, ([b"Content-Type: image/png"], PNG),
                                                                 file_part()]), form_type(), 400),
    "header line of 64 KB": ("/classify", multipart([LS, file_part(b"file", PNG, b"X-Junk: " + b"a" * 65536)]),
                             form_type(), 400),
    "header line of 1 MB": ("/classify", multipart([LS, file_part(b"file", PNG, b"X-Junk: " + b"a" * 2**20)]),
                            form_type(), None),
    "20000 header lines": ("/classify", multipart([LS, file_part(b"file", PNG, *[b"X-%d: a" % i
                                                                                 for i in range(20000)])]),
                           form_type(), 400),
    "header without colon": ("/classify", multipart([LS, file_part(b"file", PNG, b"no colon here")]), form_type(),
                             None),
    "3000 form fields": ("/classify", multipart([LS, *[field(b"f%d" % i, b"x") for i in range(3000)], file_part()]),
                         form_type(), 400),
    "3000 files in a batch": ("/classify/batch", multipart([LS, *[file_part(b"files") for _ in range(3000)]]),
                              form_type(), 400),
    "65 files in a batch (MEDZERO_MAX_BATCH_FILES=64)": (
        "/classify/batch", multipart([LS, *[file_part(b"files") for _ in range(65)]]), form_type(), 413),
    "the file sent as a text field": ("/classify", multipart([LS, field(b"file", b"just text")]), form_type(), 422),
    "two label_set fields": ("/classify", multipart([LS, field(b"label_set", b"a\x00"), file_part()]), form_type(),
                             None),
    "label_set that is not UTF-8": ("/classify", multipart([field(b"label_set", b"\xff\xfe"), file_part()]),
                                    form_type(), 422),
    "field name that is not UTF-8": ("/classify", multipart([LS, field(b"\xff", b"x"), file_part()]), form_type(),
                                     None),
    "filename with NUL and traversal": (
        "/classify", multipart([LS, ([b'Content-Disposition: form-data; name="file"; filename="../\x00/etc/passwd"'],
                                     PNG)]), form_type(), 200),
    "filename* in RFC 2231 form": (
        "/classify", multipart([LS, ([b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''%ff%fe.png"],
                                     PNG)]), form_type(), None),
    "part Content-Transfer-Encoding base64": (
        "/classify", multipart([LS, file_part(b"file", b"iVBORw0KGgo=", b"Content-Transfer-Encoding: base64")]),
        form_type(), None),
    "charset parameter nobody knows": ("/classify", multipart([LS, file_part()]),
                                       {"content-type": "multipart/form-data; boundary=b0undary; charset=utf-99"},
                                       None),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_BODIES))
def test_malformed_multipart_is_answered(client: TestClient, labels_unchanged_but: set[str], case: str) -> None:
    path, body, headers, expected = MALFORMED_BODIES[case]
    response = client.post(path, content=body, headers=headers)
    assert_answered(response)
    if expected is None:
        assert response.status_code < 500
    else:
        assert response.status_code == expected, response.text[:300]


MULTIPART_HEADERS = st.sampled_from([
    b'Content-Disposition: form-data; name="file"; filename="a.png"', b'Content-Disposition: form-data; name="files"',
    b'Content-Disposition: form-data; name="label_set"', b"Content-Disposition: form-data", b"Content-Disposition: ;;;",
    b'Content-Disposition: form-data; name="file"; filename=', b"Content-Type: image/png",
    b"Content-Type: multipart/mixed; boundary=b0undary", b"Content-Length: 99999999999", b"X: " + b"a" * 1000,
    b"\x00\x00", b":", b"Content-Disposition: form-data; name=\"\xff\"",
])


@HTTP
@given(parts=st.lists(st.tuples(st.lists(MULTIPART_HEADERS, max_size=3),
                                st.one_of(st.binary(max_size=256), st.just(PNG), st.just(LABEL_SET.encode()))),
                      max_size=6),
       boundary=st.sampled_from([b"b0undary", b"x" * 70, b"--", b"a\r\nb", b"\x00"]),
       declared=st.sampled_from(["b0undary", "x" * 70, "--", "", "a\r\nb"]),
       close=st.booleans(), path=st.sampled_from(["/classify", "/classify/batch"]))
def test_drawn_multipart_bodies_are_answered(client: TestClient, labels_unchanged_but: set[str],
                                             parts: list[tuple[list[bytes], bytes]], boundary: bytes, declared: str,
                                             close: bool, path: str) -> None:
    body = multipart([LS, *parts], boundary, close=close)
    content_type = "multipart/form-data; boundary=" + declared
    if "\r" in declared:    # httpx refuses to send such a header; the server never sees it
        content_type = "multipart/form-data; boundary=" + declared.replace("\r\n", "")
    assert_answered(client.post(path, content=body, headers={"content-type": content_type}))


# --- wrong content types ------------------------------------------------------------------------------------

LABEL_BODY = {"name": "hostile-ok", "modality": "chest-xray", "classes": [{"name": "normal"}, {"name": "abnormal"}]}
WRONG_TYPES = [
    ("/classify", json.dumps({"label_set": LABEL_SET, "file": "aGVsbG8="}).encode(), "application/json", 422),
    ("/classify", b"hello", "text/plain", 422),
    ("/classify", b"label_set=breast-ultrasound&file=abc", "application/x-www-form-urlencoded", 422),
    ("/classify", PNG, "image/png", 422),
    ("/classify/batch", PNG, "application/octet-stream", 422),
    ("/labels", b"name=hostile-ok&modality=chest-xray", "application/x-www-form-urlencoded", 422),
    ("/labels", multipart([field(b"name", b"hostile-ok")]), "multipart/form-data; boundary=b0undary", 422),
    ("/labels", json.dumps(LABEL_BODY).encode(), "text/plain", 422),
    ("/labels", json.dumps(LABEL_BODY).encode(), "application/xml", 422),
    ("/labels", b"<labelset name='hostile-ok'/>", "application/xml", 422),
    ("/labels", b"\xff\xfe{}", "application/json", 422),
    ("/labels", b"\xc3\x28{}", "application/json", 400),
    ("/labels", b"[" * 100_000 + b"]" * 100_000, "application/json", 400),
    ("/labels", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "application/json", 400),
    ("/labels", b"", "application/json", 422),
    ("/labels", b"null", "application/json", 422),
    ("/labels", b"[]", "application/json", 422),
    ("/labels", json.dumps({**LABEL_BODY, "abstain_threshold": "NaN"}).encode(), "application/json", 422),
    ("/labels", json.dumps(LABEL_BODY)[:-1].encode() + b', "abstain_threshold": NaN}', "application/json", 422),
    ("/labels", json.dumps(LABEL_BODY)[:-1].encode() + b', "abstain_threshold": ' + b"9" * 5000 + b"}",
     "application/json", 400),
    ("/labels", json.dumps({**LABEL_BODY, "extra": 1}).encode(), "application/json", 422),
    ("/labels", b"x" * (2 << 20), "application/json", 413),
]


@pytest.mark.parametrize(("path", "body", "content_type", "expected"), WRONG_TYPES,
                         ids=[f"{path}-{content_type or 'none'}-{i}" for i, (path, _, content_type, _) in
                              enumerate(WRONG_TYPES)])
def test_wrong_content_types_are_refused(client: TestClient, labels_unchanged_but: set[str], path: str, body: bytes,
                                         content_type: str, expected: int) -> None:
    assert_refused(client.post(path, content=body, headers={"content-type": content_type}), expected)


def test_label_set_json_without_content_type_is_refused(client: TestClient, labels_unchanged_but: set[str]) -> None:
    response = client.post("/labels", content=json.dumps(LABEL_BODY).encode(), headers={"content-type": ""})
    assert_refused(response, 422)


# --- label sets past every limit (app/domain.py) -------------------------------------------------------------


def label_set(name: str = "hostile-limits", **class_fields: object) -> dict:
    first = {"name": "normal", **class_fields}
    return {"name": name, "modality": "chest-xray", "classes": [first, {"name": "abnormal"}]}


def with_field(**fields: object) -> dict:
    return {**label_set(), **fields}


OVER_THE_LIMIT = {
    "name of 65 characters": label_set("a" * 65),
    "name of 10,000 characters": label_set("a" * 10_000),
    "modality of 65 characters": with_field(modality="m" * 65),
    "class name of 81 characters": {**label_set(), "classes": [{"name": "n" * 81}, {"name": "abnormal"}]},
    "class name of 10,000 characters": {**label_set(), "classes": [{"name": "n" * 10_000}, {"name": "b"}]},
    "display name of 301 characters": label_set(display_name="d" * 301),
    "synonym of 301 characters": label_set(synonyms=["s" * 301]),
    "synonym of 100,000 characters": label_set(synonyms=["s" * 100_000]),
    "33 synonyms": label_set(synonyms=[f"synonym {i}" for i in range(33)]),
    "prompt of 301 characters": label_set(prompts=["p" * 301]),
    "65 prompts": label_set(prompts=[f"prompt {i}" for i in range(65)]),
    "description of 301 characters": label_set(descriptions=["d" * 301]),
    "1001 descriptions": label_set(descriptions=[f"description {i}" for i in range(1001)]),
    "label-set description of 2001 characters": with_field(description="x" * 2001),
    "template of 301 characters": with_field(templates=["{}" + "t" * 299]),
    "65 templates": with_field(templates=[f"template {i}: {{}}" for i in range(65)]),
    "template without a slot": with_field(templates=["no slot"]),
    "template with two slots": with_field(templates=["{} and {}"]),
    "1001 classes": with_field(classes=[{"name": f"c{i}"} for i in range(1001)]),
    "one class": with_field(classes=[{"name": "only"}]),
    "repeated class names": with_field(classes=[{"name": "a"}, {"name": "a"}]),
    "a synonym of only spaces": label_set(synonyms=["   "]),
    "an empty prompt": label_set(prompts=[""]),
    "abstain threshold over 1": with_field(abstain_threshold=1.5),
    "a list where a string goes": label_set(display_name=["x"]),
    "an unknown class field": label_set(colour="red"),
}


@pytest.mark.parametrize("case", sorted(OVER_THE_LIMIT))
def test_label_sets_past_a_limit_are_422_and_never_stored(client: TestClient, labels_unchanged_but: set[str],
                                                          case: str) -> None:
    body = OVER_THE_LIMIT[case]
    assert_refused(client.post("/labels", json=body), 422, "validation_error")
    name = body["name"]
    if len(name) <= 64:     # the PUT of an existing label set is checked the same way
        assert_refused(client.put(f"/labels/{LABEL_SET}", json={**body, "name": LABEL_SET}), 422,
                       "validation_error")
    assert_refused(client.get(f"/labels/{name}"), 404, "label_set_not_found")


def test_a_label_set_name_of_10000_characters_is_never_stored(client: TestClient,
                                                              labels_unchanged_but: set[str]) -> None:
    name = "a" * 10_000
    assert_refused(client.put(f"/labels/{name}", json=label_set(name)), 422, "validation_error")
    assert_refused(client.put(f"/labels/{name}", json=label_set("hostile-other")), 422, "invalid_label_set")
    assert_refused(client.delete(f"/labels/{name}"), 404)
    assert all(len(n) <= 64 for n in label_names(client))


AT_THE_LIMIT = {
    "name of 64 characters": label_set("a" * 64),
    "class name of 80 characters": {**label_set("hostile-class-80"), "classes": [{"name": "N" * 80},
                                                                                 {"name": "abnormal"}]},
    "32 synonyms of 300 characters": label_set("hostile-synonyms", synonyms=[f"{i:03d}" + "s" * 297
                                                                             for i in range(32)]),
    "64 prompts": label_set("hostile-prompts", prompts=[f"prompt {i}" for i in range(64)]),
    "display name of 300 characters": label_set("hostile-display", display_name="d" * 300),
    "description of 2000 characters": {**label_set("hostile-description"), "description": "x" * 2000},
    "64 templates": {**label_set("hostile-templates"), "templates": [f"template {i}: {{}}" for i in range(64)]},
}


@pytest.mark.parametrize("case", sorted(AT_THE_LIMIT))
def test_label_sets_at_a_limit_are_stored_whole(client: TestClient, labels_unchanged_but: set[str],
                                                case: str) -> None:
    body = AT_THE_LIMIT[case]
    created = assert_refused(client.post("/labels", json=body), 201)
    labels_unchanged_but.add(body["name"])
    stored = assert_answered(client.get(f"/labels/{body['name']}"))
    assert stored == created
    for key in ("name", "description", "templates"):
        if key in body:
            assert stored[key] == body[key], key
    for sent, kept in zip(body["classes"], stored["classes"], strict=True):
        for key, value in sent.items():
            assert kept[key] == value, (key, kept[key])


def test_a_label_set_costing_too_many_text_encodings_is_refused_before_encoding(
        client: TestClient, labels_unchanged_but: set[str]) -> None:
    """10 classes x (1 name + 32 synonyms) x 64 templates = 21,120 encodings > MEDZERO_MAX_LABEL_SET_TEXTS=20,000."""
    body = {"name": "hostile-costly", "modality": "chest-xray", "templates": [f"t{i} {{}}" for i in range(64)],
            "classes": [{"name": f"c{c}", "synonyms": [f"c{c} s{i}" for i in range(32)]} for c in range(10)]}
    assert_refused(client.post("/labels", json=body), 422, "invalid_label_set")
    assert_refused(client.put(f"/labels/{LABEL_SET}", json={**body, "name": LABEL_SET}), 422, "invalid_label_set")


# --- Unicode edge cases ---------------------------------------------------------------------------------------

NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
UNICODE_EDGES = {
    "NUL": "a\x00b", "NUL alone": "\x00", "lone high surrogate": "a\ud800b", "lone low surrogate": "\udfff",
    "RTL override": "abc\u202edef", "combining acute": "e\u0301", "emoji": "x-ray \U0001f9b4",
    "ZWJ family": "\U0001f468\u200d\U0001f469\u200d\U0001f467", "zero-width space": "a\u200bb", "BOM": "\ufeffa",
    "NFC": NFC, "NFD": NFD, "noncharacter": "a\uffffb", "fullwidth": "ａｂｃ", "Turkish dotless": "ı",
    "Kelvin sign": "\u212a", "newline": "a\nb", "C1 control": "a\x85b",
}


def raw_json(body: dict) -> bytes:
    """JSON as a client would send it: ASCII with \\u escapes, so lone surrogates travel as "\\ud800"."""
    return json.dumps(body, ensure_ascii=True).encode()


def post_label_set(client: TestClient, body: dict) -> httpx.Response:
    return client.post("/labels", content=raw_json(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize("case", sorted(UNICODE_EDGES))
def test_unicode_in_names_is_refused(client: TestClient, labels_unchanged_but: set[str], case: str) -> None:
    """Label-set names are ASCII slugs and class names ASCII words, so NFC/NFD twins or look-alikes of an existing
    name cannot be registered as a second one."""
    text = UNICODE_EDGES[case]
    assert_refused(post_label_set(client, label_set(text)), 422)
    assert_refused(post_label_set(client, label_set(f"hostile{text}")), 422)
    assert_refused(post_label_set(client, {**label_set("hostile-class"), "classes": [{"name": text},
                                                                                     {"name": "b"}]}), 422)
    assert_refused(post_label_set(client, {**label_set("hostile-class"), "classes": [{"name": f"a{text}"},
                                                                                     {"name": "b"}]}), 422)


REFUSED_IN_TEXT = {"NUL", "NUL alone", "lone high surrogate", "lone low surrogate"}


@pytest.mark.parametrize("case", sorted(UNICODE_EDGES))
@pytest.mark.parametrize("where", ["display_name", "synonyms", "prompts", "descriptions", "description", "templates"])
def test_unicode_in_free_text(client: TestClient, labels_unchanged_but: set[str], case: str, where: str) -> None:
    """Free text takes any Unicode a JSON string carries, except NUL (PostgreSQL text cannot hold it) and lone
    surrogates (not encodable as UTF-8); what is kept is what was sent."""
    text = UNICODE_EDGES[case]
    name = f"hostile-text-{where}-{sorted(UNICODE_EDGES).index(case)}".replace("_", "-")
    values = {"display_name": f"x{text}", "synonyms": [f"x{text}"], "prompts": [f"x{text}"],
              "descriptions": [f"x{text}"], "description": f"x{text}", "templates": [f"x{text} {{}}"]}
    body = label_set(name, **{where: values[where]}) if where not in ("description", "templates") else {
        **label_set(name), where: values[where]}
    response = post_label_set(client, body)
    if case in REFUSED_IN_TEXT:
        refused = assert_refused(response, 422, "validation_error")
        assert where in refused["error"]["message"]
        return
    created = assert_refused(response, 201)
    labels_unchanged_but.add(name)
    kept = created[where] if where in ("description", "templates") else created["classes"][0][where]
    assert kept == values[where]
    assert client.get(f"/labels/{name}").json() == created


def test_nul_in_a_replacement_leaves_the_current_version(client: TestClient, labels_unchanged_but: set[str]) -> None:
    name = "hostile-replace"
    first = assert_refused(client.post("/labels", json=label_set(name, synonyms=["ok"])), 201)
    labels_unchanged_but.add(name)
    assert_refused(client.put(f"/labels/{name}", json=label_set(name, synonyms=["not\x00ok"])), 422,
                   "validation_error")
    assert_refused(client.put(f"/labels/{name}", content=raw_json(label_set(name, prompts=["\ud83d"])),
                              headers={"content-type": "application/json"}), 422)
    assert client.get(f"/labels/{name}").json() == first


FREE_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)


@settings(HTTP, max_examples=30)
@given(name=st.one_of(st.from_regex(r"\A[a-z0-9][a-z0-9_.-]{0,70}\Z"), st.text(max_size=70)),
       synonym=FREE_TEXT, prompt=FREE_TEXT)
def test_drawn_label_sets_are_stored_exactly_or_refused(client: TestClient, labels_unchanged_but: set[str],
                                                        name: str, synonym: str, prompt: str) -> None:
    """Stored (201, or 409 when the name is taken) exactly when app/domain.py's rules allow it, and then read back
    as sent (minus the documented strip); refused with 422 otherwise; never a 5xx."""
    before = label_names(client)
    body = label_set(name, synonyms=[synonym], prompts=[prompt])
    response = post_label_set(client, body)
    answer = assert_answered(response)
    try:   # the domain's own rules, plus: no NUL (PostgreSQL), no lone surrogate (not UTF-8)
        expected = LabelSetSpec.model_validate(body).classes[0]
        valid = not any("\x00" in t or _has_lone_surrogate(t) for t in (synonym, prompt))
    except ValueError:
        valid = False
    if not valid:
        assert response.status_code == 422, answer
        return
    if name in before:
        assert response.status_code == 409, answer
        return
    assert response.status_code == 201, answer
    labels_unchanged_but.add(name)
    stored = client.get(f"/labels/{name}").json()
    assert stored["classes"][0]["synonyms"] == expected.synonyms   # as validated (whitespace stripped), no more
    assert stored["classes"][0]["prompts"] == expected.prompts


def _has_lone_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


# --- path traversal ---------------------------------------------------------------------------------------------

TRAVERSALS = ["../x", "a/b", "..", ".", "../chest-xray-pneumonia", "..%2Fchest-xray-pneumonia", "%2e%2e",
              "a%2Fb", "a%00b", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "chest-xray-pneumonia%2F..", "~root", "a\\b",
              "C:\\x", "%252e%252e"]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_path_traversal_names_are_refused(client: TestClient, labels_unchanged_but: set[str], name: str) -> None:
    """As a body's name: 422, raw or percent-decoded. In the path (where httpx may resolve the dot segments
    first): whatever route it reaches, nothing is deleted or replaced, the built-in set least of all."""
    target = client.get("/labels/chest-xray-pneumonia").json()
    for body_name in {name, unquote(name), unquote(unquote(name))}:
        assert_refused(post_label_set(client, label_set(body_name)), 422)
    assert_answered(client.get(f"/labels/{name}"))
    deleted = client.delete(f"/labels/{name}")
    assert deleted.status_code != 204, f"DELETE /labels/{name} deleted something"
    assert_answered(deleted)
    replaced = client.put(f"/labels/{name}", json={**label_set("chest-xray-pneumonia"), "description": "hijacked"})
    assert replaced.status_code >= 400 and replaced.status_code < 500, replaced.text
    assert_answered(replaced)
    assert client.get("/labels/chest-xray-pneumonia").json() == target
