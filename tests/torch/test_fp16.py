"""fp16 under the sm70 policy holds on the documented failure sites (issue #22; ../shared/research/fp16.md §1).

Each case plants weights (``portvlm.testing.outliers``) that reproduce one site on a tiny random-init model: (a) a text
down_proj driving a residual channel past 65504 (vLLM #14126), (b) the last vision block's MLP doing the same
(llama.cpp #17534), (c) an overflow inside the vision MLP before its down projection (Qwen3-VL ``linear_fc1``,
unsloth-zoo #787). For each: fp32 is finite and the scan names the overflow; unpatched fp16 and a clamp at the range
are negative controls; the sm70 policy with calibration matches fp32 within the fp16 tolerance, decodes the same 16
greedy tokens and restores the weights bitwise on revert; without calibration the guard names the module; a short
GradScaler training run has a finite, falling loss.
"""

from __future__ import annotations

import copy
import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import portvlm  # noqa: E402
from portvlm.errors import FP16OverflowError  # noqa: E402
from portvlm.models import inputs as model_inputs  # noqa: E402
from portvlm.models import tiny  # noqa: E402
from portvlm.shims.fp16 import FP16_MAX  # noqa: E402
from portvlm.shims.fp16.scan import scan  # noqa: E402
from portvlm.testing import compare, tolerances  # noqa: E402
from portvlm.testing.outliers import plant  # noqa: E402

ATOL, RTOL = tolerances.tolerance("cpu", "float16", None, "fwd")
# (model, site, fp32 peak planted, the module the fp16 forward first loses: "<layer_paths part>:<path in it>")
CASES = [
    ("qwen2_5vl", "text_down_proj", 1.2e5, "text_layers:1.mlp.down_proj"),
    ("qwen2_5vl", "vision_down_proj", 1.2e5, "vision_blocks:3.mlp.down_proj"),
    ("qwen2_5vl", "vision_mlp_internal", 1.2e5, "vision_blocks:3.mlp.up_proj"),
    ("qwen3vl", "text_down_proj", 1.2e5, "text_layers:1.mlp.down_proj"),
    ("qwen3vl", "vision_down_proj", 1.2e5, "vision_blocks:3.mlp.linear_fc2"),
    ("qwen3vl", "vision_mlp_internal", 1.2e5, "vision_blocks:3.mlp.linear_fc1"),
]
IDS = [f"{m}-{s}" for m, s, _, _ in CASES]


def _skip(mid: str) -> None:
    reasons = tiny.is_available(mid)
    if reasons:
        pytest.skip(reasons[0])  # Qwen3-VL is absent before transformers 4.57


def _half(batch: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in batch.items()}


def _path(model, where: str) -> str:
    """``"text_layers:1.mlp.down_proj"`` -> that module's path on this transformers version (4.52 moved them)."""
    from portvlm.shims.layer_paths import resolve

    part, _, rest = where.partition(":")
    return f"{resolve(model).paths[part]}.{rest}"


@functools.cache
def _planted(mid: str, site: str, peak: float):
    """(fp32 model with the site planted, the calibration batch, fp32 logits); tests take deep copies."""
    model = tiny.build(mid)
    batch = model_inputs.build(mid, "packed", torch.float32)
    plant(model, site, batch, peak=peak)
    return model, batch, _logits(model, batch)


def _logits(model, batch) -> torch.Tensor:
    model.model.rope_deltas = None  # Qwen keeps rope deltas between calls
    with torch.no_grad():
        return model(**batch, use_cache=False).logits.float()


def _clamped(model):
    """The published non-fix (transformers #33312, vLLM #13968): every module's output clamped to fp16's range."""
    def clamp(module, args, out):
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out.clamp(-FP16_MAX, FP16_MAX)
        return None
    return [m.register_forward_hook(clamp) for m in model.modules() if not list(m.children())]


