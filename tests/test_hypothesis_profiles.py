"""The hypothesis profiles of tests/conftest.py: derandomised in CI, exploring elsewhere (issue 15)."""

import os

from hypothesis import settings


def test_ci_profile_is_derandomised_and_reproducible() -> None:
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.database is None and ci.print_blob
    assert not settings.get_profile("dev").derandomize


def test_the_profile_follows_the_ci_variable() -> None:
    chosen = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
    assert settings.default.derandomize == settings.get_profile(chosen).derandomize
