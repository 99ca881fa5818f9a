"""Matrix → cells: a pure, deterministic function (golden-tested in tests/golden/cells.json).

Order: arch (as declared), then model (as declared), then the arch's stacks (as the arch lists them).
Each cell carries the outcome and reason of the first expectation whose selectors match it.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from portvlm import versions
from portvlm.matrix.schema import Arch, Cell, Expectation, Matrix, Model, Stack


def expand(matrix: Matrix) -> tuple[Cell, ...]:
    """Every arch × model × (arch's stack) cell, with its expected outcome and reason."""
    cells = []
    for arch in matrix.archs:
        for model in matrix.models:
            for stack_id in arch.stacks:
                stack = matrix.stack(stack_id)
                expectation = first_expectation(matrix.expectations, arch, model, stack)
                if expectation is None:
                    cells.append(Cell(arch=arch, stack=stack, model=model))
                else:
                    cells.append(
                        Cell(
                            arch=arch, stack=stack, model=model, expected=expectation.outcome, reason=expectation.reason
                        )
                    )
    return tuple(cells)


def expectation_matches(expectation: Expectation, arch: Arch, model: Model, stack: Stack) -> bool:
    """True when every selector of `expectation` admits the cell; an empty selector admits anything."""
    if expectation.archs and arch.id not in expectation.archs:
        return False
    if expectation.models and model.id not in expectation.models:
        return False
    if expectation.stacks and stack.id not in expectation.stacks:
        return False
    if expectation.transformers is not None:
        # prereleases=True: "<5" must also match a stack pinned to 5.0.0rc1.
        return versions.contains(_specifier(expectation.transformers), _version(stack.transformers))
    return True


def first_expectation(
    expectations: Iterable[Expectation], arch: Arch, model: Model, stack: Stack
) -> Expectation | None:
    """The first declared expectation matching the cell (declaration order decides), or None."""
    for expectation in expectations:
        if expectation_matches(expectation, arch, model, stack):
            return expectation
    return None


def expected_on(matrix: Matrix, arch_id: str, model_id: str, transformers: str,
                torch: str | None = None) -> tuple[str, str | None]:
    """``(outcome, reason)`` of ``model_id`` on ``arch_id`` where ``transformers`` (and ``torch``) are installed.

    The cell of the arch's stack pinning that transformers (and torch, given; local tags like ``+cpu`` ignored) when
    one is declared; otherwise the expectations whose selectors do not name a stack, evaluated for that version (a
    venv no stack declares), with the reason saying so.
    """
    arch, model = matrix.arch(arch_id), matrix.model(model_id)
    bare = None if torch is None else torch.split("+", 1)[0]
    stacks = [matrix.stack(s) for s in arch.stacks]
    for stack in stacks:
        if stack.transformers == transformers and (bare is None or stack.torch == bare):
            found = first_expectation(matrix.expectations, arch, model, stack)
            return ("pass", None) if found is None else (found.outcome, f"{found.reason} ({stack.id})")
    here = Stack(id="", python="", torch=bare or "", torch_variant="", transformers=transformers)
    found = first_expectation((e for e in matrix.expectations if not e.stacks), arch, model, here)
    if found is None:
        return "pass", None
    return found.outcome, f"{found.reason} (transformers {transformers}: no {arch_id} stack declares it)"


def select(
    cells: Iterable[Cell],
    arch: str | Iterable[str] | None = None,
    model: str | Iterable[str] | None = None,
    stack: str | Iterable[str] | None = None,
    ci: bool | None = None,
) -> tuple[Cell, ...]:
    """The cells matching every given filter (an id or several ids each); `ci` filters on `stack.ci`."""
    archs, models, stacks = _ids(arch), _ids(model), _ids(stack)
    return tuple(
        cell
        for cell in cells
        if (archs is None or cell.arch.id in archs)
        and (models is None or cell.model.id in models)
        and (stacks is None or cell.stack.id in stacks)
        and (ci is None or cell.stack.ci == ci)
    )


def cells_to_json(cells: Iterable[Cell]) -> list[dict]:
    """Cells as JSON-ready dicts with a fixed key order: `--json`, the golden file and the CI job matrix."""
    return [cell_to_json(cell) for cell in cells]


def cell_to_json(cell: Cell) -> dict:
    """One cell as a flat JSON-ready dict (key order is part of the golden file)."""
    arch, stack, model = cell.arch, cell.stack, cell.model
    return {
        "id": cell.id,
        "arch": arch.id,
        "model": model.id,
        "stack": stack.id,
        "vendor": arch.vendor,
        "capability": list(arch.capability) if arch.capability is not None else None,
        "gfx": arch.gfx,
        "runtime": arch.runtime,
        "dtype": arch.policy_dtype,
        "dtypes": list(arch.dtypes),
        "vision_backends": list(arch.vision_backends),
        "text_backends": list(arch.text_backends),
        "family": model.family,
        "python": stack.python,
        "torch": stack.torch,
        "torch_variant": stack.torch_variant,
        "transformers": stack.transformers,
        "xformers": stack.xformers,
        "flash_attn": stack.flash_attn,
        "image": stack.image,
        "base_image": stack.base_image,
        "ci": stack.ci,
        "expected": cell.expected,
        "reason": cell.reason,
    }


def _ids(value: str | Iterable[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return frozenset((value,))
    return frozenset(value)


@lru_cache(maxsize=256)
def _specifier(text: str) -> versions.SpecifierSet:
    return versions.specifier(text)


@lru_cache(maxsize=256)
def _version(text: str) -> versions.Version:
    return versions.parse(text)
