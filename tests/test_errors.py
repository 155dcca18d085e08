"""Every MedzeroError reaches the client through the app's own handler chain as its status, its stable code and
the one JSON shape, with Retry-After on 503s, and is counted once in medzero_errors_total."""
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from app import errors
from app.main import create_app
from tests.conftest import tiny_settings


def all_error_classes() -> list[type[errors.MedzeroError]]:
    found, todo = [], [errors.MedzeroError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.fixture(scope="module")
def raising_client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    """The real app (middleware, handlers, metrics) with one extra route that raises what it is told to; the
    lifespan does not run, so no model is loaded."""
    app = create_app(tiny_settings(tmp_path_factory.mktemp("errors")))
    by_name = {cls.__name__: cls for cls in all_error_classes()}

    @app.get("/raise/{name}")
    def raise_it(name: str) -> None:
        raise by_name[name]("what went wrong")

    return TestClient(app, raise_server_exceptions=False)


def errors_counted(code: str) -> float:
    return REGISTRY.get_sample_value("medzero_errors_total", {"code": code}) or 0.0


@pytest.mark.parametrize("error_class", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_is_mapped(raising_client: TestClient, error_class: type[errors.MedzeroError]) -> None:
    before = errors_counted(error_class.code)
    response = raising_client.get(f"/raise/{error_class.__name__}")
    assert response.status_code == error_class.status_code
    assert response.json() == {"error": {"code": error_class.code, "message": "what went wrong"}}
    assert response.headers["content-type"] == "application/json"
    if error_class.status_code == 503:
        assert int(response.headers["retry-after"]) >= 1
    assert errors_counted(error_class.code) == before + 1


def test_an_unexpected_exception_is_a_generic_500_counted_once(tmp_path: Path) -> None:
    app = create_app(tiny_settings(tmp_path))

    @app.get("/boom")
    def boom() -> None:
        raise KeyError("patient 123")

    before = errors_counted("internal")
    response = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal"
    assert "patient" not in response.text
    assert errors_counted("internal") == before + 1


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in all_error_classes()]
    assert len(codes) == len(set(codes))
