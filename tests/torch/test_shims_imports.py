"""No portvlm file imports a `_private` name from transformers.models.*, a name a modeling file merely re-exports,
or the flash-attn package (peers broke on exactly these: VLM-R1, StreamingVLM, VLM-MLA; see research/peers.md)."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import portvlm

ROOT = Path(portvlm.__file__).parent
# Re-exported by modeling files in some versions, absent or None in others (breakpoints §6).
REEXPORTED = {
    "flash_attn_varlen_func",
    "flash_attn_func",
    "apply_rotary_pos_emb_flashatt",
    "_flash_attention_forward",
    "flash_attn_supports_top_left_mask",
    "is_flash_attn_greater_or_equal_2_10",
    "_flash_supports_window_size",
}


def _imports():
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    yield path, node.lineno, node.module, alias.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, node.lineno, alias.name, None


def _where(path, line):
    return f"{path.relative_to(ROOT.parent)}:{line}"


def test_scan_sees_the_package():
    assert any(p.name == "patch.py" for p, *_ in _imports())


def test_no_private_or_reexported_names_from_transformers_models():
    bad = []
    for path, line, module, name in _imports():
        if name is None:
            continue
        if module.startswith("transformers.models") and name.startswith("_"):
            bad.append(f"{_where(path, line)}: private {module}.{name}")
        if module.startswith("transformers") and name in REEXPORTED:
            bad.append(f"{_where(path, line)}: re-exported {module}.{name}")
    assert not bad, "portvlm imports names transformers does not promise:\n" + "\n".join(bad)


def test_names_from_modeling_modules_are_defined_there():
    """A name taken from transformers.models.* must be defined in that module, not re-exported by it."""
    pytest.importorskip("transformers")
    bad = []
    for path, line, module, name in _imports():
        if name is None or not module.startswith("transformers.models"):
            continue
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            bad.append(f"{_where(path, line)}: {module}.{name} not importable here ({exc})")
            continue
        home = getattr(obj, "__module__", module)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and home != module:
            bad.append(f"{_where(path, line)}: {module}.{name} is re-exported from {home}")
    assert not bad, "\n".join(bad)


def test_flash_attn_package_is_never_imported():
    bad = [
        f"{_where(path, line)}: imports {module}"
        for path, line, module, name in _imports()
        if module.split(".")[0] in ("flash_attn", "flash_attn_interface")
    ]
    assert not bad, "portvlm must never import flash-attn (it is not called for non-flash backends):\n" + "\n".join(bad)
