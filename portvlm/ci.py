"""The GitHub Actions workflow, generated from matrix.yaml (never hand-edited).

    python ci/workflow.py            # rewrite .github/workflows/portvlm.yml
    python ci/workflow.py --check    # exit 1 when the checked-in file is stale

`workflow(matrix)` is pure: matrix in, a dict shaped like the workflow out. Jobs:
  tests   the project's own tests (`nox -s tests`, the README's test command), on a hosted runner
  cpu     one job per model over the CI-selected CPU stacks (`stack.ci`), hosted runners
  <arch>  one job per GPU arch, a job-matrix entry per model, on `[self-hosted, <arch>]` runners
  images  one entry per containerised stack: build, and push to ghcr.io outside pull requests
  drift   scheduled (and manual) runs only: `nox -s drift` on the newest transformers + torch CPU build; red when
          upstream broke a shim; uploads the report and commits it to results/drift/
  publish downloads every results artifact (and the drift report), runs `nox -s publish`, uploads site/; `pages`
          deploys it
"""

from __future__ import annotations

from collections.abc import Iterable

import yaml

WORKFLOW_PATH = ".github/workflows/portvlm.yml"
HEADER = (
    "# GENERATED from matrix.yaml by `python ci/workflow.py` (portvlm/ci.py): do not edit by hand.\n"
    "# Regenerate after changing matrix.yaml; tests/unit/test_ci_workflow.py fails while this file is stale.\n"
)
PYTHON = "3.11"
# Pinned major versions of the actions used; one place to bump them.
ACTIONS = {
    "checkout": "actions/checkout@v4",
    "python": "actions/setup-python@v5",
    "upload": "actions/upload-artifact@v4",
    "download": "actions/download-artifact@v4",
    "buildx": "docker/setup-buildx-action@v3",
    "login": "docker/login-action@v3",
    "build_push": "docker/build-push-action@v6",
    "pages_upload": "actions/upload-pages-artifact@v3",
    "pages_deploy": "actions/deploy-pages@v4",
}
REGISTRY = "ghcr.io"
# Self-hosted GPU runners are never offered to pull requests (untrusted code on our machines).
NOT_A_PR = "github.event_name != 'pull_request'"
ON_MAIN = "github.event_name != 'pull_request' && github.ref == 'refs/heads/main'"
# The drift lane answers "did a new upstream release break us?": the weekly schedule (and a manual run) asks it.
DRIFT_EVENTS = "github.event_name == 'schedule' || github.event_name == 'workflow_dispatch'"
DRIFT_ARTIFACT = "drift-report"
DRIFT_RAN = "needs.drift.result == 'success' || needs.drift.result == 'failure'"
COMMIT_DRIFT = """git config user.name "github-actions[bot]"
git config user.email "41898282+github-actions[bot]@users.noreply.github.com"
git add results/drift
git diff --cached --quiet || { git commit -m "drift: newest upstream report (nox -s drift)" && git push; }"""


def test_session(arch: str, model: str) -> str:
    """The nox session name a cell group runs (the noxfile parametrises test(arch, model))."""
    return f"test(arch='{arch}', model='{model}')"


def runnable(cells: Iterable) -> list:
    """Cells a job should run: excluded cells are recorded by the runner but need no runner of their own."""
    return [c for c in cells if c.expected != "excluded"]


def models_with_cells(cells, arch: str, *, ci: bool | None = None) -> list[str]:
    """Model ids (declared order) that have at least one runnable cell on `arch` (and `stack.ci == ci`)."""
    chosen = [c for c in runnable(cells) if c.arch.id == arch and (ci is None or c.stack.ci == ci)]
    return list(dict.fromkeys(c.model.id for c in chosen))


def image_name(image: str) -> str:
    """`portvlm/sm70-cu118-torch2.3.1` → `sm70-cu118-torch2.3.1`: the folder under containers/."""
    return image.rsplit("/", 1)[-1]


def containerised_stacks(matrix) -> list:
    """Stacks that carry an image, in declared order, one entry per image."""
    seen, out = set(), []
    for stack in matrix.stacks:
        if stack.image and stack.image not in seen:
            seen.add(stack.image)
            out.append(stack)
    return out


