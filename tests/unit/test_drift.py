"""The upstream drift lane without torch: version choice from index listings, the symbol scan, answer and symbol
comparison, the report, and the whole lane with a fake "newest" release (faked index, envs, probes and cells)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from portvlm.drift import lane, probe, report, resolve, symbols
from portvlm.matrix import expand, load_matrix, parse_matrix, select
from portvlm.records import CellResult, Check, SuiteResult
from portvlm.shims import versions

ROOT = Path(__file__).resolve().parents[2]
LINUX = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "linux_x86_64"]


def files(*names, **kw):
    return tuple(resolve.IndexFile(n, **kw) for n in names)


# -- resolve --------------------------------------------------------------------------------------------------------


def test_newest_skips_prereleases_yanked_and_python_it_cannot_run():
    listings = [
        resolve.Listing("idx", files("transformers-5.23.0-py3-none-any.whl", "transformers-5.24.0.tar.gz",
                                     "transformers-5.25.0rc1-py3-none-any.whl", "transformers-5.26.0.dev0.tar.gz",
                                     "not-transformers-9.0.0-py3-none-any.whl")
                        + files("transformers-5.25.0-py3-none-any.whl", yanked=True)
                        + files("transformers-6.0.0-py3-none-any.whl", requires_python=">=3.12")),
    ]
    assert resolve.newest("transformers", listings, python="3.11") == (versions.parse("5.24.0"), "idx")
    assert resolve.newest("transformers", listings, python="3.12")[0] == versions.parse("6.0.0")
    assert resolve.newest("transformers", [resolve.Listing("x", error="down")], python="3.11") is None


def test_newest_torch_cpu_is_the_newest_plus_cpu_wheel_this_python_and_platform_can_install():
    tags = resolve.target_tags("3.11", LINUX)
    listings = [
        resolve.Listing("/wheels", files("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")),
        resolve.Listing("pytorch-cpu", files(
            "torch-2.15.0+cpu-cp312-cp312-manylinux_2_28_x86_64.whl",   # other python
            "torch-2.14.0+cpu-cp311-cp311-macosx_11_0_arm64.whl",        # other platform
            "torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl",        # the default index's CUDA build: no +cpu
            "torch-2.14.0+cu126-cp311-cp311-manylinux_2_28_x86_64.whl",
            "torch-2.12.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")),
    ]
    got = resolve.newest("torch", listings, python="3.11", wheel_tags=tags, local="cpu", sdists=False)
    assert got == (versions.parse("2.13.0+cpu"), "/wheels")
    listings[1] = resolve.Listing("pytorch-cpu", files("torch-2.14.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"))
    assert str(resolve.newest("torch", listings, python="3.11", wheel_tags=tags, local="cpu")[0]) == "2.14.0+cpu"


def test_simple_api_pages_parse_as_json_and_html():
    body = json.dumps({"files": [{"filename": "transformers-5.24.0-py3-none-any.whl", "yanked": False,
                                  "requires-python": ">=3.10"},
                                 {"filename": "transformers-5.23.9-py3-none-any.whl", "yanked": "broken"}]})
    got = resolve.parse_simple(body.encode(), "application/vnd.pypi.simple.v1+json")
    assert got[0] == resolve.IndexFile("transformers-5.24.0-py3-none-any.whl", False, ">=3.10") and got[1].yanked
    page = (b'<html><body><a href="../../t/transformers-5.24.0.tar.gz#sha256=ab" data-requires-python="&gt;=3.10">'
            b'transformers-5.24.0.tar.gz</a><a href="x/transformers-5.23.0.tar.gz" data-yanked="">x</a></body></html>')
    got = resolve.parse_simple(page, "text/html")
    assert got[0] == resolve.IndexFile("transformers-5.24.0.tar.gz", False, ">=3.10")
    assert got[1].yanked


def test_resolvers_read_the_configured_index_and_local_wheels_and_note_unreachable_sources(tmp_path):
    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    asked = []

    def fetch(index, project):
        asked.append((index, project))
        if project == "torch":
            return resolve.Listing(index, error="URLError: no route")
        return resolve.Listing(index, files("transformers-5.24.0-py3-none-any.whl", "transformers-5.23.0.tar.gz"))

    env = {"UV_DEFAULT_INDEX": "https://mirror.example/simple", "PORTVLM_FIND_LINKS": str(tmp_path)}
    tf = resolve.resolve_transformers(python="3.11", environ=env, fetch=fetch)
    assert (tf.version, tf.source) == ("5.24.0", "https://mirror.example/simple")
    th = resolve.resolve_torch_cpu(python="3.11", environ=env, fetch=fetch, platforms=LINUX)
    assert (th.version, th.source) == ("2.13.0+cpu", str(tmp_path))
    assert asked[-1] == ("https://download.pytorch.org/whl/cpu", "torch")
    assert any("download.pytorch.org" in n and "no route" in n for n in th.notes)
    with pytest.raises(LookupError, match="--torch"):
        resolve.resolve_torch_cpu(python="3.11", environ={}, fetch=fetch, platforms=LINUX)


def test_without_a_configured_index_uv_resolves_from_its_own_default():
    """portvlm names no index host: with none configured, uv's default answers (faked here)."""
    import subprocess

    seen = {}

    def run(cmd, **kw):
        seen["cmd"], seen["input"] = cmd, kw["input"]
        return subprocess.CompletedProcess(cmd, 0, stdout="transformers==5.24.0\n", stderr="")

    got = resolve.uv_default("transformers", "3.11", run=run)
    assert got.files[0].filename == "transformers-5.24.0-py3-none-any.whl" and got.error is None
    assert seen["input"].strip() == "transformers" and seen["cmd"][-2:] == ["--python-version", "3.11"]
    fail = resolve.uv_default("transformers", "3.11", run=lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, stdout="", stderr="error: no network"))
    assert fail.files == () and fail.error == "error: no network"


