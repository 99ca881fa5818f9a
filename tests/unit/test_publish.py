"""portvlm.publish: SUPPORT.md, site/index.html and badges from results + matrix (no torch, no browser)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import jsonschema
import pytest

from portvlm.matrix import expand, load_matrix, parse_matrix
from portvlm.publish import publish
from portvlm.publish.cli import main as publish_main
from portvlm.publish.table import EVIDENCE_STYLE, NOT_RUN, STATUS_STYLE, build_table, read_results
from portvlm.run.results import EVIDENCE, STATUSES, CellResult, Check, SuiteResult, write_result

ROOT = Path(__file__).resolve().parents[2]

# The cpu arch has one stack per result status and one model per evidence level, so every status × evidence
# pair is one cell; the GPU archs feed the per-platform badges (sm80 and sm90 fold into sm80+).
MATRIX_YAML = """
version: 1
archs:
  - {id: cpu, vendor: cpu, description: CPU lane, dtypes: [float32], runtime: host,
     stacks: [st-pass, st-fail, st-xfail, st-xpass, st-error, st-timeout, st-excluded, st-skipped]}
  - {id: sm70, vendor: nvidia, description: Volta, capability: [7, 0], dtypes: [float16], runtime: host,
     stacks: [gpu-old, gpu-new]}
  - {id: sm80, vendor: nvidia, description: Ampere, capability: [8, 0], dtypes: [bfloat16], stacks: [gpu-new]}
  - {id: sm90, vendor: nvidia, description: Hopper, capability: [9, 0], dtypes: [bfloat16], stacks: [gpu-new]}
  - {id: gfx90a, vendor: amd, description: MI200, gfx: gfx90a, dtypes: [bfloat16], stacks: [gpu-new]}
  - {id: gfx942, vendor: amd, description: MI300, gfx: gfx942, dtypes: [bfloat16], stacks: [gpu-new]}
stacks:
  - {id: st-pass, python: "3.11", torch: 2.13.0, torch_variant: cpu, transformers: 4.57.6}
  - {id: st-fail, python: "3.11", torch: 2.13.0, torch_variant: cpu, transformers: 4.57.6}
  - {id: st-xfail, python: "3.11", torch: 2.13.0, torch_variant: cpu, transformers: 4.57.6}
  - {id: st-xpass, python: "3.11", torch: 2.13.0, torch_variant: cpu, transformers: 4.57.6}
  - {id: st-error, python: "3.11", torch: 2.13.0, torch_variant: cpu, transformers: 4.57.6}
  - {id: st-timeout, python: "3.11", torch: 2.13.0, torch_variant: cpu, transformers: 4.57.6}
  - {id: st-excluded, python: "3.11", torch: 2.13.0, torch_variant: cpu, transformers: 4.57.6}
  - {id: st-skipped, python: "3.11", torch: 2.13.0, torch_variant: cpu, transformers: 4.57.6, ci: false}
  - {id: gpu-old, python: "3.10", torch: 2.3.1, torch_variant: cu118, transformers: 4.50.3,
     image: portvlm/sm70-old, base_image: "nvidia/cuda:11.8.0-runtime-ubuntu22.04"}
  - {id: gpu-new, python: "3.12", torch: 2.11.0, torch_variant: cu130, transformers: 5.17.0}
models:
  - {id: mhardware, family: qwen2_5_vl, description: model A, min_transformers: 4.49.0}
  - {id: memulated, family: qwen2_5_vl, description: model B, min_transformers: 4.49.0}
  - {id: mbuilt, family: llava, description: model C, min_transformers: 4.49.0}
  - {id: mnone, family: qwen3_vl, description: model D, min_transformers: 4.57.1}
expectations:
  - outcome: excluded
    models: [mnone]
    transformers: "<4.57.1"
    reason: "model D first ships in 4.57.1 | piped <b>bold</b>"
  - outcome: xfail
    archs: [cpu]
    stacks: [st-xfail, st-xpass]
    reason: "declared xfail: upstream bug #123"
