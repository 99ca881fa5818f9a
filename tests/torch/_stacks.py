"""Which CI CPU stacks run a test (CI minutes: every torch test runs once per CI stack, matrix.yaml's ``ci``).

A test whose claim does not depend on the transformers version (torch's harness, gloo, portvlm's own collectives or
scaler logic) runs on the newest CI stack only; one whose claim is portvlm's logic on top of a per-stack path that
cheaper tests already cover on every stack runs on the two ends of the CI range. Say which claim, in ``why``.
"""

from __future__ import annotations

import pytest
import transformers

from portvlm.policy import packaged_matrix
from portvlm.versions import parse

_CI = sorted((s.transformers for s in packaged_matrix().ci_cpu_stacks()), key=parse)
NEWEST, OLDEST = _CI[-1], _CI[0]
HERE = transformers.__version__


def newest_only(why: str) -> pytest.MarkDecorator:
    """Skip unless this is the newest CI stack; ``why`` says why the claim is transformers-independent."""
    return pytest.mark.skipif(HERE != NEWEST, reason=f"{why}: run on the newest CI stack (transformers {NEWEST}) only")


def ends_only(why: str) -> pytest.MarkDecorator:
    """Skip unless this is the oldest or the newest CI stack; ``why`` says what covers the stacks between."""
    return pytest.mark.skipif(HERE not in (OLDEST, NEWEST),
                              reason=f"{why}: run on the oldest and newest CI stacks ({OLDEST}, {NEWEST}) only")