def test_index_credentials_never_reach_the_report():
    assert resolve._redact("https://user:s3cret@mirror.example:8443/simple") == "https://mirror.example:8443/simple"


# -- symbols and answers ------------------------------------------------------------------------------------------------


def test_scan_finds_imports_attribute_chains_and_module_aliases():
    src = (
        "import transformers\n"
        "from transformers import DynamicCache, modeling_utils\n"
        "def f(m):\n"
        "    transformers.AttentionInterface.register('x', f)\n"
        "    m = transformers.AttentionMaskInterface._global_mapping['sdpa']\n"
        "    DynamicCache.update\n"
        "    return modeling_utils.ALL_ATTENTION_FUNCTIONS, transformers.__version__\n"
    )
    found = symbols.scan_source(src, "x.py")
    assert set(found) == {
        "transformers.DynamicCache", "transformers.modeling_utils", "transformers.AttentionInterface.register",
        "transformers.AttentionMaskInterface._global_mapping", "transformers.DynamicCache.update",
        "transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS",
    }
    assert found["transformers.AttentionInterface.register"] == ["x.py:4"]


def test_every_shim_declares_its_anchors_and_the_package_scan_sees_portvlms_uses():
    from portvlm.shims.patch import SHIMS

    assert set(symbols.anchors()) == {s.name for s in SHIMS} | {"model_io"}
    assert "transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLTextModel.forward" in symbols.anchors()["model_io"]
    names = {s.name: s.used_at for s in symbols.scan_package(ROOT / "portvlm")}
    assert "transformers.AttentionInterface.register" in names  # portvlm/shims/attention.py uses it
    assert any(u.startswith("portvlm/shims/attention.py:") for u in names["transformers.AttentionInterface.register"])
    assert not any(u.startswith("portvlm/drift/") for used in names.values() for u in used)