"""
EVIDENCE_OF_MODEL = {"mhardware": "hardware", "memulated": "emulated", "mbuilt": "built", "mnone": "none"}


@pytest.fixture(scope="module")
def matrix():
    return parse_matrix(MATRIX_YAML, "matrix.yaml")


def fake_result(cell, status: str, evidence: str, *, parity=1.5e-6, step=0.25, reason=None, **extra) -> CellResult:
    """A result as the runner writes it, with a parity figure and a training step time."""
    suites = {
        "parity": SuiteResult("parity", "pass", figures={"max_abs_err": parity},
                              checks=[Check("logits", True, value=parity, bound=1e-4)]),
        "training": SuiteResult("training", "pass", figures={"step_time_s": step}),
    }
    if status in ("fail", "xfail"):
        suites["parity"] = SuiteResult("parity", "fail", figures={"max_abs_err": 0.5},
                                       checks=[Check("vision_packed", False, detail="max abs err 0.5 > atol 1e-4",
                                                     value=0.5, bound=1e-4)])
    return CellResult(
        cell=cell.id, arch=cell.arch.id, model=cell.model.id, stack={"id": cell.stack.id},
        expected=cell.expected, status=status, evidence=evidence, reason=reason, suites=suites, **extra,
    )


def every_status_by_evidence(matrix, results_dir: Path) -> dict[str, CellResult]:
    """One result per status × evidence on the cpu arch (32 cells) plus a few GPU ones."""
    written = {}
    for cell in expand(matrix):
        if cell.arch.id == "cpu":
            status = cell.stack.id.removeprefix("st-")
            evidence = EVIDENCE_OF_MODEL[cell.model.id]
            kwargs = {}
            if status == "error":
                kwargs = {"suites": {}, "error": "Traceback (most recent call last):\n  ...\nRuntimeError: boom in cell"}
                r = CellResult(cell=cell.id, arch="cpu", model=cell.model.id, stack={}, expected=cell.expected,
                               status="error", evidence=evidence, **kwargs)
            elif status == "timeout":
                r = CellResult(cell=cell.id, arch="cpu", model=cell.model.id, stack={}, expected=cell.expected,
                               status="timeout", evidence=evidence, error="cell exceeded 900s; log: x.log")
            elif status == "skipped":
                r = fake_result(cell, status, evidence, reason="needs a CUDA device, found cpu")
            elif status == "excluded":
                r = fake_result(cell, status, evidence, reason="excluded by hand in this test")
            else:
                r = fake_result(cell, status, evidence)
        elif cell.arch.id == "sm80" and cell.model.id in ("mhardware", "memulated"):
            r = fake_result(cell, "pass", "hardware" if cell.model.id == "mhardware" else "emulated")
        elif cell.arch.id == "sm90" and cell.model.id == "mhardware":
            r = fake_result(cell, "pass", "hardware", parity=float("nan"))
        elif cell.arch.id == "gfx942":
            r = fake_result(cell, "pass", "hardware") if cell.expected != "excluded" else None
        else:
            r = None
        if r is not None:
            write_result(r, results_dir)
            written[cell.id] = r
    return written


@pytest.fixture()
def published(tmp_path, matrix):
    results = tmp_path / "results"
    written = every_status_by_evidence(matrix, results)
    out = publish(results, matrix, tmp_path)
    return {"tmp": tmp_path, "results": results, "written": written, "out": out,
            "html": (tmp_path / "site" / "index.html").read_text(), "md": (tmp_path / "SUPPORT.md").read_text()}


def cells_of(page: str) -> dict[str, str]:
    """cell id -> the <td> markup of that cell."""
    return {m.group(1): m.group(0) for m in re.finditer(r'<td class="cell[^"]*" id="([^"]+)".*?</td>', page, re.S)}


def test_every_expanded_cell_appears_once_run_or_not(published, matrix):
    tds = cells_of(published["html"])
    assert sorted(tds) == sorted(c.id for c in expand(matrix))
    for cell in expand(matrix):
        assert published["md"].count(f"`{cell.stack.id}`") >= 1
    not_run = [c for c in expand(matrix) if c.id not in published["written"] and c.expected != "excluded"]
    assert not_run, "the fixture should leave some cells without a result"
    for cell in not_run:
        assert f'data-status="{NOT_RUN}"' in tds[cell.id] and 'data-evidence="none"' in tds[cell.id]
        assert "href=" not in tds[cell.id]


def test_every_status_and_evidence_is_shown_and_linked(published):
    tds = cells_of(published["html"])
    seen = set()
    for cell_id, result in published["written"].items():
        td = tds[cell_id]
        assert f'data-status="{result.status}"' in td and f'data-evidence="{result.evidence}"' in td
        assert f'href="results/{cell_id}.json"' in td
        assert EVIDENCE_STYLE[result.evidence]["glyph"] in td
        assert (published["tmp"] / "site" / "results" / f"{cell_id}.json").is_file()
        assert f"[{STATUS_STYLE[result.status]['icon']} {result.status}](results/{cell_id}.json)" in published["md"]
        seen.add((result.status, result.evidence))
    assert seen >= {(s, e) for s in STATUSES for e in EVIDENCE}


def test_each_evidence_level_has_its_own_glyph_and_colour(published):
    glyphs = [v["glyph"] for v in EVIDENCE_STYLE.values()]
    assert sorted(EVIDENCE_STYLE) == sorted(EVIDENCE) and len(set(glyphs)) == len(glyphs)
    for level in EVIDENCE:
        assert re.search(rf"\.ev\.ev-{level} {{ color: #[0-9a-f]{{6}}; }}", published["html"])


def test_failures_and_expected_failures_carry_their_reason(published, matrix):
    tds = cells_of(published["html"])
    by_id = {c.id: c for c in expand(matrix)}
    for cell_id, result in published["written"].items():
        td = tds[cell_id]
        if result.status in ("fail", "xfail"):
            assert "parity: vision_packed: max abs err 0.5 &gt; atol 1e-4" in td
        elif result.status == "error":
            assert "RuntimeError: boom in cell" in td
        elif result.status == "timeout":
            assert "cell exceeded 900s" in td
        elif result.status == "skipped":
            assert "needs a CUDA device, found cpu" in td
        elif result.status == "pass":
            assert 'class="reason"' not in td
    # Excluded by the matrix and never run: the declared reason, as data, escaped in both renderings.
    excluded = [c for c in by_id.values() if c.expected == "excluded" and c.id not in published["written"]]
    assert excluded
    for cell in excluded:
        assert 'data-status="excluded"' in tds[cell.id]
        assert "model D first ships in 4.57.1 | piped &lt;b&gt;bold&lt;/b&gt;" in tds[cell.id]
    assert "model D first ships in 4.57.1 \\| piped &lt;b&gt;bold&lt;/b&gt;" in published["md"]
    assert "<b>bold</b>" not in published["html"] + published["md"]


def test_key_numbers(published):
    tds = cells_of(published["html"])
    pass_hw = next(i for i, r in published["written"].items() if r.status == "pass" and r.arch == "cpu")
    assert "err 1.5e-06 · step 250 ms" in tds[pass_hw]
    fail = next(i for i, r in published["written"].items() if r.status == "fail")
    assert "err 0.5 · step 250 ms" in tds[fail]
    error = next(i for i, r in published["written"].items() if r.status == "error")
    assert "err — · step —" in tds[error]
    nan = "sm90--mhardware--gpu-new"
    assert "err nan" in tds[nan], "a NaN parity error must show, not vanish"


def test_badges_follow_the_shields_endpoint_schema(published):
    schema = {
        "type": "object",
        "required": ["schemaVersion", "label", "message", "color"],
        "properties": {"schemaVersion": {"const": 1}, "label": {"type": "string"}, "message": {"type": "string"},
                       "color": {"type": "string"}},
    }
    badges = {}
    for platform in ("cpu", "sm70", "sm80+", "gfx90a", "gfx942"):
        doc = json.loads((published["tmp"] / "site" / "badges" / f"{platform}.json").read_text())
        jsonschema.validate(doc, schema)
        svg = (published["tmp"] / "site" / "badges" / f"{platform}.svg").read_text()
        assert svg.startswith("<svg") and html.escape(doc["message"]) in svg
        assert f'src="badges/{platform}.svg"' in published["html"]
        badges[platform] = doc
    # cpu: 32 cells; the 4 whose result says "excluded" do not count; 4 pass (one per evidence level).
    assert badges["cpu"]["message"].startswith("4/28 pass · 4 fail · 4 error · 4 timeout · 4 xpass · 4 xfail")
    assert "1 emulated" in badges["cpu"]["message"] and "1 built" in badges["cpu"]["message"]
    assert badges["cpu"]["color"] == "red"
    # sm80+ folds sm80 and sm90: 3 passes (2 hardware, 1 emulated) of 8 cells, the rest not run.
    assert badges["sm80+"]["message"] == "3/8 pass · 5 not run · 1 emulated" and badges["sm80+"]["color"] == "yellow"
    # gfx942: every cell passed on hardware.
    assert badges["gfx942"]["message"] == "4/4 pass" and badges["gfx942"]["color"] == "brightgreen"
    # sm70: the excluded cell does not count; nothing ran.
    assert badges["sm70"]["message"] == "not run (7 cells)" and badges["sm70"]["color"] == "lightgrey"


def test_missing_and_corrupt_results_are_noted_not_fatal(tmp_path, matrix):
    results = tmp_path / "results"
    results.mkdir()
    good = next(c for c in expand(matrix) if c.arch.id == "gfx90a" and c.expected == "pass")
    write_result(fake_result(good, "pass", "hardware"), results)
    (results / "broken.json").write_text("{not json")
    (results / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (results / "list.json").write_text("[1, 2]")
    (results / "oldschema.json").write_text(json.dumps({"schema": "portvlm.cell-result/0", "cell": "x"}))
    (results / "unknownfield.json").write_text(json.dumps({"schema": "portvlm.cell-result/1", "bogus": 1}))
    stray = CellResult(cell="cpu--nosuchmodel--st-pass", arch="cpu", model="nosuchmodel", stack={},
                       expected="pass", status="pass", evidence="hardware")
    write_result(stray, results)
    weird = fake_result(good, "pass", "hardware")
    weird.status, weird.evidence = "great", "vibes"
    (results / "weird.json").write_text(json.dumps(weird.to_json()))
    misnamed = fake_result(good, "pass", "hardware")
    (results / "misnamed.json").write_text(json.dumps(misnamed.to_json()))

    out = publish(results, matrix, tmp_path)
    page = out["site/index.html"].read_text()
    md = out["SUPPORT.md"].read_text()
    assert "Generated from 1 result over" in md and "Generated from 1 result over" in page
    for name in ("broken.json", "binary.json", "list.json", "oldschema.json", "unknownfield.json", "weird.json",
                 "misnamed.json", "cpu--nosuchmodel--st-pass.json"):
        assert name in md and name in page, name
    assert "status 'great' is not one of" in md and "evidence 'vibes' is not one of" in md
    assert sorted(p.name for p in (tmp_path / "site" / "results").iterdir()) == [f"{good.id}.json"]

    # No results folder at all: still a full table, every cell "not run".
    out = publish(tmp_path / "nowhere", matrix, tmp_path / "empty")
    page = out["site/index.html"].read_text()
    assert "Generated from 0 results" in page and "no results directory" in page
    assert page.count(f'data-status="{NOT_RUN}"') == sum(1 for c in expand(matrix) if c.expected != "excluded")


def test_output_is_deterministic(tmp_path, matrix):
    results = tmp_path / "results"
    every_status_by_evidence(matrix, results)
    a = publish(results, matrix, tmp_path / "a")
    b = publish(results, matrix, tmp_path / "b")
    again = publish(results, matrix, tmp_path / "a")
    assert sorted(a) == sorted(b) == sorted(again)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes() == again[name].read_bytes(), name
    text = a["SUPPORT.md"].read_text() + a["site/index.html"].read_text()
    assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", text), "no timestamps in the output"
    assert "Generated from 39 results" in text


def test_stale_copies_are_dropped(tmp_path, matrix):
    results = tmp_path / "results"
    every_status_by_evidence(matrix, results)
    publish(results, matrix, tmp_path)
    victim = sorted(results.glob("*.json"))[0]
    victim.unlink()
    out = publish(results, matrix, tmp_path)
    assert not (tmp_path / "site" / "results" / victim.name).exists()
    assert f"site/results/{victim.name}" not in out


def test_table_rows_are_model_by_stack_and_columns_archs(matrix):
    table = build_table(expand(matrix), read_results("/nonexistent"),
                        archs=tuple(a.id for a in matrix.archs), stacks=tuple(s.id for s in matrix.stacks))
    assert table.archs == ("cpu", "sm70", "sm80", "sm90", "gfx90a", "gfx942")
    assert [(r.model, r.stack) for r in table.rows][:3] == [("mhardware", "st-pass"), ("mhardware", "st-fail"),
                                                           ("mhardware", "st-xfail")]
    gpu_new = next(r for r in table.rows if r.model == "mbuilt" and r.stack == "gpu-new")
    assert [s is not None for s in gpu_new.slots] == [False, True, True, True, True, True]
    xfail = next(s for s in table.slots if s.stack == "st-xfail")
    assert xfail.status == NOT_RUN and xfail.reason == "declared xfail: upstream bug #123"


def test_cli_writes_everything_and_reports(tmp_path, matrix, capsys):
    results = tmp_path / "results"
    every_status_by_evidence(matrix, results)
    (results / "broken.json").write_text("{")
    mpath = tmp_path / "matrix.yaml"
    mpath.write_text(MATRIX_YAML)
    from portvlm.cli import main as cli_main

    rc = cli_main(["publish", "--results", str(results), "--out", str(tmp_path / "out"), "--matrix", str(mpath)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "generated from 39 results" in captured.out and "sm80+" in captured.out
    assert "broken.json" in captured.err
    assert (tmp_path / "out" / "SUPPORT.md").is_file() and (tmp_path / "out" / "site" / "badges" / "sm80+.svg").is_file()


def test_cli_bad_matrix_exits_2(tmp_path, capsys):
    bad = tmp_path / "matrix.yaml"
    bad.write_text("version: 2\n")
    assert publish_main(["--matrix", str(bad), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_real_matrix_publishes_with_no_results(tmp_path):
    matrix = load_matrix(ROOT / "matrix.yaml")
    out = publish(tmp_path / "results", matrix, tmp_path)
    page = out["site/index.html"].read_text()
    assert len(cells_of(page)) == len(expand(matrix))
    for cell in expand(matrix):
        if cell.expected != "pass":
            assert html.escape(cell.reason) in cells_of(page)[cell.id]
    text = page + out["SUPPORT.md"].read_text()
    assert str(ROOT) not in text and str(tmp_path) not in text  # links stay relative


def test_kv_bytes_per_token_is_shown_where_a_result_reports_it(tmp_path):
    """Latent-KV families (llava_mla) report KV bytes per token, MHA vs MLA; the table shows them, others nothing."""
    from portvlm.publish.table import format_kv, kv_bytes

    kv = {"mha": 512, "mla": 192, "ratio": 0.375, "rank": 8}
    suites = {"parity": SuiteResult(name="parity", status="pass", figures={"max_abs_err": 1e-6, "kv_bytes_per_token": kv})}
    with_kv = CellResult(cell="c", arch="cpu", model="m", stack={}, expected="pass", status="pass",
                         evidence="hardware", suites=suites)
    assert kv_bytes(with_kv) == (512, 192, 8)
    assert format_kv(kv_bytes(with_kv)) == "KV 512→192 B/tok (r=8)"
    plain = CellResult(cell="c", arch="cpu", model="m", stack={}, expected="pass", status="pass", evidence="hardware",
                       suites={"parity": SuiteResult(name="parity", status="pass", figures={"max_abs_err": 1e-6})})
    assert kv_bytes(plain) is None and format_kv(None) == ""


def test_an_arch_no_platform_names_gets_a_not_run_badge_in_column_order(matrix):
    """A newly declared arch (sm100: no results yet) is summarised as `not run`, never dropped from the badges."""
    import dataclasses

    sm100 = dataclasses.replace(matrix.arch("sm90"), id="sm100", description="Blackwell", capability=(10, 0))
    archs = matrix.archs[:4] + (sm100,) + matrix.archs[4:]
    table = build_table(expand(dataclasses.replace(matrix, archs=archs)), read_results("/nonexistent"),
                        archs=tuple(a.id for a in archs))
    assert [p.platform for p in table.platforms] == ["cpu", "sm70", "sm80+", "sm100", "gfx90a", "gfx942"]
    badge = next(p for p in table.platforms if p.platform == "sm100")
    assert (badge.archs, badge.message, badge.color) == (("sm100",), "not run (4 cells)", "lightgrey")
    assert {s.evidence for s in table.slots if s.arch == "sm100"} == {"none"}


# -- the newest-upstream row and badge (results/drift/, written by `nox -s drift`) ------------------------------------


def drift_record(status: str, when: str, version: str = "9.0.0") -> dict:
    from portvlm.drift import report

    tested = report.Tested(version, "2.13.0+cpu", "3.11", False, ">=4.49.0, <=5.23.x", "https://idx/simple", "/wheels")
    cells = [CellResult(cell=f"cpu--m--drift-tf{version}", arch="cpu", model="m", stack={}, expected="pass",
                        status="pass" if status == "ok" else "fail", evidence="hardware",
                        suites={"parity": SuiteResult("parity", "pass" if status == "ok" else "fail",
                                                      checks=[Check("logits", status == "ok", detail="err 0.5")])})]
    return report.build_report(tested_at=when, tested=tested, baseline=None, cells=cells, newest_probe={},
                               baseline_probe=None, changes=[], symbol_changes=[])


def test_upstream_row_and_badge_are_grey_until_the_drift_lane_runs(tmp_path, matrix):
    publish(tmp_path / "results", matrix, tmp_path)
    doc = json.loads((tmp_path / "site" / "badges" / "upstream.json").read_text())
    assert doc["message"] == "never run" and doc["color"] == "lightgrey"
    assert "## Newest upstream" in (tmp_path / "SUPPORT.md").read_text()
    assert "| — | — | never | ⬜ never run |" in (tmp_path / "SUPPORT.md").read_text()
    page = (tmp_path / "site" / "index.html").read_text()
    assert 'src="badges/upstream.svg"' in page and 'data-upstream="never run"' in page
    assert (tmp_path / "site" / "badges" / "upstream.svg").read_text().startswith("<svg")


def test_upstream_row_shows_the_latest_report_green_then_red(tmp_path, matrix):
    from portvlm.drift import report

    results = tmp_path / "results"
    report.write_report(drift_record("ok", "2026-12-01T03:17:00+00:00", "9.0.0"), results)
    publish(results, matrix, tmp_path)
    md = (tmp_path / "SUPPORT.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 9.0.0"))
    assert "| 9.0.0 (unverified) | 2.13.0+cpu | 2026-12-01 | ✅ ok | no shim broke; 1/1 CPU cells pass |" in row
    assert "(results/drift/2026-12-01-tf9.0.0-torch2.13.0+cpu.md)" in row
    assert (results / "drift" / "2026-12-01-tf9.0.0-torch2.13.0+cpu.md").is_file()
    badge = json.loads((tmp_path / "site" / "badges" / "upstream.json").read_text())
    assert badge == {"schemaVersion": 1, "label": "portvlm newest upstream", "message": "transformers 9.0.0 ok",
                     "color": "brightgreen"}
    assert 'href="drift/2026-12-01-tf9.0.0-torch2.13.0+cpu.md"' in (tmp_path / "site" / "index.html").read_text()
    assert (tmp_path / "site" / "drift" / "2026-12-01-tf9.0.0-torch2.13.0+cpu.md").is_file()

    report.write_report(drift_record("broken", "2026-12-08T03:17:00+00:00", "9.1.0"), results)
    publish(results, matrix, tmp_path)
    md = (tmp_path / "SUPPORT.md").read_text()
    assert "| 9.1.0 (unverified) | 2.13.0+cpu | 2026-12-08 | ❌ broken | upstream broke a shim (1 problem(s)); 0/1" in md
    badge = json.loads((tmp_path / "site" / "badges" / "upstream.json").read_text())
    assert badge["color"] == "red" and badge["message"] == "transformers 9.1.0 broken"
    assert sorted(p.name for p in (tmp_path / "site" / "drift").iterdir()) == [
        "2026-12-08-tf9.1.0-torch2.13.0+cpu.json", "2026-12-08-tf9.1.0-torch2.13.0+cpu.md"]  # only the latest copy
    assert len(list((results / "drift").glob("*.json"))) == 2  # the earlier report is kept


# -- issue #28: what a newcomer reads ------------------------------------------------------------------------------
def test_readme_numbers_come_from_the_matrix(monkeypatch):
    """The README's counts are generated from matrix.yaml (`portvlm publish`); PORTVLM_UPDATE_GOLDEN=1 rewrites them."""
    import os

    from portvlm.publish import readme

    matrix = load_matrix(ROOT / "matrix.yaml")
    if os.environ.get("PORTVLM_UPDATE_GOLDEN"):
        readme.update(ROOT / "README.md", matrix)
    text = (ROOT / "README.md").read_text()
    assert readme.BEGIN in text and readme.END in text
    assert readme.render(text, matrix) == text, (
        "README.md's matrix numbers are stale: run `portvlm publish` (or PORTVLM_UPDATE_GOLDEN=1) and review the diff")
    cells = expand(matrix)
    block = text[text.index(readme.BEGIN):text.index(readme.END)]
    assert f"= {len(cells)} cells" in block and f"{len(matrix.models)} models" in block
    assert f"runs the {sum(c.arch.id == 'cpu' for c in cells)} CPU cells" in block


