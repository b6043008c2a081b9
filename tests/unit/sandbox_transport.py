"""Test helpers: send the destination modules' requests to the sandbox app in-process."""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import urlsplit

from fastapi.testclient import TestClient

from leadsync.destinations.base import HttpRequest
from leadsync.destinations.http import HttpResponse


def sha(value: str) -> str:
    """The lowercase hex SHA-256 of a string."""
    return hashlib.sha256(value.encode()).hexdigest()


class TestClientTransport:
    """Duck-types :class:`leadsync.destinations.http.HttpClient` over a FastAPI TestClient, so
    that the real request builders and response parsers talk to the real emulator."""

    __test__ = False  # not a test class

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.sent: list[HttpRequest] = []

    def send(self, request: HttpRequest) -> HttpResponse:
        self.sent.append(request)
        headers = dict(request.headers)
        if request.auth is not None:
            headers.update(request.auth())
        parts = urlsplit(request.url)
        kwargs: dict[str, Any] = {"headers": headers, "params": request.params or None}
        if request.body is not None:
            kwargs["json"] = request.body
        resp = self.client.request(request.method, parts.path, **kwargs)
        return HttpResponse(resp.status_code, resp.text, dict(resp.headers))

    def close(self) -> None:
        pass