def test_compare_symbols_reports_missing_moved_and_resigned_names_the_baseline_had():
    base = {"a.gone": {"found": True}, "a.moved": {"found": True, "home": "m.old"},
            "a.sig": {"found": True, "home": "m", "params": ["self", "max_length"]},
            "a.never": {"found": False, "missing": "x"}, "a.same": {"found": True, "home": "m", "params": ["x"]}}
    new = {"a.gone": {"found": False, "missing": "LookupError: no gone", "defined_in": ["transformers.elsewhere"]},
           "a.moved": {"found": True, "home": "m.new"}, "a.sig": {"found": True, "home": "m", "params": ["self", "n"]},
           "a.never": {"found": False}, "a.same": {"found": True, "home": "m", "params": ["x"]}}
    got = {(c.name, c.kind): c for c in symbols.compare_symbols(base, new, {"a.gone": ("p.py:1",)})}
    assert set(got) == {("a.gone", "missing"), ("a.moved", "moved"), ("a.sig", "signature")}
    assert "transformers.elsewhere" in got[("a.gone", "missing")].detail and got[("a.gone", "missing")].used_at == ("p.py:1",)
    assert got[("a.sig", "signature")].detail == "(self, max_length) → (self, n) [removed max_length; added n]"


def test_compare_answers_names_each_shim_that_changed_per_model():
    base = {"m": {"kv_cache": {"applies": True, "detail": []}, "vision": {"applies": False, "detail": ["no"]}}}
    new = {"m": {"kv_cache": {"applies": False, "detail": ["layout unknown"]}, "vision": {"applies": False,
                                                                                      "detail": ["other words"]}},
           "n": {"error": "UnsupportedError: boom"}}
    got = probe.compare_answers(base, new)
    assert [(c.model, c.shim, c.baseline, c.newest) for c in got] == [
        ("m", "kv_cache", "applies", "does not apply"), ("n", "patch", "patch error: not probed",
                                                          "patch error: UnsupportedError: boom")]


# -- report ---------------------------------------------------------------------------------------------------------


def cell(status, suites=None, error=None, name="cpu--m--drift-tf9.0.0"):
    return CellResult(cell=name, arch="cpu", model="m", stack={}, expected="pass", status=status, evidence="hardware",
                      suites=suites or {}, error=error, timings={"total_s": 12.0})


def test_first_failure_is_the_first_failing_check_in_suite_order():
    suites = {"parity": SuiteResult("parity", "pass", checks=[Check("logits", True)]),
              "training": SuiteResult("training", "fail", checks=[Check("loss", True), Check("grads", False,
                                                                                       detail="grad err 0.3 > 1e-4")]),
              "streaming": SuiteResult("streaming", "fail", checks=[Check("sink", False)])}
    assert report.first_failure(cell("fail", suites)) == {"suite": "training", "check": "grads",
                                                          "detail": "grad err 0.3 > 1e-4"}
    crashed = cell("error", error="Traceback …\nImportError: cannot import name 'X'")
    assert report.first_failure(crashed)["detail"] == "ImportError: cannot import name 'X'"
    assert report.first_failure(cell("pass")) is None


def test_retired_shims_do_not_count_as_broken():
    changes = [probe.AnswerChange("m", "text_classes", "applies", "does not apply", "written for <4.53"),
               probe.AnswerChange("m", "kv_cache", "applies", "does not apply", "layout unknown"),
               probe.AnswerChange("m", "vision", "does not apply", "applies", "")]
    gone = [symbols.SymbolChange("t.X", "missing", "gone", ("shim text_classes",)),
            symbols.SymbolChange("t.Y", "missing", "gone", ("portvlm/a.py:3",)),
            symbols.SymbolChange("t.Z", "signature", "(a) → (b)", ("portvlm/a.py:4",))]
    reasons = report.broken_reasons([], changes, gone, retired=["text_classes"])
    assert len(reasons) == 2 and "kv_cache" in reasons[0] and reasons[1].startswith("t.Y is gone")


def make_tested(version="9.0.0", verified=False):
    return report.Tested(version, "2.13.0+cpu", "3.11", verified, ">=4.49.0, <=5.23.x", "https://idx/simple",
                         "/wheels")


