"""The chaos suite's long mode is opt-in: tests marked ``chaos`` run only
when the marker expression names them (``pytest -m chaos``)."""

import pytest


def pytest_collection_modifyitems(config, items):
    if "chaos" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="long chaos run: pytest -m chaos (or shrimpio chaos)")
    for item in items:
        if item.get_closest_marker("chaos"):
            item.add_marker(skip)
