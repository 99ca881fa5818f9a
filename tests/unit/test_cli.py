"""The `portvlm` command as a person meets it: closed pipes, Ctrl-C, wrapped text (issue #28)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("args", [["matrix"], ["matrix", "--json"], ["--help"], ["doctor"], ["doctor", "--json"]])
def test_a_closed_pipe_ends_quietly_with_141(args):
    """`portvlm matrix | head -40`: the reader went away before the first write; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "portvlm.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
    proc.stdout.close()  # before anything is written: the first write fails, every time
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_ctrl_c_in_any_command_exits_130_without_a_traceback(monkeypatch, capsys):
    import portvlm.cli
    from portvlm.matrix import cli as matrix_cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(matrix_cli, "main", interrupted)
    assert portvlm.cli.main(["matrix"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_ctrl_c_reaches_a_command_started_with_sigint_ignored(tmp_path):
    """A `portvlm` started with SIGINT ignored (a background job) still stops on SIGINT: exit 130, no traceback."""
    import signal
    import time

    started = tmp_path / "started"
    script = (f"import time, portvlm.cli, portvlm.matrix.cli as m\n"
              f"def slow(argv):\n    open({str(started)!r}, 'w').close()\n    time.sleep(60)\n"
              f"m.main = slow\nimport sys; sys.exit(portvlm.cli.main(['matrix']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_doctor_names_each_gpu_probe_reason_once():
    """Without torch, `torch: not importable` is one reason, not one per vendor probe (NVIDIA, AMD)."""
    from portvlm.platform import detect_all
    from portvlm.platform.probes import Probes

    def no_module(name):
        raise ImportError(f"No module named {name!r}")

    bare = Probes(import_module=no_module, run=lambda cmd: None, env={})  # no GPU, no torch, no vendor tools
    platform, found = detect_all(bare, torch=False)
    assert list(found.reasons).count("torch: not importable") == 1, found.reasons
    assert list(platform.notes).count("torch: not importable") == 1, platform.notes


def test_wrap_keeps_every_word_and_the_indent():
    from portvlm.terminal import wrap

    text = "  WARN  gpu          " + " ".join(f"word{i}" for i in range(40))
    lines = wrap(text, 50)
    assert all(len(line) <= 50 for line in lines)
    assert lines[0].startswith("  WARN") and all(line.startswith("      ") for line in lines[1:])
    assert " ".join(" ".join(lines).split()) == " ".join(text.split())