def test_reports_are_never_overwritten_and_carry_no_machine_paths(tmp_path):
    rec = report.build_report(tested_at="2026-12-02T03:17:00+00:00", tested=make_tested(), baseline=None, cells=[cell("pass")],
                              newest_probe={"shims": {}, "symbols": {"a": {}}}, baseline_probe=None, changes=[],
                              symbol_changes=[], notes=["built in /machine/envs/py3.11-x"])
    assert rec["status"] == report.OK and rec["symbols_checked"] == 1
    first = report.write_report(rec, tmp_path, redact={"/machine/envs": "<envs>"})
    second = report.write_report(rec, tmp_path, redact={"/machine/envs": "<envs>"})
    assert first.name == "2026-12-02-tf9.0.0-torch2.13.0+cpu.json" and second.name.endswith("+cpu-2.json")
    assert first.with_suffix(".md").exists() and second.with_suffix(".md").exists()
    assert "/machine" not in first.read_text() and "<envs>/py3.11-x" in first.read_text()
    (tmp_path / "drift" / "junk.json").write_text("{")
    reports, problems = report.read_reports(tmp_path)
    assert [p.name for p, _ in reports] == [first.name, second.name] and problems == [
        "drift/junk.json: unreadable drift report (JSONDecodeError)"]


# -- the lane, end to end with a fake newest release ------------------------------------------------------------------


def fake_probe(answers_kv: bool, symbols_found: bool):
    def probe_env(python, syms, models, *, cwd):
        shims = {m: {"kv_cache": {"applies": answers_kv, "detail": ["layers" if answers_kv else "no layout"]}}
                 for m in models}
        found = {s.name: ({"found": True, "home": "transformers.cache_utils", "params": None} if symbols_found
                          or s.name != "transformers.DynamicCache.update" else {"found": False, "missing": "gone"})
                 for s in syms}
        return {"versions": {"python": "3.11.7", "transformers": python}, "shims": shims, "symbols": found}
    return probe_env


def run_fake(tmp_path, *, newest_ok: bool, version="9.0.0", cell_status="pass", **kw):
    envs_built, cells_asked = [], []

    def ensure_env(spec):
        envs_built.append(spec)
        return f"/envs/{spec.key}/bin/python"

    baseline_probe, newest_probe = fake_probe(True, True), fake_probe(newest_ok, newest_ok)

    def probe_env(python, syms, models, *, cwd):
        return (newest_probe if f"tf{version}" in python else baseline_probe)(python, syms, models, cwd=cwd)

    def cells_runner(matrix_text, **kwargs):
        cells_asked.append(kwargs)
        suites = {"parity": SuiteResult("parity", cell_status, checks=[Check("logits", cell_status == "pass",
                                                                             detail="err 0.5 > 1e-4")])}
        return [cell(cell_status, suites, name=f"cpu--{m}--drift-tf{version}") for m in kwargs["models"]]

    kw.setdefault("check_installable", lambda project, version, python: resolve.Installability(True))
    rec, path = lane.run_drift(
        resolve_transformers=lambda python: resolve.Resolved("transformers", version, "https://fake-index/simple"),
        resolve_torch=lambda python: resolve.Resolved("torch", "2.13.0+cpu", "/wheels", ("pytorch.org unreachable",)),
        ensure_env=ensure_env, probe_env=probe_env, cells_runner=cells_runner, results_dir=tmp_path,
        say=lambda *_: None, now=lambda: __import__("datetime").datetime(2026, 12, 2, 3, 17), **kw)
    return rec, path, envs_built, cells_asked


def test_a_fake_unverified_release_that_breaks_nothing_is_ok(tmp_path):
    rec, path, built, asked = run_fake(tmp_path, newest_ok=True, models=["qwen2_5vl", "llava"])
    assert rec["status"] == "ok" and not rec["broken"] and not rec["probe_changes"] and not rec["symbol_changes"]
    assert rec["newest"]["transformers"] == "9.0.0" and rec["newest"]["verified"] is False
    assert rec["newest"]["transformers_source"] == "https://fake-index/simple"
    newest_ci = max((s for s in load_matrix().stacks if s.ci and s.torch_variant == "cpu"),
                    key=lambda s: versions.parse(s.transformers))
    assert rec["baseline"]["stack"] == newest_ci.id  # measured against the newest verified CI stack
    assert [s.transformers for s in built] == ["9.0.0", newest_ci.transformers] and built[0].torch == "2.13.0+cpu"
    assert asked[0]["models"] == ["qwen2_5vl", "llava"] and asked[0]["transformers"] == "9.0.0"
    assert "pytorch.org unreachable" in rec["notes"]
    assert path.exists() and "Status: ok" in path.with_suffix(".md").read_text()


