"""Fixtures shared by the reliability tests.

`keyed_servers`: one real engine (tiny random model, 4 slots, 256 context) and one gunicorn
front end with an API key, on free loopback ports, started once for the package and
shared by test_auth, test_malformed and test_schemathesis (a start-up costs ~20 s of the
2 CI cores; these tests do not disturb each other: every request ends by itself).
"""

import pytest

from tests.http_fixtures import start_servers


@pytest.fixture(scope="package")
def keyed_servers(tmp_path_factory):
    yield from start_servers(tmp_path_factory)
