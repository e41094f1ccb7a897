"""One real hub for every bad-input module (the fixtures of tests/integration)."""

from tests.integration.conftest import hub_factory, pytest_runtest_makereport, real_hub  # noqa: F401
