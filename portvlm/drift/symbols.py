"""The upstream symbols portvlm relies on, and how two transformers versions differ in them. Pure: no torch.

Two sources, both data: what portvlm's own source names (``from transformers… import X``, ``transformers.X.y``
attribute chains, and chains on modules imported from transformers: an AST scan, so a new use is covered without
editing a list), and the names the shims reach by string (``getattr(module, ROTARY_FN)``) or by instance, declared
per shim in ``ANCHORS``. A symbol is a dotted name (``transformers.DynamicCache.update``); the probe resolves each\ninside an environment (the longest importable module prefix, then attributes).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Names the shims reach by string or through a model instance (the AST scan cannot see them), per shim: the
# family-independent ones here, each family's beside its record (``portvlm.models``, ``Family.anchors``); ``anchors()``
# merges them. The version-specific ones (the 4.53.x dense mask, <=4.52 class tables) are simply absent elsewhere:
# only a symbol the verified baseline has and the newest lacks counts as drift.
ANCHORS: dict[str, tuple[str, ...]] = {
    # the forwards take the cache by name (``past_key_values``; ``cache`` from 5.24): a renamed parameter is drift
    "kv_cache": ("transformers.DynamicCache.update", "transformers.DynamicCache.crop",
                 "transformers.DynamicCache.get_seq_length"),
    "layer_paths": (),
    "vision_varlen": (),
    "vision_dense_mask": (),
    "text_registry": ("transformers.AttentionInterface.register", "transformers.AttentionMaskInterface.register",
                      "transformers.PreTrainedModel.set_attn_implementation",
                      "transformers.utils.generic.is_flash_attention_requested"),
    "text_registry_legacy": ("transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS",
                             "transformers.models.llama.modeling_llama.LlamaModel._update_causal_mask"),
    "text_classes": (),
    # shims.model_io: the accessors of what a VLM's config and forward look like (no shim record; family anchors)
    "model_io": (),
    "linear_attention_packed": (),  # the DeltaNet modules are family-specific: beside the Qwen3.5 records
}


def anchors() -> dict[str, tuple[str, ...]]:
    """``ANCHORS`` plus every registered family's (``portvlm.models``), per shim, each name once."""
    from portvlm import models

    out = {shim: list(names) for shim, names in ANCHORS.items()}
    for family in models.families():
        for shim, names in family.anchors.items():
            out.setdefault(shim, []).extend(names)
    return {shim: tuple(dict.fromkeys(names)) for shim, names in out.items()}


@dataclass(frozen=True)
class Symbol:
    """One upstream name portvlm uses, and where (``portvlm/shims/attention.py:261``, or ``shim text_registry``)."""

    name: str  # dotted: "transformers.DynamicCache.update"
    used_at: tuple[str, ...]


def _roots(tree: ast.AST) -> dict[str, tuple[str, int]]:
    """Local names bound to transformers objects in one file → (dotted upstream name, attributes a use may add).

    ``import transformers`` roots class.member chains (2 attributes); ``from transformers.x import Y`` roots ``Y.member``
    (1 attribute; Y may be a module such as ``modeling_utils``: the probe resolves dotted names either way).
    """
    roots: dict[str, tuple[str, int]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "transformers":
                    roots[a.asname or "transformers"] = (a.name if a.asname else "transformers", 2)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
            for a in node.names:
                roots[a.asname or a.name] = (f"{node.module}.{a.name}", 1)
    return roots


def _chain(node: ast.Attribute) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def scan_source(text: str, where: str) -> dict[str, list[str]]:
    """``{dotted upstream name: ["file:line", …]}``: one file's imports from transformers and attribute uses on them."""
    tree = ast.parse(text)
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # only a chain's outermost counts
    roots = _roots(tree)
    found: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
            for a in node.names:
                found.setdefault(f"{node.module}.{a.name}", []).append(f"{where}:{node.lineno}")
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            parts = _chain(node)
            if not parts or parts[0] not in roots or len(parts) < 2:
                continue
            base, depth = roots[parts[0]]
            attrs = [p for p in parts[1:1 + depth]]
            if any(p.startswith("__") for p in attrs):
                continue
            found.setdefault(".".join([base, *attrs]), []).append(f"{where}:{node.lineno}")
    return found


def scan_package(root: Path) -> tuple[Symbol, ...]:
    """Every transformers name portvlm's source (``root``: the ``portvlm`` folder) uses, plus ``anchors()``."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        if "drift" in path.relative_to(root).parts:  # the lane's own lists are not uses
            continue
        where = path.relative_to(root.parent).as_posix()
        for name, lines in scan_source(path.read_text(encoding="utf-8"), where).items():
            found.setdefault(name, []).extend(lines)
    for shim, names in anchors().items():
        for name in names:
            found.setdefault(name, []).append(f"shim {shim}")
    return tuple(Symbol(name, tuple(dict.fromkeys(lines))) for name, lines in sorted(found.items()))


# -- comparing what two environments said ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SymbolChange:
    """A symbol the verified baseline has that the newest lost, moved or re-signed."""

    name: str
    kind: str  # "missing" | "moved" | "signature"
    detail: str
    used_at: tuple[str, ...] = ()


def compare_symbols(baseline: Mapping[str, dict], newest: Mapping[str, dict],
                    used_at: Mapping[str, Iterable[str]] | None = None) -> list[SymbolChange]:
    """What changed between two probes' symbol answers (``{"found", "home", "params", "missing", "defined_in"}``)."""
    used_at = used_at or {}
    out: list[SymbolChange] = []
    for name in sorted(baseline):
        old, new = baseline[name], newest.get(name) or {"found": False, "missing": "not probed"}
        where = tuple(used_at.get(name, ()))
        if not old.get("found"):
            continue  # absent in the verified stack too: version-specific, not drift
        if not new.get("found"):
            hint = new.get("defined_in") or []
            moved = f"; now defined in {', '.join(hint)}" if hint else "; defined nowhere in transformers' source"
            out.append(SymbolChange(name, "missing", f"{new.get('missing') or 'not found'}{moved}", where))
            continue
        if old.get("home") and new.get("home") and old["home"] != new["home"]:
            out.append(SymbolChange(name, "moved", f"defined in {old['home']} → {new['home']}", where))
        if old.get("params") is not None and new.get("params") is not None and old["params"] != new["params"]:
            gone = [p for p in old["params"] if p not in new["params"]]
            added = [p for p in new["params"] if p not in old["params"]]
            delta = "; ".join(part for part in (f"removed {', '.join(gone)}" if gone else "",
                                                f"added {', '.join(added)}" if added else "") if part)
            out.append(SymbolChange(name, "signature", f"({', '.join(old['params'])}) → ({', '.join(new['params'])})"
                                    + (f" [{delta}]" if delta else " [reordered]"), where))
    return out