def test_a_fake_release_that_breaks_a_shim_is_broken_and_says_where(tmp_path, capsys, monkeypatch):
    rec, path, _, _ = run_fake(tmp_path, newest_ok=False, cell_status="fail", models=["qwen2_5vl"])
    assert rec["status"] == "broken"
    assert [(c["shim"], c["baseline"], c["newest"]) for c in rec["probe_changes"]] == [
        ("kv_cache", "applies", "does not apply")]
    assert [(s["name"], s["kind"]) for s in rec["symbol_changes"]] == [("transformers.DynamicCache.update", "missing")]
    assert rec["cells"][0]["first_failure"] == {"suite": "parity", "check": "logits", "detail": "err 0.5 > 1e-4"}
    md = path.with_suffix(".md").read_text()
    assert "parity: logits: err 0.5 > 1e-4" in md and "`transformers.DynamicCache.update` | missing" in md
    # the CLI's exit status follows the verdict (1: upstream broke a shim), as CI's red badge does
    monkeypatch.setattr(lane, "run_drift", lambda **kw: (rec, path))
    assert lane.main(["--transformers", "9.0.0"]) == 1
    assert "broken:" in capsys.readouterr().out


def test_newest_inside_the_verified_range_is_reported_verified(tmp_path):
    newest_ci = max((s for s in load_matrix().stacks if s.ci and s.torch_variant == "cpu"),
                    key=lambda s: versions.parse(s.transformers))
    rec, _, built, _ = run_fake(tmp_path, newest_ok=True, version=newest_ci.transformers, models=["llava"])
    assert rec["newest"]["verified"] is True and rec["status"] == "ok"
    assert rec["baseline"]["transformers"] == newest_ci.transformers and len(built) == 2
    assert any("its answers are the baseline's" in n for n in rec["notes"])


def test_bad_arguments_are_refused_with_the_fix(tmp_path, capsys):
    assert lane.main(["--models", "gpt2", "--results", str(tmp_path)]) == 2
    assert "--models takes ids of qwen2_5vl" in capsys.readouterr().err
    assert lane.main(["--transformers", "latest", "--results", str(tmp_path)]) == 2
    assert "not a version" in capsys.readouterr().err
    assert lane.main(["--torch", "2.13.0", "--results", str(tmp_path)]) == 2  # PyPI's 2.13.0 is a CUDA build
    assert "not a CPU build" in capsys.readouterr().err


def test_drift_matrix_adds_the_tested_stack_as_the_cpu_archs_only_one():
    text, stack_id = lane.drift_matrix_text(Path(ROOT / "matrix.yaml").read_text(), transformers="4.50.3",
                                            torch="2.13.0+cpu", python="3.11")
    cells = select(expand(parse_matrix(text, "drift.yaml")), arch="cpu")
    assert stack_id == "drift-tf4.50.3" and {c.stack.id for c in cells} == {stack_id}
    assert {c.model.id: c.expected for c in cells}["qwen3vl"] == "excluded"  # the matrix's expectations still apply
    stack = cells[0].stack
    assert (stack.torch, stack.torch_variant, stack.transformers, stack.ci) == ("2.13.0", "cpu", "4.50.3", False)


# -- a release the user's index cannot install (an unsatisfiable pin) --------------------------------------------------

# What uv 0.13 prints for `transformers==5.25.0` on an index whose newest kernels is 0.17.2 (seen on this project's).
UV_NO_SOLUTION = """error: No solution found when resolving dependencies:
  cause: Because only kernels<=0.17.2 is available and transformers>=5.25.0 depends on kernels>=0.19.1,<0.20, we
can conclude that transformers>=5.25.0 cannot be used.
      And because you require transformers==5.25.0, we can conclude that your requirements are unsatisfiable.
"""


def test_uvs_no_solution_is_read_as_the_unsatisfiable_pin():
    got = resolve.parse_conflict(UV_NO_SOLUTION)
    assert (got.ok, got.package, got.needs, got.index_has) == (False, "kernels", "kernels>=0.19.1,<0.20", "0.17.2")
    assert got.line == "released; not installable from your index: needs kernels>=0.19.1, index has 0.17.2"
    other = resolve.parse_conflict("error: No solution found\n  cause: transformers==9.9.9 has no wheels for py3.11")
    assert other.package is None and "resolver refused it" in other.line and "9.9.9" in other.line


