"""`portvlm` command line: thin dispatch to each package's ``cli.main(argv) -> int``."""

from __future__ import annotations

import importlib
import sys

from portvlm.terminal import closed_pipe_exit, interruptible

COMMANDS = {
    "matrix": ("portvlm.matrix.cli", "validate matrix.yaml and print the expanded cells"),
    "doctor": ("portvlm.doctor.cli", "diagnose this environment: verdicts with reasons and fixes"),
    "check": ("portvlm.checker", "parity of YOUR model (module:function factory) against portvlm's fp32 reference"),
    "run": ("portvlm.run.cli", "run matrix cells (what the nox test sessions call)"),
    "publish": ("portvlm.publish.cli", "render the support table, HTML page and badges from results/"),
    "drift": ("portvlm.drift.lane", "test portvlm on the newest upstream releases; writes results/drift/"),
    "containers": ("portvlm.containers.cli", "render, lint and build the stack images"),
}


def main(argv: list[str] | None = None) -> int:
    """``portvlm COMMAND [ARGS]``: a closed pipe or Ctrl-C ends it quietly (exit 141 / 130), never a traceback."""
    try:
        with interruptible():  # Ctrl-C works even when the launcher started us with SIGINT ignored
            code = _dispatch(argv)
        sys.stdout.flush()  # a reader that went away (`| head`) is found here, not at interpreter exit
        return code
    except BrokenPipeError:
        return closed_pipe_exit()
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


def _dispatch(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: portvlm COMMAND [ARGS]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<11} {help_}")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from portvlm import __version__

        print(f"portvlm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