def test_every_badge_accounts_for_every_cell_it_counts(tmp_path, matrix):
    """`6/8 pass` alone hides two cells: the message names what the others are (not run, failed, skipped …)."""
    from portvlm.publish import write_all

    every_status_by_evidence(matrix, tmp_path / "results")
    _, table = write_all(tmp_path / "results", matrix, tmp_path)
    for summary in table.platforms:
        message = summary.message
        if message.startswith("not run") or summary.total == 0:
            continue
        statuses = ("pass", "fail", "error", "timeout", "xpass", "xfail", "skipped", NOT_RUN)
        named = sum(int(n) for n, what in re.findall(r"(\d+) ([a-z ]+?)(?: ·|$)", message.split(" pass", 1)[1])
                    if what.strip() in statuses)
        assert summary.passed + named == summary.total, (summary.platform, message)
        if summary.counts.get(NOT_RUN):
            assert f"{summary.counts[NOT_RUN]} not run" in message


def test_step_times_of_a_busy_machine_are_left_out_and_unknown_load_is_marked(matrix):
    from portvlm.publish.table import format_step, make_slot

    cell = expand(matrix)[0]

    def slot(timings):
        r = fake_result(cell, "pass", "hardware", step=0.25)
        r.timings.update(timings)
        return make_slot(cell, r)

    assert format_step(slot({"host_load_1m": 0.7, "host_cpus": 2})) == "250 ms"
    assert format_step(slot({"host_load_1m": 12.9, "host_cpus": 2})) == "— (busy machine: load 12.9 on 2 CPUs)"
    assert format_step(slot({})) == "250 ms (load not recorded)"