def test_check_installable_reads_uv_and_never_calls_an_unreachable_index_uninstallable():
    class Proc:
        def __init__(self, rc, err=""):
            self.returncode, self.stderr, self.stdout = rc, err, ""

    args = {}

    def run(cmd, **kw):
        args["cmd"], args["input"] = cmd, kw.get("input")
        return Proc(1, UV_NO_SOLUTION)

    env = {"UV_DEFAULT_INDEX": "https://mirror.example/simple", "PORTVLM_FIND_LINKS": "/wheels"}
    got = resolve.check_installable("transformers", "5.25.0", python="3.11", environ=env, run=run)
    assert got.package == "kernels" and args["input"] == "transformers==5.25.0\n"
    assert "https://mirror.example/simple" in args["cmd"] and "/wheels" in args["cmd"]
    assert resolve.check_installable("transformers", "5.25.0", python="3.11", environ=env,
                                     run=lambda cmd, **kw: Proc(0)).ok
    offline = resolve.check_installable("transformers", "5.25.0", python="3.11", environ=env,
                                        run=lambda cmd, **kw: Proc(2, "error: Failed to fetch: connection refused"))
    assert offline is None


def test_a_release_with_an_unsatisfiable_pin_is_reported_and_run_with_the_override_it_can_try(tmp_path, monkeypatch):
    conflict = lambda project, version, python: resolve.parse_conflict(UV_NO_SOLUTION)  # noqa: E731
    rec, path, built, asked = run_fake(tmp_path, newest_ok=True, models=["llava"], check_installable=conflict)
    assert rec["status"] == "ok"  # not a crash, not "no new release": the release ran, with the override
    line = "released; not installable from your index: needs kernels>=0.19.1, index has 0.17.2"
    assert rec["installable"]["line"] == line and line in report.verdict_line(rec)
    assert "ran with kernels left out" in report.verdict_line(rec)
    (override,) = rec["installable"]["overrides"]
    assert override["declared"] is False and override["install"] == "none" and "suggested" in override["reason"]
    assert "overrides: [{package: kernels" in rec["installable"]["declare"]
    base = load_matrix().stack(rec["baseline"]["stack"])
    assert built[0].excludes == ("kernels",)  # the newest env; the baseline's is its stack's own declaration
    assert built[1].excludes == tuple(o.package for o in base.overrides if o.excluded)
    assert [o.package for o in asked[0]["overrides"]] == ["kernels"]  # the cells' stack carries it (and records it)
    md = path.with_suffix(".md").read_text()
    assert f"**{line}.**" in md and "suggested, not declared" in md
    monkeypatch.setattr(lane, "run_drift", lambda **kw: (rec, path))
    assert lane.main(["--transformers", "9.0.0"]) == 0


def test_an_unsatisfiable_release_that_matrix_yaml_declares_runs_with_the_declared_override(tmp_path):
    conflict = lambda project, version, python: resolve.parse_conflict(UV_NO_SOLUTION)  # noqa: E731
    rec, _, built, _ = run_fake(tmp_path, newest_ok=True, version="5.25.0", models=["llava"], check_installable=conflict)
    (override,) = rec["installable"]["overrides"]
    assert override["declared"] is True and "0.17.2" in override["reason"] and "declare" not in rec["installable"]
    assert all(spec.excludes == ("kernels",) for spec in built)  # 5.25.0 is also the baseline CI stack


def test_the_drift_stack_carries_the_override_into_its_cells():
    from portvlm.matrix.schema import Override

    o = Override("kernels", "kernels>=0.19.1,<0.20", "none", "index has 0.17.2")
    text, stack_id = lane.drift_matrix_text(Path(ROOT / "matrix.yaml").read_text(), transformers="9.0.0",
                                            torch="2.13.0+cpu", python="3.11", overrides=[o])
    stack = parse_matrix(text, "drift.yaml").stack(stack_id)
    assert stack.overrides == (o,)
