"""matrix.yaml → Matrix → cells: the golden file, every error class (exit 2, one line, right line, a fix), the CLI."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from portvlm.cli import main
from portvlm.errors import MatrixError
from portvlm.matrix import cells_to_json, expand, load_matrix, parse_matrix, select
from portvlm.matrix import schema as records
from portvlm.matrix.load import schema as json_schema

ROOT = Path(__file__).resolve().parents[2]
MATRIX = ROOT / "matrix.yaml"
TEXT = MATRIX.read_text(encoding="utf-8")
GOLDEN = ROOT / "tests" / "golden" / "cells.json"


# ----------------------------------------------------------------------------------------------------- the real file


def test_cells_match_golden_file():
    cells = cells_to_json(expand(load_matrix(MATRIX)))
    rendered = json.dumps(cells, indent=2, ensure_ascii=False) + "\n"
    if os.environ.get("PORTVLM_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(rendered, encoding="utf-8")
    assert GOLDEN.exists(), "no golden file; run with PORTVLM_UPDATE_GOLDEN=1 to write tests/golden/cells.json"
    assert rendered == GOLDEN.read_text(encoding="utf-8"), (
        "expanded cells differ from tests/golden/cells.json; if matrix.yaml changed on purpose, "
        "regenerate with PORTVLM_UPDATE_GOLDEN=1 and review the diff"
    )


def test_packaged_copy_is_identical_to_root_matrix():
    packaged = ROOT / "portvlm" / "data" / "matrix.yaml"
    # One file: the checkout's matrix.yaml is a link to the packaged one (what an installed wheel reads).
    assert MATRIX.is_symlink() and MATRIX.resolve() == packaged.resolve(), "ln -sf portvlm/data/matrix.yaml matrix.yaml"


def test_schema_enums_match_the_records():
    defs = json_schema()["$defs"]
    assert tuple(defs["arch"]["properties"]["vendor"]["enum"]) == records.VENDORS
    assert tuple(defs["arch"]["properties"]["runtime"]["enum"]) == records.RUNTIMES
    assert tuple(defs["arch"]["properties"]["dtypes"]["items"]["enum"]) == records.DTYPES
    assert tuple(defs["backends"]["items"]["enum"]) == records.BACKENDS
    assert tuple(defs["expectation"]["properties"]["outcome"]["enum"]) == records.OUTCOMES


def test_real_matrix_loads_into_records():
    matrix = load_matrix(MATRIX)
    assert matrix.path == str(MATRIX)
    sm70 = matrix.arch("sm70")
    assert sm70.capability == (7, 0) and sm70.policy_dtype == "float16" and sm70.runtime == "container"
    assert matrix.arch("gfx942").gfx == "gfx942"
    assert matrix.stack("cpu-tf4.55.4").ci is False and matrix.stack("cpu-tf4.57.6").ci is True
    assert matrix.stack("volta-cu118-torch2.3.1-tf4.50.3").xformers == "0.0.27"
    expectation = matrix.expectations[0]
    assert expectation.line == TEXT.splitlines().index("  - outcome: excluded") + 1
    assert all(e.reason for e in matrix.expectations)


# ----------------------------------------------------------------------------------------------------- expand / select


def test_expand_order_is_arch_then_model_then_the_archs_stacks():
    matrix = load_matrix(MATRIX)
    cells = expand(matrix)
    assert len(cells) == sum(len(a.stacks) for a in matrix.archs) * len(matrix.models)
    expected = [(a.id, m.id, s) for a in matrix.archs for m in matrix.models for s in a.stacks]
    assert [(c.arch.id, c.model.id, c.stack.id) for c in cells] == expected
    assert expand(matrix) == cells  # pure: same input, same output


def test_expand_attaches_first_matching_expectation():
    matrix = load_matrix(MATRIX)
    cells = {c.id: c for c in expand(matrix)}
    excluded = cells["cpu--qwen3vl--cpu-tf4.50.3"]
    assert excluded.expected == "excluded" and "4.57.1" in excluded.reason
    assert cells["cpu--qwen3vl--cpu-tf4.57.6"].expected == "pass"
    assert cells["cpu--qwen3vl--cpu-tf4.57.6"].reason is None

    xfail = records.Expectation(outcome="xfail", reason="flaky on volta", archs=("sm70",), models=("llava",))
    later = records.Expectation(outcome="excluded", reason="never reached", archs=("sm70",))
    cells = {c.id: c for c in expand(replace(matrix, expectations=(*matrix.expectations, xfail, later)))}
    assert cells["sm70--llava--volta-cu118-torch2.7.0-tf4.57.6"].reason == "flaky on volta"
    assert cells["sm70--qwen2_5vl--volta-cu118-torch2.7.0-tf4.57.6"].reason == "never reached"
    assert cells["sm70--qwen3vl--volta-cu118-torch2.3.1-tf4.50.3"].reason == matrix.expectations[0].reason


def test_expected_on_reads_the_installed_stacks_cell_else_the_version_wide_expectations():
    """What tests/torch/test_suites.py marks each model with: matrix.yaml's outcome and reason, no list in the test."""
    from portvlm.matrix.expand import expected_on

    matrix = load_matrix(MATRIX)
    cells = {c.id: c for c in expand(matrix)}
    for stack in ("cpu-tf4.57.6", "cpu-tf5.10.4", "cpu-tf5.24.0"):
        cell = cells[f"cpu--glm4v--{stack}"]
        outcome, reason = expected_on(matrix, "cpu", "glm4v", matrix.stack(stack).transformers, "2.13.0+cpu")
        assert outcome == cell.expected and (reason is None) == (cell.reason is None), stack
        assert reason is None or (cell.reason in reason and stack in reason)
    assert expected_on(matrix, "cpu", "glm4v", "5.10.4")[0] == "excluded"  # the stack's own expectation
    # a version no cpu stack pins: only the expectations that name no stack, and the reason says so
    assert expected_on(matrix, "cpu", "glm4v", "5.17.0") == ("pass", None)
    outcome, reason = expected_on(matrix, "cpu", "qwen3_5", "5.2.0")
    assert outcome == "excluded" and "5.4.0" in reason and "no cpu stack declares it" in reason
    xfail = records.Expectation(outcome="xfail", reason="known gap", archs=("cpu",), models=("qwen3_5",),
                                stacks=("cpu-tf5.25.0",))
    assert expected_on(replace(matrix, expectations=(xfail, *matrix.expectations)), "cpu", "qwen3_5", "5.25.0") == (
        "xfail", "known gap (cpu-tf5.25.0)")
    with pytest.raises(KeyError, match="unknown model"):
        expected_on(matrix, "cpu", "nope", "5.25.0")


