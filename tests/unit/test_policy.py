"""portvlm.policy: one arch policy (dtype rule, backend priority), read from the packaged matrix, never the cwd."""

from __future__ import annotations

import pytest

from portvlm.errors import UnsupportedError
from portvlm.platform import BF16_MIN_CAPABILITY, CPU, Platform, bf16_reasons
from portvlm.policy import resolve_policy

V100 = Platform(vendor="nvidia", device="cuda", name="Tesla V100-SXM2-32GB", capability=(7, 0), arch_id="sm70")


def test_bf16_has_one_rule():
    assert BF16_MIN_CAPABILITY == (8, 0)
    assert bf16_reasons("nvidia", (7, 0)) and "7.0" in bf16_reasons("nvidia", (7, 0))[0]
    assert bf16_reasons("nvidia", (8, 0)) == [] and bf16_reasons("amd", None) == [] and bf16_reasons("cpu", None) == []


def test_policy_on_its_own_hardware_and_emulated():
    own = resolve_policy(None, host=V100)
    assert (own.arch.id, own.dtype, own.emulation) == ("sm70", "float16", None)
    assert "no bf16 below sm80" in own.dtype_why and own.vision_backends[0] == "efficient_varlen"
    emu = resolve_policy("gfx942", host=CPU)
    assert emu.dtype == "bfloat16" and emu.emulation and emu.platform.gfx == "gfx942" and emu.platform.device == "cpu"


def test_refusals_name_the_reason():
    with pytest.raises(UnsupportedError, match="capability >= 8.0"):
        resolve_policy("sm70", dtype="bf16", host=CPU)
    with pytest.raises(UnsupportedError, match="not in cpu's policy"):
        resolve_policy("cpu", dtype="float16", host=CPU)
    with pytest.raises(UnsupportedError, match="known: .*sm70"):
        resolve_policy("sm61", host=CPU)


def test_packaged_matrix_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "matrix.yaml").write_text("archs: [broken\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PORTVLM_MATRIX", str(tmp_path / "matrix.yaml"))
    assert resolve_policy("sm70", host=CPU).dtype == "float16"
