"""`pytest --long` runs the long versions of the reliability tests (`make reliability`); without it they run
their short versions, sized for `make test`."""

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="run the long versions of the reliability tests")


@pytest.fixture(scope="session")
def long_run(request: pytest.FixtureRequest) -> bool:
    """True under `make reliability`: tests scale their counts up from the `make test` sizes."""
    return bool(request.config.getoption("--long"))
