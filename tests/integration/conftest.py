"""Every test under tests/integration/ is marked `integration`, without a line in its module.

Integration tests run real processes and whole commands: notebooks, kill -9 and
resume, two-worker clusters, export round trips, "the model learns", memory and
streaming measurements. `make test` runs them with everything else; `make quick`
(`-m "not integration and not slow"`) leaves them out of the developers' loop.
"""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)
