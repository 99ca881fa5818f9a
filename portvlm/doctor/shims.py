"""Which declared shims (portvlm.shims.patch.SHIMS) would apply to a family on the installed transformers."""

from __future__ import annotations

from portvlm.doctor.collect import EnvInfo
from portvlm.doctor.report import Shim
from portvlm.shims.versions import parse_or_none


def shims_for(info: EnvInfo, family: str) -> tuple[Shim, ...]:
    """The declared shims (``portvlm.shims.patch.SHIMS``) that would apply to ``family`` on the installed version.

    Predicted from each declaration's range, ``present`` range and ``families`` (its probe needs a built model).
    """
    v = parse_or_none(info.transformers.version)
    if v is None:
        return ()
    from portvlm.shims.patch import SHIMS

    return tuple(Shim(s.name, str(s.answers), "declared", s.label_for(v))
                 for s in SHIMS if not s.prediction_reasons(family, v))