def test_select_filters_cells():
    cells = expand(load_matrix(MATRIX))
    picked = select(cells, arch="sm70", model="llava")
    assert [c.stack.id for c in picked] == list(load_matrix(MATRIX).arch("sm70").stacks)
    assert select(cells, arch=["sm80", "sm90"], stack="cu130-torch2.11.0-tf4.57.6", model="qwen3vl") == tuple(
        c
        for c in cells
        if c.id in ("sm80--qwen3vl--cu130-torch2.11.0-tf4.57.6", "sm90--qwen3vl--cu130-torch2.11.0-tf4.57.6")
    )
    assert all(c.stack.ci for c in select(cells, ci=True))
    assert not any(c.stack.ci for c in select(cells, ci=False))
    assert select(cells) == cells


def test_cells_to_json_is_flat_and_json_ready():
    rows = cells_to_json(expand(load_matrix(MATRIX)))
    assert json.loads(json.dumps(rows)) == rows
    first = rows[0]
    assert list(first)[:4] == ["id", "arch", "model", "stack"]
    assert first["id"] == f"{first['arch']}--{first['model']}--{first['stack']}"
    assert {r["expected"] for r in rows} <= set(records.OUTCOMES)


# ----------------------------------------------------------------------------------------------------- load_matrix(None)


def test_the_library_reads_the_packaged_matrix_never_the_cwd_nor_the_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "matrix.yaml").write_text("archs: [broken", encoding="utf-8")  # a cwd file is never read
    monkeypatch.setenv("PORTVLM_MATRIX", str(tmp_path / "matrix.yaml"))  # nor the env var: that is the CLIs' business
    packaged = load_matrix()
    assert Path(packaged.path).parts[-3:] == ("portvlm", "data", "matrix.yaml")


def test_the_command_lines_read_their_option_then_the_env_then_the_packaged_one(tmp_path, monkeypatch):
    from portvlm.matrix import cli_matrix, cli_matrix_path

    monkeypatch.delenv("PORTVLM_MATRIX", raising=False)
    assert cli_matrix_path(None) is None and cli_matrix().path == load_matrix().path
    other = tmp_path / "other.yaml"
    other.write_text(TEXT, encoding="utf-8")
    monkeypatch.setenv("PORTVLM_MATRIX", str(other))
    assert cli_matrix_path(None) == str(other) and cli_matrix().path == str(other)
    assert cli_matrix_path("given.yaml") == "given.yaml"

    monkeypatch.setenv("PORTVLM_MATRIX", str(tmp_path / "missing.yaml"))
    with pytest.raises(MatrixError, match=r"no such file; \$PORTVLM_MATRIX names it"):
        cli_matrix()


