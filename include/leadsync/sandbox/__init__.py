"""Local platform sandbox: loopback emulators of the ad platforms' conversion APIs.

Strict validation (a payload the sandbox accepts is one the platform would accept), dedup, a
store of accepted events and fault injection, for tests and the local demo. One module per
platform: Meta Conversions API (``meta.py``), TikTok Events API (``tiktok.py``), Google Data
Manager API (``google_datamanager.py``) and Google Ads API click-conversion upload
(``google_ads.py``), with the shared Google pieces in ``google_common.py``; LinkedIn
Conversions API (``linkedin.py``) and Snap Conversions API v3 (``snapchat.py``).

Typical use::

    from leadsync.sandbox import SandboxConfig, SandboxServer

    with SandboxServer(SandboxConfig()) as sandbox:
        ...  # point the Meta client at sandbox.url instead of https://graph.facebook.com
"""

from __future__ import annotations

from leadsync.sandbox.app import SandboxConfig, SandboxState, create_app
from leadsync.sandbox.server import SandboxServer, serve

__all__ = ["SandboxConfig", "SandboxServer", "SandboxState", "create_app", "serve"]
