"""Package sources come from the user's own configuration; portvlm names no default index."""

from __future__ import annotations

import subprocess
from pathlib import Path

from portvlm import wheels

ROOT = Path(__file__).resolve().parents[2]


def _pip_says(text: str):
    return lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=text, stderr="")


def test_index_from_env_then_uv_toml_then_pip_config(tmp_path):
    home = {"XDG_CONFIG_HOME": str(tmp_path), "XDG_CONFIG_DIRS": str(tmp_path / "none")}
    pip = _pip_says("global.index-url='https://pip.example.internal/simple'\nglobal.find-links='/opt/wheels'\n")
    assert wheels.configured_index(home, run=pip) == "https://pip.example.internal/simple"
    (tmp_path / "uv").mkdir()
    (tmp_path / "uv" / "uv.toml").write_text('[[index]]\nurl = "https://uv.example.internal/simple"\ndefault = true\n')
    assert wheels.configured_index(home, run=pip) == "https://uv.example.internal/simple"
    env = {**home, "PIP_INDEX_URL": "https://env.example.internal/simple"}
    assert wheels.configured_index(env, run=pip) == "https://env.example.internal/simple"


def test_no_index_configured_means_none(tmp_path):
    home = {"XDG_CONFIG_HOME": str(tmp_path), "XDG_CONFIG_DIRS": str(tmp_path / "none")}
    pip = _pip_says("global.extra-index-url='file:///opt/pypi/simple'\nglobal.find-links='/opt/wheels'\n")
    assert wheels.configured_index(home, run=pip) is None


def test_find_links_and_torch_index_mirror():
    assert wheels.find_links_dirs({"PIP_FIND_LINKS": "/a /b"}) == ["/a", "/b"]
    assert wheels.find_links_dirs({"PORTVLM_FIND_LINKS": "/c", "PIP_FIND_LINKS": "/a"}) == ["/c"]
    assert wheels.torch_index("cu126", {"PORTVLM_TORCH_INDEX": "https://m.internal/torch/{variant}"}) == \
        "https://m.internal/torch/cu126"


def test_no_default_index_host_in_code_or_lock_headers():
    """The default index is the user's: no public index host in portvlm's code, scripts or lock headers."""
    hosts = ("pypi.org", "files.pythonhosted.org", "deb.debian.org")
    files = [*ROOT.glob("portvlm/**/*.py"), *ROOT.glob("portvlm/**/*.j2"), ROOT / "scripts" / "bootstrap-podman.sh"]
    headers = [p for p in ROOT.glob("containers/*/requirements.lock")]
    found = [str(p.relative_to(ROOT)) for p in files if any(h in p.read_text() for h in hosts)]
    found += [str(p.relative_to(ROOT)) for p in headers
              if any(h in "".join(line for line in p.read_text().splitlines(True) if line.startswith("#"))
                     for h in (*hosts, "download.pytorch.org"))]
    assert not found, found
