"""The real trainer libraries for the integration tests: imported, or the test is skipped saying why.

CI installs them (pyproject's ``integrations`` extra, ``portvlm.wheels.INTEGRATION_REQUIREMENTS``) into the newest CI
stack only and sets ``PORTVLM_REQUIRE_INTEGRATIONS=1`` there, so on that stack a missing library is a failure, never
a skip reported as a pass.
"""

from __future__ import annotations

import importlib
import os

import pytest

from portvlm.wheels import REQUIRE_INTEGRATIONS_ENV as REQUIRE


def need(module: str):
    """``import module``; where it is missing: a skip naming the extra, or a failure when ``REQUIRE`` is set."""
    if os.environ.get(REQUIRE):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'portvlm[integrations]'; CI "
                                              "runs these tests on the newest stack)")
