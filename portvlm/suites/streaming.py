"""Streaming smoke (StreamingVLM-style): video frames arrive in chunks; each chunk is prefilled into the KV cache
and a few tokens are generated greedily; the cache keeps attention-sink tokens plus a sliding window of the most
recent tokens (vision and text alike). The cache is ``portvlm.shims.kv_cache.SinkWindowCache`` (built on
``CacheView``), so the same code runs on ``key_cache`` lists (≤4.53), ``cache.layers`` (4.54+) and 5.x.

- Equivalence: with a window larger than the stream nothing is evicted, so the logits of every streamed step
  must equal one full forward over the whole stream (same explicit mrope positions; tolerance table).
- Boundedness: with a small window over ≥20 chunks the cache length is constant after warm-up, outputs stay
  finite, and two runs give identical tokens.
- Accessor consistency: after every step, what ``CacheView`` reads equals what the cache object stores (read
  here natively, independently of the shim), and the sink tokens never change. A shim returning stale keys fails.
"""

from __future__ import annotations

import traceback

import torch

from portvlm import models
from portvlm.models import inputs as model_inputs
from portvlm.models import tiny
from portvlm.models.inputs import Segment
from portvlm.shims.kv_cache import cache_kwargs
from portvlm.suites._common import (
    PATCHED_BUILD_ATTN,
    Recorder,
    Timer,
    check_from,
    compare,
    logits_of,
    patched,
    report_summary,
    tol,
    torch_dtype,
)

CHUNK_GRID = (1, 4, 4)  # one temporal patch (2 frames) of 4×4 patches per chunk -> 4 merged tokens
GEN_TOKENS = 2
SINK, WINDOW = 4, 24
EQUIV_CHUNKS = 4
BOUNDED_CHUNKS = 20


def native_kv(cache, i: int):
    """Layer ``i``'s (keys, values) read straight from the cache object — the suite's own oracle, not the shim."""
    if isinstance(getattr(cache, "layers", None), list):
        layer = cache.layers[i]
        return layer.keys, layer.values
    return vars(cache)["key_cache"][i], vars(cache)["value_cache"][i]


def native_layers(cache) -> int:
    return len(cache.layers) if isinstance(getattr(cache, "layers", None), list) else len(vars(cache)["key_cache"])


def kv_layers(cache) -> list[int]:
    """Indexes of the layers that hold keys/values: a hybrid cache's linear-attention layers (Qwen3.5's Gated
    DeltaNet: a conv window and a recurrent state, no sequence axis) have nothing to read, evict or bound."""
    layers = cache.layers if isinstance(getattr(cache, "layers", None), list) else None
    return [i for i in range(native_layers(cache)) if layers is None or not hasattr(layers[i], "recurrent_states")]


def cache_api(cache) -> str:
    return "layers" if isinstance(getattr(cache, "layers", None), list) else "key_cache lists"


class Stream:
    """Feeds chunks + greedy tokens into one model with one cache, keeping ids/positions/pixels for a full replay."""

    def __init__(self, ctx, model, cache, dtype):
        self.ctx, self.model, self.cache, self.dtype = ctx, model, cache, dtype
        self.mid = models.by_id(ctx.model_id).model_id  # llava_mla streams LLaVA inputs
        self.geo = tiny.geometry(self.mid)
        self.segments: list[Segment] = []  # Qwen: what was fed, for positions and the full replay
        self.ids: list[int] = []
        self.pixels: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.tokens: list[int] = []
        self.sizes: list[int] = []
        self.gen = torch.Generator().manual_seed(ctx.seed + 7)

    def _positions(self, n_new: int) -> torch.Tensor:
        if self.mid == "llava":
            total = len(self.ids)
            return torch.arange(total - n_new, total)[None]
        return model_inputs.mrope_positions(self.geo, self.segments)[:, None, -n_new:]

    def _feed(self, new_ids: list[int], extra: dict) -> torch.Tensor:
        self.ids += new_ids
        pos = self._positions(len(new_ids))
        out = self.model(
            input_ids=torch.tensor([new_ids], device=self.ctx.device),
            position_ids=pos.to(self.ctx.device),
            use_cache=True,
            **cache_kwargs(self.model, self.cache),  # `cache` on 5.24+, `past_key_values` before (kv_cache shim)
            **extra,
        )
        logits = logits_of(out)[0].float().cpu()
        self.logits.append(logits)
        return logits

    def chunk(self, text_tokens: list[int]) -> None:
        """One chunk of video (or an image for LLaVA) plus a short prompt, then ``GEN_TOKENS`` greedy tokens."""
        if self.mid == "llava":
            size = self.geo.image_size
            px = torch.randn(1, self.geo.channels, size, size, generator=self.gen).to(self.dtype)
            new_ids = [self.geo.image] * self.geo.image_tokens + text_tokens
            extra = {"pixel_values": px.to(self.ctx.device)}
        else:
            t, h, w = CHUNK_GRID
            px = torch.randn(t * h * w, self.geo.pixel_dim, generator=self.gen).to(self.dtype)
            seg = Segment("video", grid=CHUNK_GRID)
            new_ids = model_inputs.vision_tokens(self.geo, seg) + text_tokens
            self.segments += [seg, Segment("text", list(text_tokens))]
            extra = {"pixel_values_videos": px.to(self.ctx.device), "video_grid_thw": torch.tensor([CHUNK_GRID], device=self.ctx.device)}
        self.pixels.append(px)
        logits = self._feed(new_ids, extra)
        for _ in range(GEN_TOKENS):
            tok = int(logits[-1].argmax())
            self.tokens.append(tok)
            if self.mid != "llava":
                self.segments.append(Segment("text", [tok]))
            logits = self._feed([tok], {})
        self.sizes.append(native_kv(self.cache, kv_layers(self.cache)[0])[0].shape[-2])

    def replay_inputs(self) -> dict:
        """Kwargs for one full forward over everything streamed so far."""
        ids = torch.tensor([self.ids], device=self.ctx.device)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
        if self.mid == "llava":
            kw["pixel_values"] = torch.cat(self.pixels, 0).to(self.ctx.device)
            kw["position_ids"] = torch.arange(len(self.ids), device=self.ctx.device)[None]
        else:
            kw["pixel_values_videos"] = torch.cat(self.pixels, 0).to(self.ctx.device)
            kw["video_grid_thw"] = torch.tensor([CHUNK_GRID] * len(self.pixels), device=self.ctx.device)
            kw["position_ids"] = model_inputs.mrope_positions(self.geo, self.segments)[:, None, :].to(self.ctx.device)
        return kw