@pytest.mark.parametrize(("mid", "site", "peak", "first"), CASES, ids=IDS)
def test_scan_names_the_site_and_the_controls_fail(mid, site, peak, first):
    _skip(mid)
    model, batch, ref = _planted(mid, site, peak)
    first = _path(model, first)
    assert torch.isfinite(ref).all(), "fp32 must be finite: the site only overflows fp16"
    report = scan(copy.deepcopy(model), batch)
    assert not report.ok and report.needs_fix
    messages = [str(o) for o in report.overflows]
    assert any(first in m and "> 65504" in m for m in messages), messages
    assert "attention" not in str(report).lower()  # overflow is named as overflow, never as a leak

    m16 = copy.deepcopy(model).half()
    assert not torch.isfinite(_logits(m16, _half(batch))).all(), "negative control: unpatched fp16 must fail"
    hooks = _clamped(m16)
    try:
        clamped = _logits(m16, _half(batch))
    finally:
        for h in hooks:
            h.remove()
    assert not compare(clamped, ref, ATOL, RTOL).ok, "negative control: a clamp changes the function"


@pytest.mark.parametrize(("mid", "site", "peak", "first"), CASES, ids=IDS)
def test_without_calibration_the_guard_names_the_module(mid, site, peak, first):
    _skip(mid)
    model, batch, _ = _planted(mid, site, peak)
    first = _path(model, first)
    m16 = copy.deepcopy(model).half()
    with portvlm.patch(m16, arch="sm70") as handle:
        assert any(c.kind == "guard" for c in handle.report.fp16)
        with pytest.raises(FP16OverflowError) as err:
            _logits(m16, _half(batch))
    assert err.value.module == first
    assert f"fp16 overflow at {first}: |x| up to" in str(err.value) and "calibrat" in str(err.value)
    assert err.value.peak > FP16_MAX


@pytest.mark.parametrize(("mid", "site", "peak", "first"), CASES, ids=IDS)
def test_calibrated_sm70_policy_matches_fp32_and_reverts_bitwise(mid, site, peak, first):
    _skip(mid)
    model, batch, ref = _planted(mid, site, peak)
    m16 = copy.deepcopy(model).half()
    before = {k: v.clone() for k, v in m16.state_dict().items()}
    b16 = _half(batch)
    with portvlm.patch(m16, arch="sm70", calibration=batch) as handle:
        assert all(torch.equal(before[k], v) for k, v in m16.state_dict().items()), "the policy edits no parameter"
        kinds = {c.kind for c in handle.report.fp16}
        assert ("island" in kinds) == (site == "vision_mlp_internal"), handle.report
        assert ("rescale" in kinds) == (site != "vision_mlp_internal"), handle.report
        assert handle.fp16.verified.ok, handle.fp16.verified
        got = _logits(m16, b16)
        c = compare(got, ref, ATOL, RTOL)
        assert c.ok, f"max_abs={c.max_abs_err:.3g} vs atol={ATOL} rtol={RTOL}"
        image = model_inputs.build(mid, "image", torch.float32)  # one image: a shorter row for 16 uncached steps
        assert _greedy(m16, _half(image), 16) == _greedy(model, image, 16)
    assert all(torch.equal(before[k], v) for k, v in m16.state_dict().items()), "revert must restore bitwise"
    assert not torch.isfinite(_logits(m16, b16)).all()  # and the model is the overflowing one again


def _greedy(model, batch, steps: int) -> list[int]:
    """Greedy tokens without a cache (the whole row each step): decoding the policy's model must match fp32's."""
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    out = []
    for _ in range(steps):
        nxt = _logits(model, dict(batch, input_ids=ids, attention_mask=mask, position_ids=pos))[:, -1].argmax(-1, True)
        out.append(int(nxt))
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = torch.cat([pos, pos[..., -1:].amax(0, keepdim=True).expand(3, -1, 1) + 1], -1)  # text: t = h = w
    return out


