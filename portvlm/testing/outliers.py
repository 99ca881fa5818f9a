"""Weights that reproduce the documented fp16 failure sites on a random-init model (tests and benchmarks/fp16_guard.py).

Real checkpoints grow outlier channels in training; random weights do not, so each site is planted: one MLP unit made
non-negative and reading one input channel (gate row = up row, so silu(z)·z = z²σ(z) >= 0; GELU: gelu(z) >= -0.17)
and its down-projection
column set so that, on the given batch in fp32, the target activation peaks at exactly ``peak`` (the next channel
at half of it):

- ``text_down_proj``: a text layer's MLP unit peaks at ``intermediate`` and its down_proj drives one residual channel
  to ``peak`` (vLLM #14126);
- ``vision_down_proj``: the last vision block's MLP intermediate peaks at ``intermediate`` (llama.cpp #17534: SwiGLU
  absmax ~4.3e3) and its down projection drives a vision residual channel to ``peak`` (``ffn_down`` = -inf in fp16);
- ``vision_mlp_internal``: the last vision block's first MLP projection (Qwen3-VL ``linear_fc1``, unsloth-zoo #787;
  ``up_proj`` on Qwen2.5-VL) peaks at ``peak`` while the down projection's column is divided by the same factor,
  so nothing outside the MLP changes: only an fp32 island fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from portvlm.shims.model_io import reset_rope_state

SITES = ("text_down_proj", "vision_down_proj", "vision_mlp_internal")


@dataclass(frozen=True)
class Planted:
    """Where an outlier was planted and the factor it took."""

    site: str
    path: str  # the module whose output (or, for internal sites, whose first projection's output) peaks
    unit: int  # the MLP unit used
    channel: int  # the residual channel written (-1 for internal sites)
    factor: float
    peak: float  # the fp32 peak it was planted at


def _mlp_parts(mlp):
    """(first projections feeding the unit, the down projection) of a SwiGLU (gate/up/down) or GELU (fc1/fc2) MLP."""
    if hasattr(mlp, "gate_proj"):
        return (mlp.gate_proj, mlp.up_proj), mlp.down_proj
    return (mlp.linear_fc1,), mlp.linear_fc2


def _unit_peak(model, module, unit: int, batch) -> float:
    """max |input[..., unit]| of ``module`` (a down projection) over ``batch`` in fp32."""
    import torch

    from portvlm.shims.fp16.scan import _as_batches, _to, fp32_arithmetic

    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(float(a[0][..., unit].abs().max())))
    device = next(model.parameters()).device
    try:
        with fp32_arithmetic(model), torch.no_grad():
            for b in _as_batches(batch):
                reset_rope_state(model)  # Qwen keeps rope deltas between calls
                model(**{k: _to(v, device, torch.float32) for k, v in b.items()}, use_cache=False)
    finally:
        handle.remove()
    return max(seen)


def plant(model, site: str, batch, *, peak: float, intermediate: float = 4.3e3, unit: int = 0, channel: int = 0,
          layer: int = -1) -> Planted:
    """Edit ``model``'s weights so ``site`` peaks at ``peak`` on ``batch`` (fp32); see the module docstring."""
    import torch

    from portvlm.shims.layer_paths import resolve

    if site not in SITES:
        raise ValueError(f"site {site!r}: one of {', '.join(SITES)}")
    paths = resolve(model)
    names = {id(m): n for n, m in model.named_modules()}
    block = paths.text_layers[layer] if site == "text_down_proj" else paths.vision_blocks[layer]
    firsts, down = _mlp_parts(block.mlp)
    with torch.no_grad():
        if site == "text_down_proj":
            # Every position carries channel 0 at a steady +4 (token embeddings and image features alike), so the
            # planted unit is large at every token, as a real massive-activation channel is: a unit that were large
            # at some tokens and near zero at others would amplify fp16's rounding of that small input instead.
            model.get_input_embeddings().weight[:, 0] += 4.0
            bridge = [m for m in paths.projector.modules() if isinstance(m, torch.nn.Linear)][-1]
            if bridge.bias is not None:
                bridge.bias[0] += 4.0
        if site == "vision_mlp_internal":
            first = firsts[-1]  # up_proj (SwiGLU: silu(g)·(K·u)/K is exact) or linear_fc1 (GELU: close for z > 0)
            seen = []
            handle = first.register_forward_hook(lambda m, a, o: seen.append(float(o[..., unit].abs().max())))
            try:
                _unit_peak(model, down, unit, batch)
            finally:
                handle.remove()
            factor = peak / max(seen)
            first.weight[unit] *= factor
            if first.bias is not None:
                first.bias[unit] *= factor
            down.weight[:, unit] /= factor
            return Planted(site, names[id(first)], unit, -1, factor, peak)
        for f in firsts:  # a non-negative unit: silu(z)·z = z²σ(z) (SwiGLU with gate row = up row) or gelu(z),
            # reading one input channel (z = s·n_0: one product, no cancellation for fp16 rounding to amplify)
            f.weight[unit] = 0.0
            f.weight[unit, 0] = 1.0
        # A large unit and a moderate down-projection weight, as real outliers are: amplifying a small unit by a
        # huge weight would amplify fp16's rounding of it too (and test that, not the overflow).
        if all(f.bias is not None for f in firsts):  # vision MLPs have biases: a steady unit, large at every patch
            for f in firsts:
                f.bias[unit] = intermediate ** (0.5 if len(firsts) > 1 else 1.0)
        else:
            for _ in range(2):  # z²σ(z) is not homogeneous in the row's scale: two steps land near `intermediate`
                scale = (intermediate / _unit_peak(model, down, unit, batch)) ** (0.5 if len(firsts) > 1 else 1.0)
                for f in firsts:
                    f.weight[unit] *= scale
        h = _unit_peak(model, down, unit, batch)
        down.weight[:, unit] = 0.0
        down.weight[channel, unit] = peak / h
        # A second channel at half the peak: the outlier is a direction, as in real models, so a clamp of the first
        # channel at 65504 changes where the norm points (a clamp is a negative control, never a fix).
        down.weight[(channel + 1) % down.weight.shape[0], unit] = peak / h / 2
        return Planted(site, names[id(down)], unit, channel, peak / h, peak)


__all__ = ["Planted", "SITES", "plant"]
