"""Exceptions portvlm raises on purpose; each names the problem and the fix."""

from __future__ import annotations


class PortvlmError(Exception):
    """Base class for every error portvlm raises deliberately."""


class UnsupportedError(PortvlmError):
    """The installed transformers version, model or arch is outside what portvlm supports.

    The message always names the supported range and what was found.
    """


class MatrixError(PortvlmError):
    """matrix.yaml is malformed. ``str(err)`` is the one-line ``PATH:LINE: problem; fix`` form."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class EnvironmentBuildError(PortvlmError):
    """A cell's environment (venv or container image) could not be built."""


class FP16OverflowError(PortvlmError, FloatingPointError):
    """An activation left fp16's range (|x| > 65504, or non-finite) under an fp16 policy.

    ``module``: the path of the first module whose output was not finite; ``peak``: its |output| recomputed in fp32
    (None when that was not finite either). The message says what to do: calibrate, or run in fp32.
    """

    def __init__(self, message: str, module: str | None = None, peak: float | None = None):
        super().__init__(message)
        self.module = module
        self.peak = peak
