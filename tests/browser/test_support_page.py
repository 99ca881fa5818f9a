"""The published support page in a real headless browser: it renders, every cell links to its result, badges show.

Nothing goes over the network: the page is read from file:// or served on 127.0.0.1 from a thread.
Chromium is looked up as $PORTVLM_CHROMIUM, then chromium / chromium-browser / google-chrome on PATH;
the tests skip (saying so) where none is installed. Set PORTVLM_SCREENSHOT=path.png to keep the screenshot.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
import shutil
import struct
import subprocess
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from portvlm.matrix import expand, load_matrix
from portvlm.publish import publish
from portvlm.run.results import CellResult, Check, SuiteResult, write_result

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Flags that keep a headless chromium off the network and out of the user's profile.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--hide-scrollbars", "--mute-audio",
)
PLATFORMS = ("cpu", "sm70", "sm80+", "sm100", "sm120", "gfx90a", "gfx942")


def find_chromium() -> str | None:
    explicit = os.environ.get("PORTVLM_CHROMIUM")
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def chromium():
    exe = find_chromium()
    if exe is None:
        pytest.skip(f"no headless chromium found (tried $PORTVLM_CHROMIUM, {', '.join(BROWSERS)}); "
                    "install it with `apt-get install -y chromium`")
    return exe


def run_chromium(exe: str, profile: Path, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HOME": str(profile)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _result(cell, status: str, evidence: str, *, reason=None, parity=2.0e-6, error=None) -> CellResult:
    suites = {
        "parity": SuiteResult("parity", "pass" if status not in ("fail", "xfail") else "fail",
                              figures={"max_abs_err": parity},
                              checks=[Check("vision_packed", status not in ("fail", "xfail"), value=parity, bound=1e-4,
                                            detail=f"max abs err {parity:.1e} vs atol 1e-4")]),
        "training": SuiteResult("training", "pass", figures={"step_time_s": 0.42}),
    }
    return CellResult(cell=cell.id, arch=cell.arch.id, model=cell.model.id, stack={"id": cell.stack.id},
                      expected=cell.expected, status=status, evidence=evidence, reason=reason,
                      suites={} if status in ("error", "timeout") else suites, error=error)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site published from the real matrix.yaml and results covering each status and evidence level."""
    tmp = tmp_path_factory.mktemp("publish")
    matrix = load_matrix(ROOT / "matrix.yaml")
    cells = [c for c in expand(matrix) if c.expected != "excluded"]
    by_arch: dict[str, list] = {}
    for c in cells:
        by_arch.setdefault(c.arch.id, []).append(c)
    plan = [
        ("cpu", "pass", "hardware", {}), ("cpu", "pass", "hardware", {}), ("cpu", "fail", "hardware", {"parity": 0.31}),
        ("cpu", "error", "hardware", {"error": "Traceback ...\nImportError: cannot import name 'X'"}),
        ("cpu", "skipped", "built", {"reason": "torch wheel not available for this python"}),
        ("sm70", "pass", "emulated", {}), ("sm70", "xfail", "emulated", {"reason": "Volta: no bf16", "parity": 0.2}),
        ("sm80", "pass", "hardware", {}), ("sm90", "pass", "hardware", {}), ("sm90", "xpass", "hardware", {}),
        ("gfx90a", "timeout", "built", {"error": "cell exceeded 900s"}), ("gfx942", "pass", "built", {}),
    ]
    results = tmp / "results"
    used: dict[str, int] = {}
    for arch, status, evidence, kw in plan:
        cell = by_arch[arch][used.get(arch, 0)]
        used[arch] = used.get(arch, 0) + 1
        write_result(_result(cell, status, evidence, **kw), results)
    (results / "half-written.json").write_text('{"schema": "portvlm.cell-result/1", "cell": ')
    publish(results, matrix, tmp)
    return {"root": tmp, "site": tmp / "site", "n_results": len(plan), "cells": expand(matrix)}


class _Dom(HTMLParser):
    """Just enough of the DOM: the cells, their links and the badge images."""

    def __init__(self):
        super().__init__()
        self.cells: list[dict] = []
        self.badges: list[dict] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "cell" in (a.get("class") or "").split():
            self.cells.append({**a, "links": []})
        elif tag == "a" and a.get("class") == "result" and self.cells:
            self.cells[-1]["links"].append(a["href"])
        elif tag == "img" and a.get("data-platform"):
            self.badges.append(a)

    def handle_data(self, data):
        self.text.append(data)