def _setup(python: str = PYTHON) -> list[dict]:
    return [
        {"uses": ACTIONS["checkout"]},
        {"uses": ACTIONS["python"], "with": {"python-version": python}},
        {"name": "Install nox and uv", "run": 'python -m pip install "nox>=2025.2" "uv>=0.5"'},
    ]


def _upload_results(name: str) -> dict:
    return {
        "name": "Upload results",
        "if": "always()",
        "uses": ACTIONS["upload"],
        "with": {"name": name, "path": "results/", "if-no-files-found": "warn", "retention-days": 30},
    }


def tests_job() -> dict:
    return {
        "name": "tests (nox -s tests)",
        "runs-on": "ubuntu-latest",
        "timeout-minutes": 90,
        "steps": [
            *_setup(),
            # The hosted runner image ships Google Chrome, which the support page's browser test finds by itself.
            {"name": "Install check-jsonschema (the workflow's schema test)",
             "run": 'python -m pip install "check-jsonschema>=0.29"'},
            {"name": "Tests", "run": "nox -s tests"},
        ],
    }


def cpu_job(cells) -> dict | None:
    models = models_with_cells(cells, "cpu", ci=True)
    if not models:
        return None
    return {
        "name": "cpu / ${{ matrix.model }}",
        "runs-on": "ubuntu-latest",
        "timeout-minutes": 120,
        "strategy": {"fail-fast": False, "matrix": {"include": [
            {"model": m, "session": test_session("cpu", m)} for m in models
        ]}},
        "steps": [
            *_setup(),
            {"name": "Run the CI-selected CPU cells", "run": 'nox -s "${{ matrix.session }}" -- --ci --publish'},
            _upload_results("results-cpu-${{ matrix.model }}"),
        ],
    }


def gpu_job(arch, cells, images: list[str]) -> dict | None:
    """One job per GPU arch on `[self-hosted, <arch>]`; `images`: the stack images its cells run in."""
    models = models_with_cells(cells, arch.id)
    if not models:
        return None
    steps = [*_setup()]
    if images:
        steps += [
            {"name": "Registry", "run": REGISTRY_ENV},
            _ghcr_login(),
            {"name": "Pull the stack images", "run": "nox -s " + " ".join(f'"pull(image=\'{i}\')"' for i in images)},
        ]
    steps += [
        # --require-hardware: a mislabelled runner fails loudly instead of recording emulated results.
        # --publish: the uploaded results/ is the project's evidence (a user's run writes portvlm-results/).
        {"name": f"Run the {arch.id} cells on {arch.id} hardware",
         "run": 'nox -s "${{ matrix.session }}" -- --require-hardware --publish'},
        _upload_results(f"results-{arch.id}-${{{{ matrix.model }}}}"),
    ]
    return {
        "name": f"{arch.id} / ${{{{ matrix.model }}}}",
        **({"needs": ["images"]} if images else {}),
        "if": NOT_A_PR,
        "runs-on": ["self-hosted", arch.id],
        **({"permissions": {"contents": "read", "packages": "read"}} if images else {}),
        "timeout-minutes": 240,
        "strategy": {"fail-fast": False, "matrix": {"include": [
            {"model": m, "session": test_session(arch.id, m)} for m in models
        ]}},
        "steps": steps,
    }


def _ghcr_login() -> dict:
    return {
        "name": "Log in to ghcr.io",
        "uses": ACTIONS["login"],
        "with": {"registry": REGISTRY, "username": "${{ github.actor }}", "password": "${{ secrets.GITHUB_TOKEN }}"},
    }


# The Dockerfiles COPY a staged context (requirements.lock, wheelhouse/ of the lock's wheels, dist/ with portvlm's
# wheel), which portvlm.containers.stage_context assembles; the build then installs offline from it.
STAGE = (
    "import sys; from portvlm.containers import find_spec, stage_context; from portvlm.matrix import load_matrix; "
    "print('dir=' + str(stage_context(find_spec(load_matrix(), sys.argv[1]))))"
)
# ghcr.io wants a lower-case owner; github.repository_owner may not be.
REGISTRY_ENV = 'echo "PORTVLM_REGISTRY=ghcr.io/${GITHUB_REPOSITORY_OWNER,,}" >> "$GITHUB_ENV"'


