"""Backend declarations and selection on fake platforms: pure, no torch, no GPU (feature probes are faked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from portvlm.backends import (
    BACKENDS,
    Backend,
    all_backends,
    backend_reasons,
    default_priority,
    get_backend,
    kernel_capability,
    register_backend,
    rules_view,
    select,
)
from portvlm.errors import UnsupportedError
from portvlm.platform import CPU, Platform

V100 = Platform("nvidia", "cuda", "Tesla V100-SXM2-32GB", (7, 0), arch_id="sm70", torch_archs=("sm_70", "sm_80"))
A100 = Platform("nvidia", "cuda", "NVIDIA A100-SXM4-80GB", (8, 0), arch_id="sm80", torch_archs=("sm_80", "sm_90"))
H100 = Platform("nvidia", "cuda", "NVIDIA H100 80GB HBM3", (9, 0), arch_id="sm90", torch_archs=("sm_80", "sm_90"))
MI300 = Platform("amd", "cuda", "AMD Instinct MI300X", None, gfx="gfx942", arch_id="gfx942", torch_archs=("gfx942",))
MI250 = Platform("amd", "cuda", "AMD Instinct MI250X", None, gfx="gfx90a", arch_id="gfx90a", torch_archs=("gfx90a",))


def all_features(need, platform, dtype, head_dim):
    """A machine where every feature probe passes (the declarations alone decide)."""
    return None


def missing(*needs):
    def probe(need, platform, dtype, head_dim):
        return f"fake: {need} missing" if need in needs else None

    return probe


def test_names_match_matrix_and_never_say_flash():
    from portvlm.matrix import load_matrix

    matrix = load_matrix(Path(__file__).resolve().parents[2] / "matrix.yaml")
    named = {b for a in matrix.archs for b in (*a.vision_backends, *a.text_backends)}
    assert named, "matrix.yaml names no backend"
    assert named <= set(BACKENDS), f"matrix.yaml names undeclared backends: {sorted(named - set(BACKENDS))}"
    unused = set(BACKENDS) - named
    assert not unused, f"declared backends no arch of matrix.yaml uses: {sorted(unused)}"
    assert not any("flash" in n for n in BACKENDS)
    with pytest.raises(ValueError, match="flash"):
        Backend(name="my_flash_thing", devices=("cuda",))


def test_sm70_fp16_efficient_varlen_wins_torch_varlen_needs_sm80():
    sel = select(None, V100, "float16", 80, need_backward=True, probe=all_features)
    assert sel.name == "efficient_varlen"
    assert "needs sm80+, found sm70 (Tesla V100-SXM2-32GB)" in sel.lost["torch_varlen"]
    assert any("needs sm80+" in r for r in sel.lost["flex_document"])
    # losers ranked after the winner still say why they were not chosen
    assert sel.lost["xformers_blockdiag"] == ["usable, ranked below efficient_varlen"]
    assert set(sel.lost) == set(default_priority(V100)) - {"efficient_varlen"}


def test_sm70_bf16_refused_with_reason():
    reasons = backend_reasons("efficient_varlen", V100, "bfloat16", 80, probe=all_features)
    assert reasons == ["bfloat16 needs sm80+ (below sm80: float32 or float16), found sm70 (Tesla V100-SXM2-32GB)"]
    with pytest.raises(UnsupportedError) as err:
        select(None, V100, "bfloat16", 80, probe=all_features)
    text = str(err.value)
    for name in default_priority(V100):
        assert f"{name}:" in text
    assert "bfloat16 needs sm80+" in text


def test_gfx942_efficient_varlen_then_sdpa():
    sel = select(None, MI300, "bfloat16", 80, need_backward=True, probe=all_features)
    assert sel.name == "efficient_varlen"
    assert backend_reasons("torch_varlen", MI300, "bfloat16", 80, probe=all_features) == [
        "needs vendor nvidia, found amd (AMD Instinct MI300X)"
    ]
    # no efficient op in this torch -> masked SDPA (AOTriton) is next in the vision priority of matrix.yaml
    sel = select(["efficient_varlen", "sdpa_masked"], MI300, "bfloat16", 80, probe=missing("efficient_attention_op"))
    assert sel.name == "sdpa_masked"
    assert sel.lost["efficient_varlen"] == ["fake: efficient_attention_op missing"]
    assert select(None, MI250, "float16", 64, probe=all_features).name == "efficient_varlen"


def test_sm80_plus_torch_varlen():
    assert select(None, H100, "bfloat16", 80, need_backward=True, probe=all_features).name == "torch_varlen"
    assert select(None, A100, "float16", 80, probe=all_features).name == "torch_varlen"
    sel = select(None, H100, "float32", 80, probe=all_features)  # flash has no fp32
    assert sel.name == "efficient_varlen"
    assert sel.lost["torch_varlen"] == ["needs dtype float16 or bfloat16, found float32"]
    sel = select(None, H100, "bfloat16", 320, probe=all_features)
    assert "needs head_dim <= 256, found 320" in sel.lost["torch_varlen"]


def test_cpu_sdpa_masked_and_device_reasons():
    sel = select(None, CPU, "float32", 64, need_backward=True, probe=all_features)
    assert sel.name == "sdpa_masked"
    assert backend_reasons("efficient_varlen", CPU, "float32", 64, probe=all_features) == ["needs device cuda, found cpu (CPU)"]


def test_nothing_usable_lists_every_candidate():
    with pytest.raises(UnsupportedError) as err:
        select(["torch_varlen", "efficient_varlen", "flex_document"], CPU, "float16", 80, probe=all_features)
    text = str(err.value)
    assert "No attention backend found" in text
    for name in ("torch_varlen", "efficient_varlen", "flex_document"):
        assert f"     {name}: needs device cuda, found cpu" in text


def test_probes_run_only_when_declarations_allow():
    seen = []

    def probe(need, platform, dtype, head_dim):
        seen.append(need)

    backend_reasons("torch_varlen", V100, "float16", 80, probe=probe)
    assert seen == []  # refused by capability: no imports, no device allocations
    backend_reasons("torch_varlen", H100, "float16", 80, probe=probe)
    assert seen == list(get_backend("torch_varlen").needs)


def test_emulation_rules_from_arch_kernels_from_host():
    # an sm70 policy run on an H100: bf16 refused by the policy even though the H100 could
    emulated = Platform("nvidia", "cuda", "NVIDIA H100 80GB HBM3", (7, 0), arch_id="sm70", torch_archs=H100.torch_archs, emulating="sm70")
    assert rules_view(emulated) is emulated
    reasons = backend_reasons("efficient_varlen", emulated, "bfloat16", 80, probe=all_features)
    assert reasons and "bfloat16 needs sm80+" in reasons[0] and "emulating sm70" in reasons[0]
    sel = select(None, emulated, "float16", 80, need_backward=True, probe=all_features)
    assert sel.name == "efficient_varlen"
    assert any("needs sm80+" in r for r in sel.lost["torch_varlen"])
    # an sm70 policy on a CPU host: fp16 eager/sdpa only, still no bf16
    on_cpu = Platform("nvidia", "cpu", "CPU", (7, 0), arch_id="sm70", emulating="sm70")
    assert select(None, on_cpu, "float16", 80, probe=all_features).name == "sdpa_masked"
    assert backend_reasons("eager", on_cpu, "bfloat16", 80, probe=all_features)
    assert backend_reasons("efficient_varlen", on_cpu, "float16", 80, probe=all_features) == ["needs device cuda, found cpu (CPU)"]
    # not emulating: the record is the device
    assert kernel_capability(V100) == ((7, 0), None)
    assert kernel_capability(MI300) == (None, "gfx942")


def test_register_backend_adds_and_removes():
    broken = Backend(name="mask_dropped", devices=("cpu", "cuda"), note="negative control")
    with register_backend(broken, impl=lambda *a: None) as b:
        assert b.impl is not None
        assert "mask_dropped" in all_backends()
        assert backend_reasons("mask_dropped", CPU, "float32", 64, probe=all_features) == []
        assert select(["mask_dropped"], CPU, "float32", 64, probe=all_features).name == "mask_dropped"
    assert "mask_dropped" not in all_backends()
    with pytest.raises(KeyError):
        get_backend("mask_dropped")
    # shadowing a built-in is undone too, also on error
    with pytest.raises(RuntimeError), register_backend(Backend(name="eager", devices=("cuda",))):
        assert get_backend("eager").devices == ("cuda",)
        raise RuntimeError
    assert get_backend("eager") is BACKENDS["eager"]


def test_forward_only_backend_loses_when_backward_needed():
    with register_backend(Backend(name="fwd_only", devices=("cpu",), has_backward=False)):
        assert backend_reasons("fwd_only", CPU, "float32", 64, need_backward=True, probe=all_features) == [
            "needs a backward pass, this backend is forward-only"
        ]
        assert backend_reasons("fwd_only", CPU, "float32", 64, probe=all_features) == []


def test_unknown_backend_is_a_reason():
    assert backend_reasons("nope", CPU, "float32", 64) == ["unknown attention backend 'nope'; known: " + ", ".join(all_backends())]


def test_import_needs_no_torch():
    code = "import sys, portvlm.backends as b; b.select(None, b.Platform('cpu','cpu','CPU'), 'float32', 64, probe=lambda *a: None); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
