"""`pytest --long` runs the long versions of the reliability tests (`make reliability`); without it they run
their short versions, sized for `make test`. One server of the embedded model serves the whole session as the
reference that parallel layouts are compared with."""

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="run the long versions of the reliability tests")


@pytest.fixture(scope="session")
def long_run(request: pytest.FixtureRequest) -> bool:
    """True under `make reliability`: tests scale their counts up from the `make test` sizes."""
    return bool(request.config.getoption("--long"))


@pytest.fixture(scope="session")
def embedded_server():
    """`gridserve serve` of the embedded model with default flags, shared by the tests that only read reference
    completions from it (TP, PP, DP and multi-node layouts against one process): one start instead of four, each
    ~5 s on CI's two cores. Nothing may stop or reconfigure it."""
    from tests.server_utils import ServerProcess

    server = ServerProcess()
    yield server
    server.stop()