def test_missing_file_and_directory_are_matrix_errors(tmp_path):
    with pytest.raises(MatrixError, match="no such file"):
        load_matrix(tmp_path / "nope.yaml")
    with pytest.raises(MatrixError, match="is a directory"):
        load_matrix(tmp_path)


# ----------------------------------------------------------------------------------------------------- error classes


def _mutate(old: str, new: str, at: str | None = None) -> tuple[str, int]:
    """TEXT with the first `old` replaced by `new`, and the line to blame: where `at` sits in `new`
    (default: where the replacement starts), or where `at` first occurs in the result when `new` lacks it."""
    assert old in TEXT, f"matrix.yaml no longer contains {old!r}: update this test"
    start = TEXT.index(old)
    text = TEXT[:start] + new + TEXT[start + len(old) :]
    before = TEXT[:start].count("\n")
    if at is None:
        return text, before + 1
    if at in new:
        return text, before + new[: new.index(at)].count("\n") + 1
    return text, _line_of(text, at)


def _line_of(text: str, snippet: str) -> int:
    return text[: text.index(snippet)].count("\n") + 1


def _case(name, text_line, fix):
    return pytest.param(*text_line, fix, id=name)


_EXPECTATION = '  - outcome: excluded\n    models: [qwen3vl]\n    transformers: "<4.57.1"\n'
_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{k}: &{k} [{', '.join([f'*{p}'] * 10)}]\n" for p, k in zip("abcd", "bcde", strict=True)
)