def test_page_renders_every_cell_with_a_resolving_link(chromium, site, tmp_path):
    dom_text = run_chromium(chromium, tmp_path / "profile", "--dump-dom", (site["site"] / "index.html").as_uri())
    dom = _Dom()
    dom.feed(dom_text)
    assert "portvlm support matrix" in "".join(dom.text)
    assert len(dom.cells) == len(site["cells"]), "every expanded matrix cell is in the page"
    linked = [c for c in dom.cells if c["links"]]
    assert len(linked) == site["n_results"]
    for cell in dom.cells:
        if "data-result" in cell:
            assert cell["links"] == [f"results/{cell['id']}.json"]
            target = site["site"] / cell["links"][0]
            assert target.is_file() and json.loads(target.read_text())["cell"] == cell["id"]
        else:
            assert not cell["links"] and cell["data-status"] in ("not run", "excluded")
            assert cell["data-evidence"] == "none"
    assert {c["data-evidence"] for c in dom.cells} == {"hardware", "emulated", "built", "none"}
    assert sorted(b["data-platform"] for b in dom.badges) == sorted(PLATFORMS)
    for badge in dom.badges:
        assert (site["site"] / badge["src"]).is_file()
    assert "half-written.json" in "".join(dom.text), "an unreadable result is noted on the page"


CHECK_PAGE = """<!DOCTYPE html>
<html><body><pre id="verdict">pending</pre>
<iframe id="page" src="index.html" style="width:1400px;height:1000px"></iframe>
<script>
const frame = document.getElementById('page');
frame.addEventListener('load', async () => {
  const d = frame.contentDocument, out = {cells: [], links: [], badges: []};
  for (const td of d.querySelectorAll('td.cell')) {
    const box = td.getBoundingClientRect();
    out.cells.push({id: td.id, status: td.dataset.status, bg: getComputedStyle(td).backgroundColor,
                    w: box.width, h: box.height});
  }
  for (const a of d.querySelectorAll('td.cell a.result')) {
    try { const r = await fetch(a.href); const j = r.ok ? await r.json() : null;
          out.links.push({href: a.getAttribute('href'), cell: a.closest('td').id, ok: r.ok, got: j && j.cell}); }
    catch (e) { out.links.push({href: a.getAttribute('href'), ok: false, error: String(e)}); }
  }
  for (const img of d.querySelectorAll('#badges img')) {
    try { await img.decode(); } catch (e) {}
    out.badges.push({src: img.getAttribute('src'), w: img.naturalWidth, h: img.naturalHeight});
  }
  document.getElementById('verdict').textContent = JSON.stringify(out);
});
</script></body></html>
"""


@pytest.fixture()
def served(site):
    """The site on 127.0.0.1 (an ephemeral port), from a thread; a check page beside it."""
    (site["site"] / "_check.html").write_text(CHECK_PAGE)
    handler = functools.partial(_QuietHandler, directory=str(site["site"]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        (site["site"] / "_check.html").unlink()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_links_resolve_and_badges_load_in_the_browser(chromium, site, served, tmp_path):
    dom = run_chromium(chromium, tmp_path / "profile", "--virtual-time-budget=15000", "--dump-dom",
                       f"{served}/_check.html")
    m = re.search(r'<pre id="verdict">(.*?)</pre>', dom, re.S)
    assert m and m.group(1) != "pending", dom[-2000:]
    verdict = json.loads(html.unescape(m.group(1)))
    assert len(verdict["cells"]) == len(site["cells"])
    assert all(c["w"] > 40 and c["h"] > 10 for c in verdict["cells"]), "every cell is laid out visibly"
    assert len(verdict["links"]) == site["n_results"]
    for link in verdict["links"]:
        assert link["ok"] and link["got"] == link["cell"], link
    assert sorted(b["src"] for b in verdict["badges"]) == sorted(f"badges/{p}.svg" for p in PLATFORMS)
    for badge in verdict["badges"]:
        assert badge["w"] > 60 and badge["h"] == 20, badge  # the SVG decoded and has its drawn size
    # Status is visible as colour too: a pass, a failure and a not-run cell have different backgrounds.
    bg = {c["status"]: c["bg"] for c in verdict["cells"]}
    assert len({bg["pass"], bg["fail"], bg["not run"]}) == 3


def test_screenshot(chromium, site, tmp_path):
    shot = tmp_path / "support.png"
    run_chromium(chromium, tmp_path / "profile", "--window-size=1500,1400", f"--screenshot={shot}",
                 (site["site"] / "index.html").as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1500, 1400)
    assert len(data) > 30_000, "a blank page compresses to almost nothing"
    keep = os.environ.get("PORTVLM_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