def _consistency(cache, sink_snapshot) -> list[str]:
    """Where ``CacheView`` disagrees with the cache's own storage, or the sink tokens changed (empty = fine)."""
    from portvlm.shims.kv_cache import CacheView

    view = CacheView(cache)
    problems = []
    for i in kv_layers(cache):
        nk, nv = native_kv(cache, i)
        vk, vv = view.keys(i), view.values(i)
        if vk is None or vk.shape != nk.shape or not torch.equal(vk, nk):
            problems.append(f"layer {i}: CacheView.keys {None if vk is None else tuple(vk.shape)} != stored {tuple(nk.shape)}")
        elif vv is None or vv.shape != nv.shape or not torch.equal(vv, nv):
            problems.append(f"layer {i}: CacheView.values disagree with the stored values")
        if view.seq_length(i) != nk.shape[-2]:
            problems.append(f"layer {i}: CacheView.seq_length {view.seq_length(i)} != stored {nk.shape[-2]}")
        if sink_snapshot is not None and i in sink_snapshot:
            n = sink_snapshot[i].shape[-2]
            if nk.shape[-2] < n or not torch.equal(nk[..., :n, :], sink_snapshot[i]):
                problems.append(f"layer {i}: attention-sink keys changed")
    return problems


def _prompt(i: int) -> list[int]:
    return [10 + (i % 50)]


def cache_class(model_id: str):
    """The streaming cache of a family: ``SinkWindowCache``; llava_mla's latent one (k_rope + latent per layer)."""
    if model_id == "llava_mla":
        from portvlm.mla.cache import LatentSinkWindowCache

        return LatentSinkWindowCache
    from portvlm.shims.kv_cache import SinkWindowCache

    return SinkWindowCache


def cache_config(model) -> dict:
    """``{"config": text config}`` where the text model mixes in linear-attention layers (the cache must build one
    conv + recurrent state layer for each: ``DynamicCache(config=...)``, 5.x); ``{}`` otherwise."""
    from portvlm.shims import linear_attention

    if not linear_attention.linear_modules(model):
        return {}
    cfg = model.config
    return {"config": cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg}


def _run_stream(ctx, model, dtype, sink, window, chunks, check_every=True, cache_cls=None):
    # hybrid text (Qwen3.5): the attention layers keep sink + window, the DeltaNet layers their (constant-size)
    # conv window and recurrent state, so the stream carries recurrent state and KV cache together
    cache = (cache_cls or cache_class(ctx.model_id))(sink=sink, window=window, **cache_config(model))
    stream = Stream(ctx, model, cache, dtype)
    problems: list[str] = []
    sink_snapshot = None
    for c in range(chunks):
        stream.chunk(_prompt(c))
        if sink_snapshot is None:
            sink_snapshot = {i: native_kv(cache, i)[0][..., :sink, :].clone() for i in kv_layers(cache)}
        if check_every:
            problems += [f"chunk {c}: {p}" for p in _consistency(cache, sink_snapshot)]
    return stream, problems