ERROR_CASES = [
    # YAML itself
    _case("yaml-syntax", _mutate("description: x86-64 CPU, fp32", "description: x86: 64 CPU"), "fix the YAML syntax"),
    _case("yaml-tab", _mutate("  - id: sm70\n", "\t- id: sm70\n", "\t"), "spaces, not tabs"),
    _case("yaml-two-documents", (TEXT + "---\nversion: 1\n", TEXT.count("\n") + 1), "keep one YAML document"),
    _case(
        "yaml-duplicate-key",
        _mutate("    vendor: cpu\n", "    vendor: cpu\n    vendor: nvidia\n", "vendor: nvidia"),
        "keep one of them",
    ),
    _case("yaml-non-string-key", _mutate("version: 1\n", "version: 1\n1: one\n", "1: one"), "quote it"),
    _case("yaml-bool-key", _mutate("version: 1\n", "version: 1\nyes: x\n", "yes: x"), "quote it"),
    _case("yaml-merge-key", _mutate("    vendor: cpu\n", "    <<: {vendor: cpu}\n", "<<"), "write the keys out"),
    _case("yaml-unknown-tag", _mutate("vendor: nvidia", "vendor: !gpu nvidia"), "remove the tag"),
    _case("yaml-alias-bomb", (_BOMB, _line_of(_BOMB, "e:")), "write the matrix out plainly"),
    _case("yaml-recursive-alias", ("version: 1\narchs: &a [*a]\n", 2), "replace the alias"),
    _case(
        "yaml-deep-nesting",
        ("version: 1\narchs: " + "[" * 3000 + "]" * 3000 + "\n", 2),
        "check the brackets and indentation",
    ),
    _case(
        "yaml-huge-int",
        _mutate("capability: [7, 0]", "capability: [" + "9" * 5000 + ", 0]", "capability: [99"),
        "quote it",
    ),
    # top level
    _case("top-empty", ("", 1), "start it with `version: 1`"),
    _case("top-not-mapping", ("- version: 1\n- archs: []\n", 1), "write `version: 1`"),
    _case("top-version-missing", (TEXT.replace("version: 1\n", ""), 1), "add it as the first line"),
    _case("top-version-wrong", _mutate("version: 1", "version: 2"), "write `version: 1`"),
    # schema
    _case(
        "schema-unknown-key",
        _mutate("    runtime: host\n    stacks: [cpu", "    runtme: host\n    stacks: [cpu", "runtme"),
        "did you mean 'runtime'",
    ),
    _case("schema-unknown-top-key", _mutate("models:\n", "model:\n"), "remove it or fix its spelling"),
    _case(
        "schema-missing-key",
        _mutate("    description: Qwen3-VL (deepstack ViT, per-frame full attention)\n", "", "  - id: qwen3vl"),
        "add `description: ...`",
    ),
    _case("schema-wrong-type", _mutate("capability: [7, 0]", 'capability: "7.0"'), "capability: [8, 0]"),
    _case("schema-huge-capability", _mutate("capability: [7, 0]", "capability: [" + "9" * 40 + ", 0]"), "e.g. [9, 0]"),
    _case("schema-unquoted-python", _mutate('python: "3.10"', "python: 3.10"), 'quote it: python: "3.10"'),
    _case(
        "schema-null-section",
        (TEXT.split("expectations:")[0] + "expectations:\n", TEXT.split("expectations:")[0].count("\n") + 1),
        "write `[]`",
    ),
    _case("schema-bad-id", _mutate("id: sm90", "id: sm--90"), "joined by single"),
    _case("enum-vendor", _mutate("vendor: amd", "vendor: amdgpu"), "use one of those (did you mean 'amd'?)"),
    _case("enum-dtype", _mutate("dtypes: [float16, float32]", "dtypes: [fp16, float32]"), "use one of those"),
    _case(
        "enum-backend",
        _mutate("vision_backends: [efficient_varlen, xformers", "vision_backends: [flash_varlen, xformers"),
        "did you mean 'torch_varlen'",
    ),
    _case("enum-outcome", _mutate("outcome: excluded", "outcome: skip"), "use one of those"),
    _case("enum-runtime", _mutate("runtime: container", "runtime: docker"), "use one of those"),
    _case(
        "schema-duplicate-reference",
        _mutate(
            "stacks: [cu130-torch2.11.0-tf5.17.0, cu130-torch2.11.0-tf4.57.6]",
            "stacks: [cu130-torch2.11.0-tf5.17.0, cu130-torch2.11.0-tf5.17.0]",
        ),
        "list each once",
    ),
    # duplicate ids
    _case("duplicate-arch", _mutate("id: sm90", "id: sm80"), "rename or remove one"),
    _case("duplicate-stack", _mutate("{id: cpu-tf4.52.4,", "{id: cpu-tf4.50.3,"), "rename or remove one"),
    _case("duplicate-model", _mutate("id: llava", "id: qwen3vl"), "rename or remove one"),
    # references
    _case(
        "reference-arch-stack",
        _mutate(
            "stacks: [cu130-torch2.11.0-tf5.17.0, cu130",
            "stacks: [cu130-torch2.11.0-tf5.17, cu130",
            "stacks: [cu130-torch2.11.0-tf5.17,",
        ),
        "declare it or fix the id",
    ),
    _case(
        "reference-expectation-model",
        _mutate("models: [qwen3vl]", "models: [qwen3]"),
        "fix the id or remove it (did you mean 'qwen3vl'?)",
    ),
    _case(
        "reference-expectation-arch",
        _mutate("    models: [qwen3vl]\n", "    models: [qwen3vl]\n    archs: [sm07]\n", "archs: [sm07]"),
        "fix the id or remove it",
    ),
    _case(
        "reference-expectation-stack",
        _mutate("    models: [qwen3vl]\n", "    models: [qwen3vl]\n    stacks: [cpu-tf4.50]\n", "stacks: [cpu-tf4.50]"),
        "fix the id or remove it",
    ),
    # versions
    _case("version-torch", _mutate("torch: 2.9.1", "torch: 2.9.x"), "write an exact release"),
    _case(
        "version-transformers",
        _mutate("transformers: 4.52.4}", 'transformers: ">=4.52"}'),
        "ranges belong in expectations",
    ),
    _case("version-xformers", _mutate("xformers: 0.0.27", "xformers: 0.0.27-sm70+"), "write an exact release"),
    _case(
        "version-flash-attn",
        _mutate("    xformers: 0.0.30\n", "    xformers: 0.0.30\n    flash_attn: two\n", "flash_attn"),
        "write an exact release",
    ),
    _case(
        "version-min-transformers",
        _mutate("min_transformers: 4.57.1", "min_transformers: latest"),
        "write an exact release",
    ),
    _case("version-specifier", _mutate('transformers: "<4.57.1"', 'transformers: "4.57"'), 'such as "<4.57.1"'),
    # vendor facts, containers
    _case("nvidia-needs-capability", _mutate("    capability: [7, 0]\n", "", "  - id: sm70"), "capability: [8, 0]"),
    _case("amd-needs-gfx", _mutate("    gfx: gfx942\n", "", "  - id: gfx942"), "gfx: gfx942"),
    _case(
        "cpu-has-no-capability",
        _mutate("    vendor: cpu\n", "    vendor: cpu\n    capability: [1, 0]\n", "capability: [1, 0]"),
        "remove it",
    ),
    _case(
        "container-needs-image",
        _mutate("    image: portvlm/sm70-cu126-torch2.14.1\n", "", "  - id: volta-cu126-torch2.14.1-tf5.24.0"),
        "add `image: ...` to the stack or set the arch's runtime: host",
    ),
    # min_transformers coverage
    _case(
        "coverage-no-expectation",
        (
            TEXT.replace(_EXPECTATION, "  - outcome: xfail\n    models: [llava]\n"),
            _line_of(TEXT, "min_transformers: 4.57.1"),
        ),
        "add under expectations:",
    ),
    _case(
        "coverage-shadowed-by-xfail",
        _mutate(
            "expectations:\n",
            "expectations:\n  - {outcome: xfail, archs: [sm70], reason: slow}\n",
            "  - {outcome: xfail",
        ),
        "make it `outcome: excluded`",
    ),
]