def images_job(matrix) -> dict | None:
    stacks = containerised_stacks(matrix)
    if not stacks:
        return None
    ref = "${{ env.PORTVLM_REGISTRY }}/${{ matrix.image }}"
    return {
        "name": "image / ${{ matrix.stack }}",
        "runs-on": "ubuntu-latest",
        "timeout-minutes": 120,
        "permissions": {"contents": "read", "packages": "write"},
        "strategy": {"fail-fast": False, "matrix": {"include": [
            {"stack": s.id, "image": s.image, "tag": f"tf{s.transformers}",
             "dockerfile": f"containers/{image_name(s.image)}/Dockerfile"}
            for s in stacks
        ]}},
        "steps": [
            {"uses": ACTIONS["checkout"]},
            {"uses": ACTIONS["python"], "with": {"python-version": PYTHON}},
            {"name": "Registry", "run": REGISTRY_ENV},
            {
                "name": "Stage the build context (the lock's wheels, portvlm's wheel)",
                "id": "ctx",
                "run": f'python -m pip install -e .\npython -c "{STAGE}" "${{{{ matrix.image }}}}" >> "$GITHUB_OUTPUT"',
            },
            {"uses": ACTIONS["buildx"]},
            {"name": "Log in to ghcr.io", "if": NOT_A_PR, **{k: v for k, v in _ghcr_login().items() if k != "name"}},
            {
                "name": "Build (and push outside pull requests)",
                "uses": ACTIONS["build_push"],
                "with": {
                    "context": "${{ steps.ctx.outputs.dir }}",
                    "file": "${{ matrix.dockerfile }}",
                    "push": "${{ github.event_name != 'pull_request' }}",
                    # :tf<transformers> is the tag portvlm.containers pulls and runs; :<sha> pins a commit.
                    "tags": f"{ref}:${{{{ matrix.tag }}}}\n{ref}:${{{{ github.sha }}}}",
                    "labels": "org.opencontainers.image.source=${{ github.server_url }}/${{ github.repository }}\n"
                    "dev.portvlm.stack=${{ matrix.stack }}",
                    "cache-from": "type=gha,scope=${{ matrix.stack }}",
                    "cache-to": "type=gha,mode=max,scope=${{ matrix.stack }}",
                },
            },
        ],
    }


def drift_job() -> dict:
    """The upstream drift lane: fails (red) when the newest release broke a shim; the report is kept either way."""
    return {
        "name": "newest upstream (nox -s drift)",
        "if": DRIFT_EVENTS,
        "runs-on": "ubuntu-latest",
        "timeout-minutes": 120,
        "permissions": {"contents": "write"},  # commits the report to results/drift/
        "steps": [
            *_setup(),
            {"name": "Newest transformers + torch CPU build: probes, symbols, CPU cells", "run": "nox -s drift"},
            {"name": "Upload the drift report", "if": "always()", "uses": ACTIONS["upload"],
             "with": {"name": DRIFT_ARTIFACT, "path": "results/drift/", "if-no-files-found": "warn",
                      "retention-days": 90}},
            {"name": "Commit the drift report", "if": "always() && github.event_name == 'schedule'",
             "run": COMMIT_DRIFT},
        ],
    }


def publish_job(needs: list[str]) -> dict:
    return {
        "name": "publish (support table + badges)",
        "needs": needs,
        # Publish whatever ran: a failing or skipped cell job still has results worth showing.
        "if": "${{ !cancelled() }}",
        "runs-on": "ubuntu-latest",
        "timeout-minutes": 20,
        "steps": [
            *_setup(),
            {
                "name": "Download all results",
                "uses": ACTIONS["download"],
                "with": {"pattern": "results-*", "path": "results", "merge-multiple": True},
            },
            {
                "name": "Download the drift report (scheduled runs)",
                "if": DRIFT_RAN,
                "uses": ACTIONS["download"],
                "with": {"name": DRIFT_ARTIFACT, "path": "results/drift"},
            },
            {"name": "Support table, page and badges", "run": "nox -s publish"},
            {
                "name": "Upload SUPPORT.md",
                "uses": ACTIONS["upload"],
                "with": {"name": "support-table", "path": "SUPPORT.md"},
            },
            {"name": "Upload the site for Pages", "uses": ACTIONS["pages_upload"], "with": {"path": "site/"}},
        ],
    }


