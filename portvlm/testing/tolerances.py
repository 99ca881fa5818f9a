"""The one tolerance table the suites hold results to: ``(device_kind, dtype, backend, direction) -> (atol, rtol)``.

A comparison passes where ``|patched - reference| <= atol + rtol * |reference|`` elementwise (``torch.allclose``).
The reference is always an unpatched fp32 eager model, so the tolerance budgets the *patched model's dtype and
kernels*, not the attention op alone.

Where the numbers come from (../shared/research/peers.md §3):
- transformers ``tests/test_modeling_common.py::_test_eager_matches_sdpa_inference``: atol fp32 1e-6, fp16 5e-3,
  bf16 1e-2; rtol fp32 1e-4, fp16 5e-3, bf16 1e-2 (3e-2 on CUDA with kernels on). Forward only.
- Liger-Kernel's multimodal mini-model convergence tests (``mini_qwen2_5_vl`` bf16): loss 5e-2/5e-2,
  logprobs 1e-1/1e-2, params 1e-2/1e-2.
Our comparisons are whole-model logits (O(1) magnitudes, two text layers, four ViT blocks) rather than one
attention call, so fp32 starts from 1e-5 absolute (summation-order noise of a masked vs split softmax is ~1e-6
per layer) and low precision from transformers' numbers widened by the depth of the model. Backward (gradients of
every parameter) gets 10× the forward budget, as gradient errors compound through both passes.

Device kinds: ``cpu``, ``sm70`` (Volta: fp16 with fp32 softmax/rotary upcasts, mem-efficient kernels),
``sm80+`` (Ampere/Hopper: flash-class kernels, bf16), ``gfx9`` (CDNA2/3 through AOTriton). An emulated run (an
arch's policy on other hardware) uses the kind of the *real* device it runs on: the kernels, hence the rounding,
are the host's.

Fallbacks, in order: the exact key; the same key with backend ``"*"``; for a GPU kind with no entry for that
dtype, the ``sm80+`` entry. An unknown device kind or dtype raises ``KeyError`` — never a silent default.

Every comparison of a model takes its budget from ``budget`` / ``loss_budget``: the table's entry, its atol times
the family's declared ``tolerance_scale`` (``portvlm.models.Family``, with its measured reason) for what passes
through the text model (logits, losses, gradients); vision-tower features are held to the table as it is. The scale
never widens rtol: the amplification it declares is of absolute noise.
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICE_KINDS = ("cpu", "sm70", "sm80+", "gfx9")
DIRECTIONS = ("fwd", "bwd")
ANY = "*"

# (device_kind, dtype, backend, direction) -> (atol, rtol)
TABLE: dict[tuple[str, str, str, str], tuple[float, float]] = {
    # CPU: fp32 is the CI lane; fp16/bf16 appear when a GPU arch's policy is emulated on a CPU host.
    ("cpu", "float32", ANY, "fwd"): (1e-5, 1e-4),
    ("cpu", "float32", ANY, "bwd"): (1e-4, 1e-3),
    ("cpu", "float16", ANY, "fwd"): (5e-2, 5e-2),  # transformers 5e-3 for one op; ×10 for a whole model in fp16
    ("cpu", "float16", ANY, "bwd"): (5e-1, 1e-1),
    ("cpu", "bfloat16", ANY, "fwd"): (1e-1, 5e-2),  # transformers 1e-2…3e-2 per op; Liger logprobs 1e-1
    ("cpu", "bfloat16", ANY, "bwd"): (1.0, 1e-1),
    # Volta: fp16 only (no bf16 units); fp32 softmax and rotary are upcast by the sm70 policy.
    ("sm70", "float32", ANY, "fwd"): (1e-4, 1e-3),  # TF32 is off on Volta, but kernels reorder sums
    ("sm70", "float32", ANY, "bwd"): (1e-3, 1e-2),
    ("sm70", "float16", ANY, "fwd"): (5e-2, 5e-2),
    ("sm70", "float16", ANY, "bwd"): (5e-1, 1e-1),
    # Ampere/Hopper: flash-class kernels; fp32 may run through TF32 matmuls.
    ("sm80+", "float32", ANY, "fwd"): (1e-4, 1e-3),
    ("sm80+", "float32", ANY, "bwd"): (1e-3, 1e-2),
    ("sm80+", "float16", ANY, "fwd"): (5e-2, 5e-2),
    ("sm80+", "float16", ANY, "bwd"): (5e-1, 1e-1),
    ("sm80+", "bfloat16", ANY, "fwd"): (1e-1, 5e-2),
    ("sm80+", "bfloat16", ANY, "bwd"): (1.0, 1e-1),
    # CDNA: AOTriton kernels; transformers reuses CUDA's numbers for ROCm, so do we until measured otherwise.
    ("gfx9", "float32", ANY, "fwd"): (1e-4, 1e-3),
    ("gfx9", "float32", ANY, "bwd"): (1e-3, 1e-2),
}

# Scalar losses (mean cross-entropy) compared between runs: transformers-free, Liger's 5e-2 for bf16.
LOSS = {"float32": (1e-5, 1e-5), "float16": (2e-2, 2e-2), "bfloat16": (5e-2, 5e-2)}


def device_kind(arch_id: str | None, device: str = "cpu") -> str:
    """Map a matrix arch id (``"cpu"``, ``"sm70"``, ``"sm90"``, ``"gfx942"``) to a tolerance device kind."""
    if device == "cpu" or arch_id in (None, "cpu"):
        return "cpu"
    if arch_id.startswith("gfx9"):
        return "gfx9"
    if arch_id.startswith("sm"):
        major = int(arch_id[2:-1] or 0) if arch_id[2:].isdigit() else 0
        return "sm70" if major < 8 else "sm80+"
    raise KeyError(f"no tolerance device kind for arch {arch_id!r}; known kinds: {', '.join(DEVICE_KINDS)}")


def _dtype_name(dtype) -> str:
    text = str(dtype).removeprefix("torch.")
    return {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}.get(text, text)


def tolerance(device_kind: str, dtype, backend: str | None, direction: str) -> tuple[float, float]:
    """``(atol, rtol)`` for comparing a patched model on ``device_kind`` in ``dtype`` to the fp32 eager reference."""
    if device_kind not in DEVICE_KINDS:
        raise KeyError(f"unknown device kind {device_kind!r}; known: {', '.join(DEVICE_KINDS)}")
    if direction not in DIRECTIONS:
        raise KeyError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    dt = _dtype_name(dtype)
    for key in (
        (device_kind, dt, backend or ANY, direction),
        (device_kind, dt, ANY, direction),
        ("sm80+", dt, ANY, direction) if device_kind in ("sm70", "gfx9") else None,
    ):
        if key is not None and key in TABLE:
            return TABLE[key]
    raise KeyError(f"no tolerance for ({device_kind}, {dt}, {backend}, {direction}); add it to portvlm.testing.tolerances.TABLE")


def loss_tolerance(dtype) -> tuple[float, float]:
    """``(atol, rtol)`` for scalar losses of the patched model against the reference."""
    return LOSS[_dtype_name(dtype)]


# What a comparison holds: the vision tower's features, or anything the text model computed (logits, losses,
# gradients, which flow back through it). A family's declared scale applies to "text" only.
OUTPUTS = ("vision", "text")


@dataclass(frozen=True)
class Budget:
    """An ``(atol, rtol)`` pair with its provenance: the family's declared scale and why (1.0 and "" for none)."""

    atol: float
    rtol: float
    scale: float = 1.0
    why: str = ""

    def __iter__(self):
        return iter((self.atol, self.rtol))

    def figures(self, prefix: str = "") -> dict:
        """``{atol, rtol}`` (and ``tolerance_scale`` / ``tolerance_why`` when scaled) for a result's figures."""
        out = {f"{prefix}atol": self.atol, f"{prefix}rtol": self.rtol}
        if self.scale != 1.0:
            out.update({f"{prefix}tolerance_scale": self.scale, f"{prefix}tolerance_why": self.why})
        return out