@pytest.mark.parametrize(("text", "line", "fix"), ERROR_CASES)
def test_bad_matrix_exits_2_with_one_line_naming_line_and_fix(text, line, fix, tmp_path, capsys):
    path = tmp_path / "matrix.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["matrix", "--file", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    match = re.fullmatch(rf"error: {re.escape(str(path))}:(\d+): (.+;.+)\n", err)
    assert match, f"not one `error: PATH:LINE: problem; fix` line: {err!r}"
    assert int(match.group(1)) == line, err
    assert fix in match.group(2), err


def test_non_utf8_bytes_name_their_line(tmp_path, capsys):
    path = tmp_path / "matrix.yaml"
    path.write_bytes(TEXT.encode() + b"notes: \xff\n")
    assert main(["matrix", "--file", str(path)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {path}:{TEXT.count(chr(10)) + 1}: not UTF-8 text (byte 0xff); save matrix.yaml as UTF-8\n"
    )


def test_error_without_a_line_keeps_the_one_line_form(capsys, tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(TEXT + "#" * (1 << 20), encoding="utf-8")
    assert main(["matrix", "--file", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {re.escape(str(path))}: [^\n]+; [^\n]+\n", err), err


def test_parse_matrix_raises_matrix_error_with_fields():
    with pytest.raises(MatrixError) as info:
        parse_matrix(TEXT.replace("id: sm90", "id: sm80"), "custom.yaml")
    assert info.value.path == "custom.yaml"
    assert info.value.line == _line_of(TEXT, "id: sm90")
    assert str(info.value).startswith(f"custom.yaml:{info.value.line}: duplicate arch id 'sm80'")


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_prints_table_and_summary(capsys):
    assert main(["matrix", "--file", str(MATRIX)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["cell", "runtime", "torch", "transformers", "expected", "reason"]
    excluded = next(line for line in out if line.startswith("cpu--qwen3vl--cpu-tf4.50.3 "))
    assert "excluded" in excluded and "Qwen3-VL first ships in transformers 4.57.1" in excluded
    cells = expand(load_matrix(MATRIX))
    assert len(out) == len(cells) + 2
    assert re.fullmatch(
        rf"{len(cells)} cells \({len(load_matrix(MATRIX).archs)} archs × {len(load_matrix(MATRIX).models)} models, \d+ stacks\) from .*matrix\.yaml: \d+ pass, 0 xfail, \d+ excluded; \d+ runnable in the CI selection",
        out[-1],
    )


def test_cli_json_is_the_cells_json(capsys):
    assert main(["matrix", "--file", str(MATRIX), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == cells_to_json(expand(load_matrix(MATRIX)))


def test_cli_filters(capsys):
    assert main(["matrix", "--file", str(MATRIX), "--json", "--arch", "sm70", "--model", "llava"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["stack"] for r in rows] == list(load_matrix(MATRIX).arch("sm70").stacks)
    assert {(r["arch"], r["model"]) for r in rows} == {("sm70", "llava")}


def test_cli_unknown_filter_exits_2(capsys):
    assert main(["matrix", "--file", str(MATRIX), "--arch", "sm75"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("error: unknown arch 'sm75' in --arch; use one declared in ")


def test_cli_default_file_is_cwd_matrix(capsys, monkeypatch):
    monkeypatch.delenv("PORTVLM_MATRIX", raising=False)
    monkeypatch.chdir(ROOT)
    assert main(["matrix", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(expand(load_matrix(MATRIX)))
