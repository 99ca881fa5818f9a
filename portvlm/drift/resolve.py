"""The newest releases the user's package index offers: transformers, and torch with a CPU build.

Where versions come from is what the cell environments install from (``portvlm.wheels``, ``run.env.ensure_env``):
transformers from the default index the user configured (when they configured none, uv resolves it from its own
default: portvlm names no index host) and the local wheel directories; a ``+cpu`` torch from those directories and PyTorch's CPU index (``$PORTVLM_TORCH_INDEX`` mirrors it) —
on Linux the default index's torch is a CUDA build, so "newest torch with a CPU build" means the newest ``+cpu``
wheel for the target Python and this platform. Listings are read through the simple API (PEP 691 JSON, else the
PEP 503 HTML page). An index that cannot be reached is a note in the report, not a failure, as long as another
source answers.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from packaging import tags as _tags
from packaging.utils import InvalidSdistFilename, InvalidWheelFilename, parse_sdist_filename, parse_wheel_filename

from portvlm import versions
from portvlm.wheels import configured_index, find_links_dirs, torch_index, uv_bin

JSON_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"


@dataclass(frozen=True)
class IndexFile:
    """One distribution file a source lists (the fields of the simple API that choose a version)."""

    filename: str
    yanked: bool = False
    requires_python: str | None = None


@dataclass(frozen=True)
class Listing:
    """What one source (an index page or a wheel directory) lists for a project, or why it could not be read."""

    source: str
    files: tuple[IndexFile, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class Resolved:
    """A chosen version, where it was found, and what else the resolver had to say."""

    project: str
    version: str  # "5.24.0", "2.13.0+cpu"
    source: str  # the index / directory that listed it, or "forced by --..."
    notes: tuple[str, ...] = field(default=(), compare=False)


# -- pure core ---------------------------------------------------------------------------------------------------


def file_version(project: str, filename: str) -> tuple[versions.Version, frozenset | None] | None:
    """``(version, wheel tags or None for an sdist)`` of a distribution file of ``project``; ``None`` otherwise."""
    want = project.lower().replace("_", "-")
    try:
        if filename.endswith(".whl"):
            name, version, _, wheel_tags = parse_wheel_filename(filename)
            return (version, frozenset(wheel_tags)) if name == want else None
        name, version = parse_sdist_filename(filename)
        return (version, None) if name == want else None
    except (InvalidWheelFilename, InvalidSdistFilename, ValueError):
        return None


def target_tags(python: str, platforms: Iterable[str] | None = None) -> frozenset:
    """Wheel tags an interpreter ``python`` ("3.11") accepts on ``platforms`` (default: this machine's)."""
    pyver = tuple(int(p) for p in python.split(".")[:2])
    plats = list(platforms) if platforms is not None else list(_tags.platform_tags())
    return frozenset(_tags.cpython_tags(pyver, platforms=plats)) | frozenset(_tags.compatible_tags(pyver, platforms=plats))


def newest(project: str, listings: Iterable[Listing], *, python: str, wheel_tags: frozenset | None = None,
           local: str | None = None, sdists: bool = True) -> tuple[versions.Version, str] | None:
    """The newest final release of ``project`` across ``listings``: ``(version, source)``, or ``None``.

    Skips pre/dev releases, yanked files, files whose ``Requires-Python`` excludes ``python``, wheels whose tags
    ``wheel_tags`` does not accept (when given), sdists unless ``sdists``; ``local`` keeps only versions with that
    local tag ("cpu": ``2.13.0+cpu``), otherwise local versions are skipped.
    """
    best: tuple[versions.Version, str] | None = None
    for listing in listings:
        for f in listing.files:
            parsed = file_version(project, f.filename)
            if parsed is None or f.yanked:
                continue
            version, ftags = parsed
            if version.is_prerelease or version.is_devrelease or version.local != local:
                continue
            if ftags is None and not sdists:
                continue
            if ftags is not None and wheel_tags is not None and not (ftags & wheel_tags):
                continue
            if f.requires_python and not _python_ok(f.requires_python, python):
                continue
            if best is None or version > best[0]:
                best = (version, listing.source)
    return best


def _python_ok(requires: str, python: str) -> bool:
    try:
        return versions.contains(requires, python + ".0" if python.count(".") == 1 else python)
    except versions.InvalidSpecifier:
        return True  # an unreadable Requires-Python does not hide a release; the install will say


def parse_simple(body: bytes, content_type: str) -> tuple[IndexFile, ...]:
    """Files of one project page of the simple API: PEP 691 JSON or PEP 503 HTML."""
    if "json" in content_type:
        data = json.loads(body)
        return tuple(IndexFile(f["filename"], bool(f.get("yanked")), f.get("requires-python"))
                     for f in data.get("files", []))
    parser = _Anchors()
    parser.feed(body.decode("utf-8", "replace"))
    return tuple(parser.files)


class _Anchors(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.files: list[IndexFile] = []
        self._attrs: dict | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._attrs, self._text = dict(attrs), []

    def handle_data(self, data):
        if self._attrs is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag != "a" or self._attrs is None:
            return
        href = self._attrs.get("href") or ""
        name = "".join(self._text).strip() or urllib.parse.unquote(href.split("#")[0].rsplit("/", 1)[-1])
        self.files.append(IndexFile(name, "data-yanked" in self._attrs, self._attrs.get("data-requires-python")))
        self._attrs = None


# -- thin shell: reading sources ----------------------------------------------------------------------------------


def _redact(url: str) -> str:
    """An index URL without its credentials (``https://user:token@host`` → ``https://host``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urllib.parse.urlunsplit(parts)


def fetch_index(index: str, project: str, *, timeout: float = 30) -> Listing:
    """One index's simple-API page for ``project`` (``file://`` indexes read their ``index.html``)."""
    url = index.rstrip("/") + f"/{project}/"
    source = _redact(index)
    try:
        if url.startswith("file://"):
            page = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path)) / "index.html"
            return Listing(source, parse_simple(page.read_bytes(), "text/html"))
        req = urllib.request.Request(url, headers={"Accept": JSON_ACCEPT, "User-Agent": "portvlm-drift"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the user's configured index
            return Listing(source, parse_simple(resp.read(), resp.headers.get("Content-Type", "")))
    except (OSError, ValueError) as exc:
        return Listing(source, error=f"{type(exc).__name__}: {exc}")


def uv_default(project: str, python: str, *, run: Callable = subprocess.run) -> Listing:
    """The newest ``project`` release uv's own default index resolves for ``python`` (the user configured no index)."""
    source = "uv's default index"
    cmd = [uv_bin(), "pip", "compile", "-", "--no-deps", "--no-header", "--no-annotate", "--python-version", python]
    try:
        proc = run(cmd, input=project + "\n", capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Listing(source, error=f"{type(exc).__name__}: {exc}")
    pins = [line.split("==", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith(project + "==")]
    if proc.returncode != 0 or not pins:
        return Listing(source, error=(proc.stderr.strip().splitlines() or [f"uv exited {proc.returncode}"])[-1])
    return Listing(source, (IndexFile(f"{project}-{pins[0]}-py3-none-any.whl"),))


def list_dir(directory: str) -> Listing:
    """A local wheel directory (``--find-links``) as a listing."""
    try:
        return Listing(directory, tuple(IndexFile(p.name) for p in sorted(Path(directory).iterdir()) if p.is_file()))
    except OSError as exc:
        return Listing(directory, error=f"{type(exc).__name__}: {exc}")


def _unreachable_notes(listings: Iterable[Listing]) -> tuple[str, ...]:
    return tuple(f"{lst.source} could not be read ({lst.error})" for lst in listings if lst.error)


def resolve_transformers(*, python: str, environ: Mapping[str, str] | None = None,
                         fetch: Callable[[str, str], Listing] = fetch_index,
                         listdir: Callable[[str], Listing] = list_dir) -> Resolved:
    """The newest final transformers release the user's default index (or local wheels) offers for ``python``."""
    environ = os.environ if environ is None else environ
    index = configured_index(environ) if environ is os.environ else _env_index(environ)
    first = fetch(index, "transformers") if index else uv_default("transformers", python)
    listings = [first, *(listdir(d) for d in find_links_dirs(environ))]
    found = newest("transformers", listings, python=python)
    if found is None:
        raise LookupError("no final transformers release found on " + ", ".join(lst.source for lst in listings)
                          + "; " + "; ".join(_unreachable_notes(listings))
                          + " — point UV_DEFAULT_INDEX / PIP_INDEX_URL at an index, or pass --transformers X")
    return Resolved("transformers", str(found[0]), found[1], _unreachable_notes(listings))


def resolve_torch_cpu(*, python: str, environ: Mapping[str, str] | None = None,
                      fetch: Callable[[str, str], Listing] = fetch_index,
                      listdir: Callable[[str], Listing] = list_dir,
                      platforms: Iterable[str] | None = None) -> Resolved:
    """The newest torch ``+cpu`` wheel for ``python`` on this platform: local wheel dirs and PyTorch's CPU index."""
    environ = os.environ if environ is None else environ
    listings = [*(listdir(d) for d in find_links_dirs(environ)), fetch(torch_index("cpu", environ), "torch")]
    found = newest("torch", listings, python=python, wheel_tags=target_tags(python, platforms), local="cpu",
                   sdists=False)
    if found is None:
        raise LookupError("no torch +cpu wheel for Python " + python + " on " + ", ".join(lst.source for lst in listings)
                          + "; " + "; ".join(_unreachable_notes(listings))
                          + " — set PORTVLM_TORCH_INDEX to a mirror, or pass --torch X+cpu")
    return Resolved("torch", str(found[0]), found[1], _unreachable_notes(listings))


def _env_index(environ: Mapping[str, str]) -> str | None:
    """The index a given environment mapping names (tests; no pip/uv config files are read)."""
    return next((environ[k] for k in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL") if environ.get(k)), None)


# -- installability: a release on the index whose pins the index cannot satisfy ---------------------------------------

# uv's resolver explanation (pubgrub): "Because only kernels<=0.17.2 is available and transformers>=5.25.0 depends on
# kernels>=0.19.1,<0.20, we can conclude ..." — the package, what the index has, and the pin that no file meets.
_CONFLICT = re.compile(
    r"only (?P<pkg>[A-Za-z0-9][A-Za-z0-9._-]*?)(?P<has>[<>=!~]=?[^\s,]+) is available and (?P<by>\S+) depends on "
    r"(?P=pkg)(?P<needs>[<>=!~]=?[^\s,]+(?:,[<>=!~]=?[^\s,]+)*)")


@dataclass(frozen=True)
class Installability:
    """Whether ``transformers==version`` installs from the user's sources; if not, the pin that stops it."""

    ok: bool
    package: str | None = None  # "kernels"
    needs: str | None = None  # "kernels>=0.19.1,<0.20" (lower bound first)
    index_has: str | None = None  # "0.17.2": the newest the sources offer
    detail: str | None = None  # the resolver's last line when it is not an unsatisfiable pin (or unparsed)

    @property
    def line(self) -> str:
        """``released; not installable from your index: needs kernels>=0.19.1, index has 0.17.2`` (or why not)."""
        if self.ok:
            return "installable from your index"
        if self.package:
            low = self.needs.split(",")[0] if self.needs else self.package
            return f"released; not installable from your index: needs {low}, index has {self.index_has or 'none'}"
        return f"released; the resolver refused it: {self.detail}"

    def to_dict(self) -> dict:
        return {"ok": self.ok, "package": self.package, "needs": self.needs, "index_has": self.index_has,
                "detail": self.detail, "line": self.line}


def parse_conflict(stderr: str) -> Installability:
    """Read uv's "no solution" explanation into the unsatisfiable pin (pure)."""
    text = " ".join(stderr.split())
    m = _CONFLICT.search(text)
    if m is None:
        last = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
        return Installability(False, detail=last[-1] if last else "no solution")
    parts = sorted(m.group("needs").split(","), key=lambda s: (not s.startswith(">"), s))
    has = m.group("has").lstrip("<>=!~")
    return Installability(False, m.group("pkg"), m.group("pkg") + ",".join(parts), has)


def check_installable(project: str, version: str, *, python: str, environ: Mapping[str, str] | None = None,
                      run: Callable = subprocess.run) -> Installability | None:
    """Resolve ``project==version`` with uv against the sources the envs install from; ``None``: could not tell.

    An unsatisfiable requirement is an :class:`Installability` naming it; an unreachable index is ``None`` (the env
    build then says what failed), never "not installable".
    """
    environ = os.environ if environ is None else environ
    index = configured_index(environ) if environ is os.environ else _env_index(environ)
    cmd = [uv_bin(), "pip", "compile", "-", "--no-header", "--no-annotate", "--python-version", python]
    if index:
        cmd += ["--default-index", index]
    for fl in find_links_dirs(environ):
        cmd += ["--find-links", fl]
    try:
        proc = run(cmd, input=f"{project}=={version}\n", capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode == 0:
        return Installability(True)
    if "No solution found" not in (proc.stderr or ""):
        return None  # a network or index error: not a statement about the release
    return parse_conflict(proc.stderr)
