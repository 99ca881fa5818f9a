"""fp16 that holds on real weights: a range scan, an exact residual-stream rescaling, fp32 islands and a guard.

    from portvlm.shims.fp16.scan import scan
    report = scan(model, batch)                   # fp32 arithmetic; each module's peak |output| vs 65504
    print(report)                                 # headroom per tower; "fp16 overflow at <path>: ..." when it fails
    with portvlm.patch(model, arch="sm70", calibration=batch) as handle:   # the sm70 policy fixes what it finds
        print(handle.report)                      # every rescaled module and fp32 island, and why

Why (facts: ../shared/research/fp16.md): Qwen2/2.5-VL in fp16 overflows in the last vision block's MLP down
projection (llama.cpp #17534: SwiGLU absmax ~4.3e3, then ``ffn_down`` = -inf), in text ``down_proj`` (vLLM #14126),
and inside Qwen3-VL's vision ``linear_fc1`` (unsloth-zoo #787). Clamps change the function (transformers #35151) and do
not help once the stream is NaN (vLLM #14126). Pre-norm blocks make the residual stream scale-invariant
(``Norm(αx) = Norm(x)`` with eps × α²), so making every module that writes the stream compute α× its output (α a
power of two: its input and bias scaled, its weights untouched, so training is unchanged) is exact; an overflow
inside a block (before the down projection) needs an fp32 island instead.

Nothing here imports torch at import time.
"""

from __future__ import annotations

FP16_MAX = 65504.0  # torch.finfo(torch.float16).max
FP16_TINY = 6.103515625e-05  # torch.finfo(torch.float16).tiny: the smallest normal; below it, subnormals lose bits
HEADROOM = 4.0  # α brings each calibrated stream peak to <= FP16_MAX / HEADROOM (room for inputs beyond the batch)

__all__ = ["FP16_MAX", "FP16_TINY", "HEADROOM"]