def _scaled(atol: float, rtol: float, family, output: str) -> Budget:
    if output not in OUTPUTS:
        raise KeyError(f"output must be one of {OUTPUTS}, got {output!r}")
    scale = float(getattr(family, "tolerance_scale", 1.0) or 1.0) if output == "text" else 1.0
    if scale == 1.0:
        return Budget(atol, rtol)
    why = getattr(family, "tolerance_why", "")
    if scale < 1.0 or not why:
        raise ValueError(f"family {getattr(family, 'model_type', family)!r} declares tolerance_scale {scale:g}; "
                         "a scale must be >= 1 and carry its measured reason (tolerance_why)")
    # atol only: the declared amplification is of absolute rounding noise (near-zero rows renormalised); scaling rtol
    # too made Qwen3.5's x30 budget admit 1.5x|ref| in bf16, its own negative control (upstream's packed-row mixing)
    return Budget(atol * scale, rtol, scale, why)


def budget(device_kind: str, dtype, backend: str | None, direction: str, *, family=None,
           output: str = "text") -> Budget:
    """``tolerance(...)``, its atol times ``family``'s declared ``tolerance_scale`` where ``output`` is "text" (else as is)."""
    return _scaled(*tolerance(device_kind, dtype, backend, direction), family, output)


def loss_budget(dtype, *, family=None) -> Budget:
    """``loss_tolerance(dtype)``, its atol times ``family``'s declared ``tolerance_scale`` (a loss passes the text model)."""
    return _scaled(*loss_tolerance(dtype), family, "text")