@torch.no_grad()
def run(ctx, cache_cls=None):
    """``cache_cls``: tests only, a streaming cache in place of the family's (negative controls)."""
    rec = Recorder("streaming")
    timer = Timer()
    dtype = torch_dtype(ctx.dtype)
    mid = ctx.model_id
    atol, rtol = tol(ctx, "fwd")
    with timer("build"):
        ref = tiny.build(mid, attn_implementation="eager", seed=ctx.seed)
        model = tiny.clone(ref, attn_implementation=PATCHED_BUILD_ATTN, model_id=mid).to(ctx.device)
        del ref
    rec.figures.update(sink=SINK, window=WINDOW, chunk_grid=list(CHUNK_GRID), gen_tokens_per_chunk=GEN_TOKENS, atol=atol, rtol=rtol)

    with patched(model, ctx) as handle:
        model.to(dtype)
        rec.figures["patch_report"] = report_summary(handle)

        # 1. Equivalence: window larger than the stream -> nothing evicted -> streamed == one full forward.
        try:
            with timer("equivalence"):
                stream, problems = _run_stream(ctx, model, dtype, SINK, 10_000, EQUIV_CHUNKS, cache_cls=cache_cls)
                full = logits_of(model(**stream.replay_inputs()))[0].float().cpu()
            streamed = torch.cat(stream.logits, 0)
            rec.figures["cache_api"] = cache_api(stream.cache)
            rec.figures["equivalence_tokens"] = len(stream.ids)
            c = compare(streamed, full, atol, rtol)
            rec.figures["equivalence_max_abs_err"] = c.max_abs_err
            rec.figures["equivalence_max_rel_err"] = c.max_rel_err
            rec.add(check_from("equivalence.streamed_equals_full_forward", c, what=f"{EQUIV_CHUNKS} chunks, {len(stream.ids)} tokens; "))
            rec.check(
                "equivalence.no_eviction",
                stream.sizes[-1] == len(stream.ids),
                detail=f"cache holds {stream.sizes[-1]} of {len(stream.ids)} streamed tokens",
                value=stream.sizes[-1],
                bound=len(stream.ids),
            )
            rec.check("equivalence.cache_view_consistent", not problems, detail="; ".join(problems[:3]) or "CacheView agrees with the stored cache after every chunk", value=len(problems), bound=0)
        except Exception as exc:  # noqa: BLE001 - a stream that crashes mid-way is a streaming failure
            rec.check("equivalence.stream_completes", False, detail=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")

        # 2. Boundedness: small window, >= 20 chunks; constant size after warm-up, finite, deterministic.
        try:
            with timer("bounded"):
                runs = [_run_stream(ctx, model, dtype, SINK, WINDOW, BOUNDED_CHUNKS, check_every=(r == 0), cache_cls=cache_cls)
                        for r in range(2)]
            (s1, problems), (s2, _) = runs
            sizes = s1.sizes
            bound = SINK + WINDOW
            warm = next((i for i, s in enumerate(sizes) if s == bound), len(sizes))
            after = sizes[warm:]
            rec.figures["cache_sizes"] = sizes
            rec.figures["warmup_chunks"] = warm
            rec.figures["stream_tokens"] = len(s1.ids)
            rec.figures["tokens"] = s1.tokens
            rec.check("bounded.reaches_window", warm < len(sizes) - 1, detail=f"cache reached sink+window={bound} after {warm + 1} of {len(sizes)} chunks", value=warm, bound=len(sizes) - 2)
            rec.check(
                "bounded.constant_after_warmup",
                bool(after) and all(s == bound for s in after) and max(sizes) <= bound,
                detail=f"sizes per chunk {sizes}",
                value=max(sizes),
                bound=bound,
            )
            finite = all(bool(torch.isfinite(lg).all()) for lg in s1.logits + s2.logits)
            rec.check("bounded.finite", finite, detail=f"{len(s1.logits) + len(s2.logits)} forward outputs")
            rec.check("bounded.deterministic", s1.tokens == s2.tokens, detail=f"run 1 {s1.tokens[:8]}… vs run 2 {s2.tokens[:8]}…")
            rec.check("bounded.cache_view_consistent", not problems, detail="; ".join(problems[:3]) or "CacheView agrees with the stored cache after every chunk; sink keys unchanged", value=len(problems), bound=0)
            if mid == "llava_mla":  # the latent cache holds what the KV figure says, evicted or not
                from portvlm.mla.conversion import Geometry
                from portvlm.suites import mla_checks

                mla_checks.streaming_checks(rec, s1, mla_checks.spec_of(model), Geometry.of(model.config))
        except Exception as exc:  # noqa: BLE001
            rec.check("bounded.stream_completes", False, detail=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")

    rec.figures["times_s"] = timer.t
    return rec.result()
