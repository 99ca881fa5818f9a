"""The support table's families section: the newest sweep wins, declared families sort first, problems are noted."""

from __future__ import annotations

import json

from portvlm.publish import families, publish


def _sweep(version, rows):
    return {"transformers": version, "torch": "2.13.0+cpu", "rows": rows}


def _row(model_type, declared, status, vision="pass", text="pass", notes=()):
    return {"model_type": model_type, "declared": declared, "status": status, "vision": vision, "text": text,
            "vision_err": 1e-7 if vision == "pass" else None, "text_err": 2e-6 if text in ("pass", "fail") else None,
            "notes": list(notes)}


def test_latest_sweep_is_the_newest_version_and_declared_rows_come_first(tmp_path):
    folder = tmp_path / "families"
    folder.mkdir()
    (folder / "sweep-tf5.9.0.json").write_text(json.dumps(_sweep("5.9.0", [_row("old", False, "passes")])))
    rows = [_row("zeta", False, "fails", text="fail", notes=["text: leaked"]), _row("alpha", False, "not built",
            vision="not built", text="not built", notes=["tiny config: KeyError"]), _row("qwen3_5", True, "passes")]
    (folder / "sweep-tf5.24.0.json").write_text(json.dumps(_sweep("5.24.0", rows)))
    (folder / "sweep-broken.json").write_text("{")
    sweep, problems = families.latest(tmp_path)
    assert sweep.transformers == "5.24.0" and sweep.source == "sweep-tf5.24.0.json"
    assert [r.model_type for r in sweep.rows] == ["qwen3_5", "zeta", "alpha"]
    assert sweep.message == "1 declared · 1/3 pass generic" and sweep.color == "brightgreen"
    assert sweep.rows[1].why == "text: leaked" and sweep.rows[0].errors == "vision 1e-07 · text 2e-06"
    assert len(problems) == 1 and "sweep-broken.json" in problems[0]


def test_a_declared_family_failing_the_generic_path_turns_the_badge_red(tmp_path):
    (tmp_path / "families").mkdir()
    (tmp_path / "families" / "sweep-tf5.24.0.json").write_text(
        json.dumps(_sweep("5.24.0", [_row("glm4v", True, "fails", text="fail")])))
    sweep, _ = families.latest(tmp_path)
    assert families.endpoint(sweep)["color"] == "red"


def test_support_md_lists_every_swept_family_or_says_the_sweep_never_ran(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    out = tmp_path / "out"
    publish(results, out_dir=out)
    assert "The generic sweep has not run" in (out / "SUPPORT.md").read_text()
    assert json.loads((out / "site/badges/families.json").read_text())["message"] == "never run"
    (results / "families").mkdir()
    (results / "families" / "sweep-tf5.24.0.json").write_text(
        json.dumps(_sweep("5.24.0", [_row("qwen3_5", True, "passes"), _row("kimi_k25", False, "not applicable",
                                                                             vision="not applicable")])))
    publish(results, out_dir=out)
    text = (out / "SUPPORT.md").read_text()
    assert "| qwen3_5 | yes | passes |" in text and "| kimi_k25 | no | not applicable |" in text
    assert 'id="families-table"' in (out / "site/index.html").read_text()


def test_the_generic_sweep_names_its_version_floor_and_the_fix():
    from portvlm.models import generic

    (why,) = generic.sweep_reasons("4.57.6")
    assert f">= {generic.SWEEP_FROM}, found 4.57.6" in why and "declared family" in why
    assert generic.sweep_reasons(generic.SWEEP_FROM) == [] and generic.sweep_reasons("5.25.0") == []