def pages_job() -> dict:
    return {
        "name": "deploy support page",
        "needs": ["publish"],
        "if": ON_MAIN,
        "runs-on": "ubuntu-latest",
        "permissions": {"pages": "write", "id-token": "write"},
        "environment": {"name": "github-pages", "url": "${{ steps.deployment.outputs.page_url }}"},
        "steps": [{"name": "Deploy to GitHub Pages", "id": "deployment", "uses": ACTIONS["pages_deploy"]}],
    }


def workflow(matrix, cells=None) -> dict:
    """The whole workflow as a dict (pure)."""
    if cells is None:
        from portvlm.matrix import expand

        cells = expand(matrix)
    cells = tuple(cells)
    images = images_job(matrix)
    image_ids = {s.image for s in containerised_stacks(matrix)}
    jobs: dict[str, dict] = {"tests": tests_job()}
    cpu = cpu_job(cells)
    if cpu:
        jobs["cpu"] = cpu
    if images:
        jobs["images"] = images
    for arch in matrix.archs:
        if arch.vendor == "cpu":
            continue
        arch_images = []
        if arch.runtime == "container":
            arch_images = list(dict.fromkeys(
                c.stack.image for c in runnable(cells) if c.arch.id == arch.id and c.stack.image in image_ids
            ))
        job = gpu_job(arch, cells, arch_images)
        if job:
            jobs[arch.id] = job
    cell_jobs = [name for name in jobs if name not in ("tests", "images")]
    jobs["drift"] = drift_job()
    jobs["publish"] = publish_job([*cell_jobs, "drift"])
    jobs["pages"] = pages_job()
    return {
        "name": "portvlm",
        "on": {
            "push": {"branches": ["main"]},
            "pull_request": None,
            "workflow_dispatch": None,
            "schedule": [{"cron": "17 3 * * 1"}],  # weekly: the drift job, and every lane on upstream's latest
        },
        "permissions": {"contents": "read"},
        "concurrency": {"group": "portvlm-${{ github.ref }}", "cancel-in-progress": True},
        "env": {"PYTHONUNBUFFERED": "1", "FORCE_COLOR": "1"},
        "jobs": jobs,
    }


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as `|` blocks, `on:` unquoted, null as empty."""


def _str(dumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


def _none(dumper, _):
    return dumper.represent_scalar("tag:yaml.org,2002:null", "")


_Dumper.add_representer(str, _str)
_Dumper.add_representer(type(None), _none)


def render(matrix, cells=None) -> str:
    """The workflow file's text: deterministic for a given matrix."""
    text = yaml.dump(workflow(matrix, cells), Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
    # PyYAML quotes the key `on` (a YAML 1.1 boolean); GitHub reads both, people read the plain one better.
    text = text.replace("\n'on':\n", "\non:\n", 1)
    return HEADER + text


def main(argv: list[str] | None = None) -> int:
    """Write (or --check) the workflow file from matrix.yaml."""
    import argparse
    from pathlib import Path

    from portvlm.errors import MatrixError
    from portvlm.matrix import cli_matrix

    p = argparse.ArgumentParser(prog="ci/workflow.py", description="generate the GitHub Actions workflow")
    p.add_argument("--matrix", default=None)
    p.add_argument("--out", default=WORKFLOW_PATH)
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from the generator output")
    a = p.parse_args(argv)
    try:
        text = render(cli_matrix(a.matrix))
    except MatrixError as exc:
        print(f"error: {exc}")
        return 2
    out = Path(a.out)
    if a.check:
        current = out.read_text(encoding="utf-8") if out.exists() else None
        if current != text:
            print(f"{out} is stale: regenerate with `python ci/workflow.py`")
            return 1
        print(f"{out} is up to date")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {out}")
    return 0
