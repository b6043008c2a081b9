"""Match-key coverage: which identifiers the events a run stages carry (names, never values).

Each platform names its fields its own way (Meta ``em``, TikTok ``email``, Data Manager
``emailAddress``, Google Ads ``hashedEmail``); coverage reports them under one name, so the
Conversions page and alerts compare platforms with the same words.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

# Platform field -> the identifier it carries (fields not listed keep their own name).
_NAMES = {
    "em": "email", "emailAddress": "email", "hashedEmail": "email",
    "ph": "phone", "phoneNumber": "phone", "hashedPhoneNumber": "phone",
    "fn": "first_name", "ln": "last_name", "ct": "city", "st": "state", "zp": "zip",
    "db": "date_of_birth", "ge": "gender", "client_ip_address": "ip",
    "client_user_agent": "user_agent", "addressInfo": "address",
    "SHA256_EMAIL": "email", "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID": "li_fat_id",
    "phone_number": "phone", "ip_address": "ip",
}
_CLICK_IDS = ("gclid", "gbraid", "wbraid")


def _listed(identifiers: Iterable[Mapping[str, Any]]) -> set[str]:
    return {key for item in identifiers for key in item}


def event_keys(destination_type: str, body: Mapping[str, Any]) -> set[str]:
    """The identifier names an event body carries, in the platform's own words."""
    if destination_type in ("meta", "snapchat", "pinterest"):
        return set(body.get("user_data", {}))
    if destination_type == "reddit":
        return set(body.get("user", {})) | ({"click_id"} if "click_id" in body else set())
    if destination_type == "linkedin":
        user = body.get("user", {})
        keys = {str(item.get("idType")) for item in user.get("userIds", [])}
        return keys | ({"user_info"} if user.get("userInfo") else set())
    if destination_type == "tiktok":
        keys = set(body.get("user", {}))
        if "lead_id" in body.get("lead", {}):
            keys.add("lead_id")
        return keys
    if destination_type == "google_datamanager":
        keys = _listed(body.get("userData", {}).get("userIdentifiers", []))
        return keys | set(body.get("adIdentifiers", {})) & set(_CLICK_IDS)
    if destination_type == "google_ads":
        keys = _listed(body.get("userIdentifiers", []))
        return keys | {k for k in _CLICK_IDS if k in body}
    return set()


class Coverage:
    """Counts, over the events of one stage, how many carry each identifier."""

    def __init__(self, destination_type: str) -> None:
        self.destination_type = destination_type
        self.events = 0
        self.keys: Counter[str] = Counter()
        self._names: dict[frozenset[str], frozenset[str]] = {}  # a few combinations recur
        # Platforms whose identifiers are the keys of one object: read them without a set.
        self._flat = destination_type in ("meta", "snapchat", "pinterest")

    def names(self, body: Mapping[str, Any]) -> frozenset[str]:
        """The identifier names an event body carries, in common words."""
        if self._flat:
            keys = frozenset(body.get("user_data", ()))  # event_keys, without its set
        else:
            keys = frozenset(event_keys(self.destination_type, body))
        names = self._names.get(keys)
        if names is None:
            names = self._names[keys] = frozenset(_NAMES.get(k, k) for k in keys)
        return names

    def add(self, body: Mapping[str, Any]) -> None:
        """Counts one staged event from its body."""
        self.add_keys(self.names(body))

    def add_keys(self, names: Iterable[str]) -> None:
        """Counts one staged event from its identifier names (see :meth:`names`)."""
        self.events += 1
        self.keys.update(names)
