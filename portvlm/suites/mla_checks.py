"""The llava_mla family's own checks, run by the parity suite: full-rank oracles and cached decoding.

Oracles (each independent of the code path under test where it can be):

- all dims RoPE'd, full rank: the converted model IS the original function, so its logits must equal the unconverted
  MHA LLaVA's (transformers' own attention, unpatched fp32 eager) — this checks the joint SVD, the latent path
  and portvlm's attention path at once;
- uniform partial RoPE, full rank: the same frequencies for every head, so transformers' own MHA attention with its
  rotary output masked (``cos = 1``, ``sin = 0`` on the dropped dims) is the partial-RoPE MHA oracle;
- 2-norm partial RoPE, full rank: frequencies differ per KV head, which one shared rotary cannot express, so the
  oracle is the partial-RoPE MHA module (``convert(..., latent=False)``: same RoPE selection, direct k/v, no SVD);
- reduced rank: greedy decoding through ``LatentCache`` (the latent path, cache view, ``get_seq_length`` per step)
  equals a no-cache full forward over the same tokens, token for token, logits within tolerance.
"""

from __future__ import annotations

import contextlib

import torch

from portvlm.mla.conversion import Geometry, MLASpec, convert, full_rank, spec_of
from portvlm.testing.decode import greedy_cached, greedy_full

DECODE_TOKENS = 8


def _text_model(model):
    from portvlm.shims.layer_paths import resolve

    layers = resolve(model).text_layers
    return next(m for m in model.modules() if getattr(m, "layers", None) is layers)