@pytest.mark.parametrize(("mid", "site", "peak", "first"), CASES, ids=IDS)
def test_gradscaler_training_is_finite_and_falls(mid, site, peak, first):
    """fp32 master weights, fp16 autocast compute, torch.amp.GradScaler: the policy's model trains; unpatched does not."""
    _skip(mid)
    model, _, _ = _planted(mid, site, peak)
    batch = model_inputs.build(mid, "image", torch.float32)  # one image (short row): training steps are the slow part on CPU
    labels = batch["input_ids"].masked_fill(batch["input_ids"] >= tiny.IMG, -100)

    def losses(m, steps):
        opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        out = []
        for _ in range(steps):
            m.model.rope_deltas = None
            with torch.autocast("cpu", dtype=torch.float16):
                loss = m(**batch, labels=labels, use_cache=False).loss
            out.append(float(loss.detach()))
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return out

    bare = copy.deepcopy(model).train()
    assert not all(map(torch.isfinite, torch.tensor(losses(bare, 1)))), "negative control: unpatched loss overflows"
    trained = copy.deepcopy(model).train()
    with portvlm.patch(trained, arch="sm70", calibration=batch):
        got = losses(trained, 3)
    assert all(torch.isfinite(torch.tensor(got))), got
    assert got[-1] < got[0], got


@pytest.mark.parametrize(("mid", "site", "peak", "first"), [c for c in CASES if c[1] != "vision_mlp_internal"],
                         ids=[i for i, c in zip(IDS, CASES, strict=True) if c[1] != "vision_mlp_internal"])
def test_rescale_leaves_gradients_and_the_adamw_trajectory_unchanged(mid, site, peak, first):
    """Training under the rescale is the unscaled model's training: same gradients, same AdamW steps (fp32
    arithmetic, where α = 2^-k scales exactly). Editing the writers' weights by α instead (the inference trick)
    gives them gradients 1/α× larger and, under Adam's ~lr-sized steps, a 1/α× larger relative learning rate: that
    diverged at step 2 at 7B widths on an H200 (benchmarks/fp16_guard.py)."""
    _skip(mid)
    model, _, _ = _planted(mid, site, peak)
    batch = model_inputs.build(mid, "image", torch.float32)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] >= tiny.IMG, -100)

    def train(m, steps=3):
        opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
        losses, grads = [], None
        for _ in range(steps):
            m.model.rope_deltas = None
            loss = m(**batch, labels=labels, use_cache=False).loss
            opt.zero_grad()
            loss.backward()
            grads = grads or {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
            opt.step()
            losses.append(float(loss.detach()))
        return losses, grads, {n: p.detach().clone() for n, p in m.named_parameters()}

    ref = copy.deepcopy(model).train()
    with portvlm.patch(ref, arch="sm70", guard=False) as handle:  # the same policy's kernels, nothing rescaled
        assert not any(c.kind == "rescale" for c in handle.report.fp16)
        ref_losses, ref_grads, ref_params = train(ref)
    m = copy.deepcopy(model).train()
    with portvlm.patch(m, arch="sm70", calibration=batch, guard=False) as handle:
        assert min(handle.fp16.alpha.values()) < 1.0 and any(c.kind == "rescale" for c in handle.report.fp16)
        losses, grads, params = train(m)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():  # the writers' included: a weight edit makes theirs 1/α× too large
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=lambda e, n=n: f"grad {n}: {e}")
    for n, p in params.items():
        torch.testing.assert_close(p, ref_params[n], rtol=1e-4, atol=1e-6, msg=lambda e, n=n: f"{n} after 3 steps: {e}")


