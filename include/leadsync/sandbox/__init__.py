"""Local platform sandbox: loopback emulators of the ad platforms' conversion APIs.

Strict validation (a payload the sandbox accepts is one the platform would accept), dedup, a
store of accepted events and fault injection, for tests and the local demo. Meta's Conversions
API today (``meta.py``); TikTok and Google will be sibling modules.

Typical use::

    from leadsync.sandbox import SandboxConfig, SandboxServer

    with SandboxServer(SandboxConfig()) as sandbox:
        ...  # point the Meta client at sandbox.url instead of https://graph.facebook.com
"""

from __future__ import annotations

from leadsync.sandbox.app import SandboxConfig, SandboxState, create_app
from leadsync.sandbox.server import SandboxServer, serve

__all__ = ["SandboxConfig", "SandboxServer", "SandboxState", "create_app", "serve"]