@contextlib.contextmanager
def masked_rotary(model, spec: MLASpec):
    """Within: ``model``'s rotary embedding returns ``cos = 1, sin = 0`` on the dims ``spec`` (uniform) drops."""
    if spec.selection != "uniform":
        raise ValueError("one shared rotary can only mask a selection that is the same for every head (uniform)")
    from portvlm.mla.conversion import rope_index

    geo = Geometry.of(model.config)
    kept = rope_index(torch.zeros(1), torch.zeros(1), geo, spec)[0]
    drop = torch.ones(geo.head_dim, dtype=torch.bool)
    drop[kept] = False
    rotary = getattr(_text_model(model), "rotary_emb", None)
    if rotary is None:
        raise RuntimeError("the text backbone has no rotary_emb module to mask (transformers < 4.48)")

    def hook(module, args, output):
        cos, sin = output
        cos, sin = cos.clone(), sin.clone()
        cos[..., drop] = 1.0
        sin[..., drop] = 0.0
        return cos, sin

    handle = rotary.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def oracle_specs(geo: Geometry) -> dict[str, MLASpec]:
    """The full-rank conversions the oracles check: every dim RoPE'd, uniform partial, 2-norm partial."""
    partial = max(2, geo.head_dim // 4)
    return {
        "all_rope": MLASpec(rank=full_rank(geo, geo.head_dim), rope_dims=geo.head_dim, selection="2-norm"),
        "uniform": MLASpec(rank=full_rank(geo, partial), rope_dims=partial, selection="uniform"),
        "2-norm": MLASpec(rank=full_rank(geo, partial), rope_dims=partial, selection="2-norm"),
    }


@torch.no_grad()
def oracle_logits(base, spec: MLASpec, name: str, inputs: dict, clone) -> torch.Tensor:
    """The oracle's logits for ``spec`` on ``inputs``: see the module docstring. ``base`` is an unconverted MHA LLaVA."""
    if name == "all_rope":
        return base(**inputs, use_cache=False).logits
    if name == "uniform":
        with masked_rotary(base, spec):
            return base(**inputs, use_cache=False).logits
    oracle = convert(clone(base), spec, latent=False)
    return oracle(**inputs, use_cache=False).logits


def figures_of(model, dtype) -> dict:
    """KV bytes per token, MHA vs MLA, for a converted model in ``dtype``."""
    from portvlm.mla.conversion import kv_figures

    spec = spec_of(model)
    if spec is None:
        raise ValueError("not an MLA-converted model (no portvlm_mla spec): convert() it first")
    return kv_figures(Geometry.of(model.config), spec, torch.empty((), dtype=dtype).element_size())


# ----------------------------------------------------------------------------------------------------------------
# Suite hooks (the parity suite calls ``parity_checks`` for llava_mla; the streaming suite ``streaming_checks``)
# ----------------------------------------------------------------------------------------------------------------


def parity_checks(ctx, rec, timer) -> None:
    """Full-rank oracles (through ``portvlm.patch``) and reduced-rank cached decoding, as checks on ``rec``."""
    from portvlm.mla.cache import LatentCache
    from portvlm.models import inputs as model_inputs
    from portvlm.models import tiny
    from portvlm.suites._common import PATCHED_BUILD_ATTN, check_from, compare, patched, tol, torch_dtype

    dtype = torch_dtype(ctx.dtype)
    atol, rtol = tol(ctx, "fwd")
    base = tiny.build("llava", attn_implementation="eager", seed=ctx.seed)  # the unconverted MHA LLaVA
    geo = Geometry.of(base.config)

    def clone(model, attn="eager"):
        return tiny.clone(model, attn_implementation=attn, model_id="llava")

    kinds = ("image", "padded_batch")
    errs = {}
    with timer("mla_oracles"):
        for name, spec in oracle_specs(geo).items():
            for kind in kinds:
                inp32 = model_inputs.build("llava", kind, torch.float32, seed=ctx.seed)
                expected = oracle_logits(base, spec, name, inp32, clone)
                model = convert(clone(base, PATCHED_BUILD_ATTN), spec).to(ctx.device)
                with patched(model, ctx), torch.no_grad():
                    model.to(dtype)
                    inp = {k: (v.to(dtype) if v.is_floating_point() else v).to(ctx.device)
                           for k, v in model_inputs.build("llava", kind, dtype, seed=ctx.seed).items()}
                    got = model(**inp, use_cache=False).logits.float().cpu()
                c = compare(got, expected, atol, rtol, mask=inp32["attention_mask"].bool())
                errs[f"{name}.{kind}"] = c.max_abs_err
                oracle = {"all_rope": "the unconverted MHA model", "uniform": "MHA with its rotary masked to the kept dims",
                          "2-norm": "the partial-RoPE MHA module (no SVD)"}[name]
                rec.add(check_from(f"mla.full_rank.{name}.{kind}", c,
                                   what=f"rank {spec.rank}, rope_dims {spec.rope_dims} ({spec.selection}) vs {oracle}; "))
    rec.figures["mla_full_rank_err"] = errs

    with timer("mla_decode"):
        model = tiny.build("llava_mla", attn_implementation=PATCHED_BUILD_ATTN, seed=ctx.seed).to(ctx.device)
        with patched(model, ctx):
            model.to(dtype)
            inp = {k: (v.to(dtype) if v.is_floating_point() else v).to(ctx.device)
                   for k, v in model_inputs.build("llava_mla", "image", dtype, seed=ctx.seed).items()}
            inp.pop("position_ids")
            cache = LatentCache()
            cached_tokens, cached_logits = greedy_cached(model, inp, DECODE_TOKENS, cache)
            full_tokens, full_logits = greedy_full(model, inp, DECODE_TOKENS)
            seq = cache.get_seq_length()
            paths = sorted({m.last_attention for m in model.modules() if hasattr(m, "last_attention")})
    want = inp["input_ids"].shape[1] + DECODE_TOKENS - 1
    rec.figures["mla_attention_functions"] = paths
    rec.check("mla.attention_through_portvlm", bool(paths) and all(p.startswith("portvlm.shims.") for p in paths),
              detail=f"MLAAttention called {paths} under portvlm.patch (config._attn_implementation -> registry)")
    spec = spec_of(model)
    rec.figures["mla_decode"] = {"rank": spec.rank, "rope_dims": spec.rope_dims, "cached": cached_tokens, "full": full_tokens}
    rec.check("mla.decode.cached_equals_full_forward_tokens", cached_tokens == full_tokens,
              detail=f"rank {spec.rank} of {full_rank(geo, spec.rope_dims)}: cached {cached_tokens} vs no-cache {full_tokens}")
    c = compare(torch.cat(cached_logits).cpu(), torch.cat(full_logits).cpu(), atol, rtol)
    rec.add(check_from("mla.decode.cached_logits_equal_full_forward", c, what=f"{DECODE_TOKENS} greedy steps; "))
    rec.check("mla.decode.cache_length", seq == want, detail=f"LatentCache.get_seq_length() = {seq}, tokens fed {want}",
              value=seq, bound=want)


def streaming_checks(rec, stream, spec: MLASpec, geo: Geometry) -> None:
    """A latent stream's cache holds exactly ``kv_bytes_per_token`` per cached token (measured vs declared)."""
    from portvlm.mla.cache import stored_bytes
    from portvlm.mla.conversion import kv_bytes_per_token
    from portvlm.shims.kv_cache import CacheView

    view = CacheView(stream.cache)
    n = view.seq_length(0)
    first = view.keys(0)
    declared = kv_bytes_per_token(geo, spec, first.element_size()) if first is not None else 0
    measured = stored_bytes(stream.cache) / max(n, 1)
    rec.figures["mla_cache_bytes_per_token"] = {"measured": measured, "declared": declared, "tokens": n}
    rec.check("mla.cache_bytes_per_token", n > 0 and measured == declared,
              detail=f"{stored_bytes(stream.cache)} B held for {n} tokens = {measured:g} B/token; declared {declared}",
              value=measured, bound=declared)
