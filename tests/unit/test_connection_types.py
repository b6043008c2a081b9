"""Every destination type has a connection type with its own form (provider info)."""

from __future__ import annotations

from importlib import import_module

from leadsync.destinations import all_types
from leadsync.hooks.connections import CONNECTION_TYPES, HOOK_CLASSES, get_provider_info


def test_every_destination_type_has_a_connection_form_and_hook() -> None:
    assert set(CONNECTION_TYPES) == set(all_types()) == set(HOOK_CLASSES)
    info = get_provider_info()
    listed = {entry["connection-type"] for entry in info["connection-types"]}
    assert listed == {f"leadsync_{kind}" for kind in all_types()}
    hooks = import_module("leadsync.hooks")
    for kind, name in HOOK_CLASSES.items():
        hook = getattr(hooks, name)
        assert hook.conn_type == f"leadsync_{kind}"
        assert hook.destination_type_name == kind


def test_test_mode_credentials_are_the_harmless_ones() -> None:
    from leadsync.destinations.pinterest import PinterestCredentials
    from leadsync.destinations.reddit import RedditCredentials
    from leadsync.hooks.connections import harmless_credentials

    live_pin = PinterestCredentials("https://x", "t", "123")
    assert harmless_credentials("pinterest", live_pin) is None
    test_pin = PinterestCredentials("https://x", "t", "123", test=True)
    assert harmless_credentials("pinterest", test_pin) is test_pin
    assert harmless_credentials("reddit", RedditCredentials("https://x", "t", "p")) is None
    test_reddit = RedditCredentials("https://x", "t", "p", test_id="abc")
    assert harmless_credentials("reddit", test_reddit) is test_reddit