def test_distributed_rows_say_a_shared_sentence_once():
    from portvlm.publish.distributed import DistRow, group_rows

    what = "NVIDIA H200; world size 1 (FSDP2 plumbing on one GPU): loss + parameters after a step"
    rows = [DistRow(p, "1×1", m, "pass", "hardware", None, g, what, "distributed_dp_1gpu.json")
            for p, m, g in (("sm90", "qwen2_5vl", 5.75), ("sm70", "qwen2_5vl", 7.3), ("sm90", "qwen3vl", 9.1))]
    (group,) = group_rows(rows)
    assert dict(group.shared)["what"] == what and "what" not in group.columns
    assert dict(group.shared)["evidence"] == "hardware"
    assert group.columns == ("arch policy", "model", "status", "tokens/s", "peak GiB/rank")
    assert [r[-1] for r in group.rows] == ["5.75", "7.3", "9.1"]
    md = _render_md_with(rows)
    assert md.count(what) == 1


def _render_md_with(rows) -> str:
    from portvlm.publish import _jinja_env
    from portvlm.publish.distributed import group_rows

    env = _jinja_env()
    src = env.loader.get_source(env, "support.md.j2")[0]
    section = src[src.index("{% if distributed %}"):src.index("## Legend")]
    return env.from_string(section).render(distributed=group_rows(rows))
