"""`portvlm containers list|render|lock|lint|build|pull|run` (thin shell over the package)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from portvlm.containers.context import build
from portvlm.containers.engine import GPU_RUN_FLAGS, NO_ENGINE, find_engine, pull, run_in
from portvlm.containers.lint import lint
from portvlm.containers.lock import write_lock
from portvlm.containers.spec import OUT_DIR, find_spec, image_specs
from portvlm.containers.tree import drift, render_all


def main(argv: list[str] | None = None) -> int:
    """`portvlm containers list|render|lock|lint|build|pull|run`."""
    from portvlm.matrix import cli_matrix

    parser = argparse.ArgumentParser(prog="portvlm containers", description="render, lint and build the stack images")
    parser.add_argument("--matrix", help="matrix.yaml (default: $PORTVLM_MATRIX, else the packaged one)")
    parser.add_argument("--out", default=OUT_DIR, help="where the rendered files live (default: containers)")
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("list", help="images, tags and the cells they carry")
    p = sub.add_parser("render", help="write Dockerfile + requirements.in per image (--lock: also resolve)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if committed files drifted")
    p.add_argument("--lock", action="store_true", help="also resolve requirements.lock with uv (network)")
    p = sub.add_parser("lock", help="resolve requirements.lock with uv (network)")
    p.add_argument("images", nargs="*")
    sub.add_parser("lint", help="hadolint every rendered Dockerfile")
    for verb in ("build", "pull"):
        p = sub.add_parser(verb)
        p.add_argument("image")
        p.add_argument("--engine", choices=("docker", "podman"))
        if verb == "build":
            p.add_argument("--extra-ca", metavar="DIR", help="*.crt CA files a TLS-intercepting proxy needs")
            p.add_argument("--no-cache", action="store_true")
    p = sub.add_parser("run", help="run a command in an image: portvlm containers run IMAGE -- CMD...")
    p.add_argument("image")
    p.add_argument("--engine", choices=("docker", "podman"))
    p.add_argument("-v", "--volume", action="append", default=[])
    p.add_argument("--gpu", choices=tuple(GPU_RUN_FLAGS), help="pass this vendor's GPUs through")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    matrix = cli_matrix(args.matrix)
    out = Path(args.out)
    if args.verb == "list":
        for spec in image_specs(matrix):
            print(f"{spec.slug:<24} {spec.tag:<44} archs={','.join(spec.arch_ids)} cells={len(spec.cells)}")
        return 0
    if args.verb == "render":
        if args.check:
            reasons = drift(matrix, out)
            for r in reasons:
                print(f"drift: {r}", file=sys.stderr)
            if reasons:
                print("fix: portvlm containers render --lock", file=sys.stderr)
            return 1 if reasons else 0
        for path in render_all(matrix, out, lock=args.lock):
            print(path)
        return 0
    if args.verb == "lock":
        specs = [find_spec(matrix, n) for n in args.images] if args.images else image_specs(matrix)
        for spec in specs:
            print(write_lock(spec, out / spec.slug))
        return 0
    if args.verb == "lint":
        status, text = lint([out / s.slug / "Dockerfile" for s in image_specs(matrix)])
        print(text or "hadolint: clean")
        return status
    spec = find_spec(matrix, args.image)
    engine = find_engine(args.engine)
    if engine is None:
        print(f"error: {NO_ENGINE}", file=sys.stderr)
        return 3
    if args.verb == "build":
        try:
            record = build(spec, engine, out=out, extra_ca=args.extra_ca, no_cache=args.no_cache)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        size = f"{record.size_bytes / 1e6:.0f} MB" if record.size_bytes else "size unknown"
        print(f"built {record.tag} with {record.engine} in {record.seconds:.1f} s ({size})")
        return 0
    if args.verb == "pull":
        return pull(spec, engine)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return run_in(spec, cmd or ["portvlm", "doctor", "--json"], engine, volumes=args.volume, gpu_vendor=args.gpu).returncode


if __name__ == "__main__":
    sys.exit(main())
