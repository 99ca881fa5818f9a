"""The rendered container tree on disk: write it (Dockerfiles, requirements.in, locks) and say how it drifted.

Above ``render`` (text) and ``lock`` (resolution), so neither imports the other back.
"""

from __future__ import annotations

import os
from pathlib import Path

from portvlm.containers.lock import lock_inputs_digest, write_lock
from portvlm.containers.render import inputs_digest, rendered_files, requirements_in
from portvlm.containers.spec import OUT_DIR, image_specs
from portvlm.matrix.schema import Matrix


def render_all(matrix: Matrix, out: str | os.PathLike = OUT_DIR, *, lock: bool = True) -> list[Path]:
    """Write every image's Dockerfile + requirements.in under ``out`` and, with ``lock``, resolve its lock."""
    out = Path(out)
    written = []
    for rel, text in rendered_files(matrix).items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    if lock:
        for spec in image_specs(matrix):
            written.append(write_lock(spec, out / spec.slug))
    return written


def drift(matrix: Matrix, out: str | os.PathLike = OUT_DIR) -> list[str]:
    """Why the committed files under ``out`` differ from matrix.yaml (empty = in step)."""
    out = Path(out)
    reasons = []
    for rel, text in rendered_files(matrix).items():
        path = out / rel
        if not path.exists():
            reasons.append(f"{path}: missing")
        elif path.read_text() != text:
            reasons.append(f"{path}: differs from what matrix.yaml renders")
    for spec in image_specs(matrix):
        lock = out / spec.slug / "requirements.lock"
        want = inputs_digest(requirements_in(spec))
        got = lock_inputs_digest(lock.read_text()) if lock.exists() else None
        if got is None:
            reasons.append(f"{lock}: missing or has no inputs digest")
        elif got != want:
            reasons.append(f"{lock}: resolved from other inputs than requirements.in (re-lock it)")
    return reasons
