"""Every MedzeroError maps to its status, its stable code and the one JSON shape."""
import asyncio
import json

import pytest

from app import errors
from app.main import medzero_error_response


def all_error_classes() -> list[type[errors.MedzeroError]]:
    found, todo = [], [errors.MedzeroError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("error_class", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_is_mapped(error_class: type[errors.MedzeroError]) -> None:
    response = asyncio.run(medzero_error_response(None, error_class("what went wrong")))
    assert response.status_code == error_class.status_code
    assert json.loads(response.body) == {"error": {"code": error_class.code, "message": "what went wrong"}}
    if error_class.status_code == 503:
        assert int(response.headers["retry-after"]) >= 1


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in all_error_classes()]
    assert len(codes) == len(set(codes))
