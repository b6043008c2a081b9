"""What the Google emulators share: bearer-token auth and the ``google.rpc.Status`` envelope.

No OAuth is emulated: the connection carries a static token from
:attr:`SandboxConfig.google_tokens` and the emulators check ``Authorization: Bearer``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from leadsync.sandbox.app import SandboxState

HTTP_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class RpcError(Exception):
    """An error answered as ``{"error": {"code", "message", "status", "details"}}``."""

    def __init__(self, http_status: int, message: str, *, status: str | None = None,
                 details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message
        self.status = status or HTTP_STATUS_NAMES.get(http_status, "UNKNOWN")
        self.details = details or []

    def body(self) -> dict[str, Any]:
        """The error envelope."""
        error: dict[str, Any] = {"code": self.http_status, "message": self.message,
                                 "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}

    def response(self) -> JSONResponse:
        """The HTTP response."""
        return JSONResponse(self.body(), status_code=self.http_status)


def new_request_id() -> str:
    """A random request id."""
    return uuid.uuid4().hex


def bearer_token(request: Request) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_token(request: Request, state: SandboxState) -> bool:
    """Whether the request carries a token the sandbox accepts."""
    token = bearer_token(request)
    return token is not None and token in state.config.google_tokens


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or an INVALID_ARGUMENT error like Google's."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else None
    except ValueError:
        raise RpcError(400, "Invalid JSON payload received. Unexpected token.") from None
    if not isinstance(body, dict):
        raise RpcError(400, "Invalid JSON payload received. Expected an object.")
    return body


def unknown_field(name: str, where: str) -> RpcError:
    """Google's answer to a JSON field its proto does not have (the whole request fails)."""
    at = f" at '{where}'" if where else ""
    return RpcError(400, f'Invalid JSON payload received. Unknown name "{name}"{at}: Cannot '
                    "find field.", details=[{
                        "@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": f"{where}.{name}" if where else name,
                                             "description": f'Invalid JSON payload received. '
                                                            f'Unknown name "{name}"{at}: '
                                                            "Cannot find field."}],
                    }])