class _Adapter(torch.nn.Module):
    """What PEFT's LoRA layer does to a target: hold it as ``base_layer`` and add its own output."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.delta = torch.nn.Linear(base.in_features, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.delta(x)


def test_a_writer_wrapped_after_the_rescale_is_refused_not_silently_unscaled():
    _skip("qwen2_5vl")
    model, batch, _ = _planted("qwen2_5vl", "text_down_proj", 1.2e5)
    m16 = copy.deepcopy(model).half()
    path = _path(model, "text_layers:1.mlp.down_proj")
    parent_path, _, name = path.rpartition(".")
    with portvlm.patch(m16, arch="sm70", calibration=batch, guard=False) as handle:
        assert any(c.kind == "rescale" and c.target == path for c in handle.report.fp16)
        parent = m16.get_submodule(parent_path)
        setattr(parent, name, _Adapter(getattr(parent, name)).half())  # get_peft_model after the patch
        with pytest.raises(portvlm.UnsupportedError, match=f"{path} was wrapped \\(_Adapter\\).*wrap first"):
            _logits(m16, _half(batch))
        setattr(parent, name, parent.get_submodule(name).base_layer)
        assert torch.isfinite(_logits(m16, _half(batch))).all()


@pytest.mark.parametrize(("mid", "site", "peak", "first"), [CASES[0], CASES[5]], ids=[IDS[0], IDS[5]])
def test_the_lean_scan_casts_one_module_at_a_time_and_finds_the_same(mid, site, peak, first):
    """A 7B model in fp16 on a 16 GB V100 cannot hold a second, fp32 copy for the scan: the lean scan casts each
    module's own tensors around its forward. Same overflows, α and islands as the whole-model cast; never more than
    one module's weights in fp32 at once; the fp16 weights bitwise as they were."""
    _skip(mid)
    model, batch, _ = _planted(mid, site, peak)
    m16 = copy.deepcopy(model).half()
    before = {k: v.clone() for k, v in m16.state_dict().items()}
    full = scan(m16, batch, lean=False)
    seen = []

    def count(module, args):
        seen.append(sum(p.numel() for p in m16.parameters() if p.dtype == torch.float32))
    hooks = [m.register_forward_pre_hook(count) for m in m16.modules()]
    try:
        lean = scan(m16, batch, lean=True)
    finally:
        for h in hooks:
            h.remove()
    biggest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in m16.modules())
    assert seen and max(seen) <= biggest, (max(seen), biggest)
    assert [o.path for o in lean.overflows] == [o.path for o in full.overflows] and lean.overflows
    assert lean.alpha == full.alpha and lean.islands.keys() == full.islands.keys()
    for o, f in zip(lean.overflows, full.overflows, strict=True):
        assert o.peak == pytest.approx(f.peak, rel=1e-2)  # the lean path sees fp16-rounded model inputs
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in m16.state_dict().items())


def test_fp32_policy_changes_nothing_and_notes_unused_calibration():
    model = tiny.build("qwen2_5vl")
    batch = model_inputs.build("qwen2_5vl", "text", torch.float32)
    with portvlm.patch(model, arch="cpu", calibration=batch) as handle:
        assert handle.fp16 is None and not handle.report.fp16
        assert any("calibration unused" in w for w in handle.report.warnings)


def test_check_names_the_overflow_never_a_leak_and_the_patched_policy():
    _skip("qwen2_5vl")
    model, batch, _ = _planted("qwen2_5vl", "vision_down_proj", 1.2e5)
    m16 = copy.deepcopy(model).half()
    report = portvlm.check(m16, inputs=batch)  # a model in fp16: the range scan runs without being asked
    assert not report.ok
    rng = next(c for c in report.checks if c.name == "fp16.range")
    site = _path(model, "vision_blocks:3.mlp.down_proj")
    assert not rng.ok and f"fp16 overflow at {site}: |x| up to" in rng.detail, rng.detail
    assert "rescales the vision residual stream by α=2^-3" in rng.detail
    assert report.figures.get("leak_max_abs") is None  # no "leak of inf"
    failed = [c for c in report.checks if not c.ok and c.name != "fp16.range"]
    assert failed and all("not an attention leak: fp16 overflow at" in c.detail for c in failed)
    assert "unpatched" in str(report).splitlines()[0]

    with portvlm.patch(m16, arch="sm70", calibration=batch):
        report = portvlm.check(m16, inputs=batch)
    assert report.policy == "sm70" and "arch sm70 policy" in str(report).splitlines()[0], str(report)
    assert report.ok, report


def test_the_dtype_decides_rocm_in_fp16_gets_the_guard_and_bf16_does_not():
    model = tiny.build("qwen2_5vl")
    with portvlm.patch(model, arch="gfx942", dtype=torch.float16) as handle:
        assert any(c.kind == "guard" for c in handle.report.fp16), handle.report
    with portvlm.patch(model, arch="gfx942", dtype=torch.bfloat16) as handle:
        assert handle.fp16 is None and not handle.report.fp16
