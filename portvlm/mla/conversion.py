"""MHA2MLA conversion of a LLaVA's text backbone: partial RoPE + one joint SVD of W_k(nope) and W_v.

Follows JT-Ushio/MHA2MLA (``patching_model_load.py``, ``svd_init_method="joint"``; ../shared/research/scale-out.md
§3), which VLM-MLA applies to LLaVA-1.5:

- Partial RoPE: of each head's ``head_dim/2`` rotary frequencies, ``rope_dims/2`` are kept (a frequency rotates the
  dim pair ``(i, i + head_dim/2)``); the other dims lose their rotation ("nope"). ``selection="2-norm"`` ranks the
  frequencies of each KV head by ``‖W_q[pair]‖·‖W_k[pair]‖`` summed over the head's query group (MHA2MLA ranks by
  the same product on activations; the weights make it data-free and version-independent); ``"uniform"`` takes
  every ``(head_dim/2)/(rope_dims/2)``-th frequency for every head. ``rope_dims = head_dim`` keeps every dim RoPE'd:
  the converted model is then the original function, which is how the full-rank oracle compares against it.
- Joint SVD: ``[W_k_nope; W_v] = U S Vᵀ`` over all KV heads at once, truncated to ``rank · n_kv``;
  ``kv_down = √S Vᵀ`` (the latent all KV heads share), ``k_up`` / ``v_up`` = the matching rows of ``U √S``.
  Biases of k/v move to the up-projections (exact). Computed in float64, stored in the weights' dtype.

KV bytes per token and layer: MHA stores ``2 · n_kv · head_dim`` values, MLA ``n_kv · rope_dims + rank · n_kv``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch

SELECTIONS = ("2-norm", "uniform")
SPEC_ATTR = "portvlm_mla"  # the converted model keeps its MLASpec here


@dataclass(frozen=True)
class MLASpec:
    """How a model was (or is to be) converted."""

    rank: int  # latent dims per KV head: the latent holds rank · n_kv values per token and layer
    rope_dims: int  # RoPE'd dims kept per KV head as k_rope (even; head_dim keeps the original function)
    selection: str = "2-norm"  # which rotary frequencies stay: one of SELECTIONS

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Geometry:
    """The attention shape of a text backbone (read from its config)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> Geometry:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        return cls(
            layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        )


def spec_reasons(spec: MLASpec, geo: Geometry) -> list[str]:
    """Why ``spec`` cannot convert a backbone of shape ``geo`` (empty: it can)."""
    reasons = []
    if spec.selection not in SELECTIONS:
        reasons.append(f"selection {spec.selection!r} is not one of {', '.join(SELECTIONS)}")
    if spec.rope_dims % 2 or not 2 <= spec.rope_dims <= geo.head_dim:
        reasons.append(f"rope_dims must be even and in [2, head_dim={geo.head_dim}] (a RoPE frequency rotates a pair "
                       f"of dims; at least one pair keeps positions in k_rope), got {spec.rope_dims}")
    elif spec.selection == "uniform" and (geo.head_dim // 2) % (spec.rope_dims // 2):
        reasons.append(f"uniform selection needs rope_dims/2 to divide head_dim/2={geo.head_dim // 2}, "
                       f"got rope_dims={spec.rope_dims}; use selection='2-norm' or another rope_dims")
    limit = full_rank(geo, spec.rope_dims) if not reasons else None
    if spec.rank < 1 or (limit is not None and spec.rank > limit):
        reasons.append(f"rank must be in [1, {limit}] for this backbone and rope_dims={spec.rope_dims} "
                       f"(the joint [W_k_nope; W_v] has rank <= {limit} per KV head), got {spec.rank}")
    return reasons


def full_rank(geo: Geometry, rope_dims: int) -> int:
    """The smallest rank per KV head at which the joint SVD is exact: ``min(rows, hidden) / n_kv`` rounded up."""
    rows = geo.kv_heads * (geo.head_dim - rope_dims + geo.head_dim)
    return -(-min(rows, geo.hidden) // geo.kv_heads)


def mha_kv_bytes_per_token(geo: Geometry, element_size: int) -> int:
    """Bytes an MHA cache stores per token over all layers: K and V, ``n_kv · head_dim`` each."""
    return geo.layers * 2 * geo.kv_heads * geo.head_dim * element_size


def kv_bytes_per_token(geo: Geometry, spec: MLASpec, element_size: int) -> int:
    """Bytes the latent cache stores per token over all layers: ``k_rope`` (n_kv · rope_dims) + latent (rank · n_kv)."""
    return geo.layers * (geo.kv_heads * spec.rope_dims + spec.rank * geo.kv_heads) * element_size


def kv_figures(geo: Geometry, spec: MLASpec, element_size: int) -> dict:
    """The figures every llava_mla result carries: KV bytes per token, MHA vs MLA, at the tested rank."""
    mha = mha_kv_bytes_per_token(geo, element_size)
    mla = kv_bytes_per_token(geo, spec, element_size)
    return {"mha": mha, "mla": mla, "ratio": round(mla / mha, 4), "rank": spec.rank, "rope_dims": spec.rope_dims,
            "selection": spec.selection, "element_size": element_size, "layers": geo.layers,
            "kv_heads": geo.kv_heads, "head_dim": geo.head_dim}


# ----------------------------------------------------------------------------------------------------------------
# Partial RoPE
# ----------------------------------------------------------------------------------------------------------------


def rope_index(q_weight: torch.Tensor, k_weight: torch.Tensor, geo: Geometry, spec: MLASpec) -> torch.Tensor:
    """``[n_kv, rope_dims]`` key dims kept RoPE'd per KV head: chosen frequencies ``f``, as ``[f…, f + head_dim/2…]``."""
    half, pairs = geo.head_dim // 2, spec.rope_dims // 2
    if spec.selection == "uniform":
        freqs = torch.arange(0, half, half // pairs)[:pairs].expand(geo.kv_heads, pairs)
    else:
        q = q_weight.detach().double().view(geo.kv_heads, geo.heads // geo.kv_heads, geo.head_dim, -1)
        k = k_weight.detach().double().view(geo.kv_heads, geo.head_dim, -1)
        q_pair = (q[:, :, :half].pow(2).sum(-1) + q[:, :, half:].pow(2).sum(-1)).sqrt()  # [n_kv, group, half]
        k_pair = (k[:, :half].pow(2).sum(-1) + k[:, half:].pow(2).sum(-1)).sqrt()  # [n_kv, half]
        score = (q_pair * k_pair[:, None]).sum(1)
        freqs = score.topk(pairs, dim=-1).indices.sort(dim=-1).values
    return torch.cat((freqs, freqs + half), dim=-1).long()


# ----------------------------------------------------------------------------------------------------------------
# Joint SVD
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LowRankKV:
    """``kv_down`` ([rank·n_kv, hidden]), ``k_up`` ([n_kv·nope, rank·n_kv]), ``v_up`` ([n_kv·head_dim, rank·n_kv])."""

    down: torch.Tensor
    k_up: torch.Tensor
    v_up: torch.Tensor
    singular_values: torch.Tensor


SVD_METHODS = ("full", "gram")


def joint_svd(k_nope: torch.Tensor, v: torch.Tensor, latent_dim: int, method: str = "full") -> LowRankKV:
    """Factor ``[k_nope; v]`` (rows × hidden) at ``latent_dim``: down = √S Vᵀ, up = U √S, split back into k and v rows.

    ``method="gram"``: the top right singular vectors from ``eigh(WᵀW)`` (hidden × hidden, float64) and
    ``up = W V / √S`` — the same truncation (``up @ down = W V Vᵀ``), much faster than a full SVD of a
    7,168 × 4,096 matrix per layer on a GPU (LLaVA-1.5-7B); accurate for the singular values kept.
    """
    w = torch.cat((k_nope, v), 0).double()
    if method == "gram":
        evals, evecs = torch.linalg.eigh(w.T @ w)  # ascending
        s = evals.flip(0)[:latent_dim].clamp_min(0).sqrt()
        vecs = evecs.flip(1)[:, :latent_dim]
        root = s.sqrt()
        up = torch.where(root > 0, (w @ vecs) / torch.where(root > 0, root, 1.0), 0.0)
        vh = vecs.T
    elif method == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :latent_dim], s[:latent_dim], vh[:latent_dim]
        root = s.sqrt()
        up = u * root[None]
    else:
        raise ValueError(f"svd method {method!r} is not one of {', '.join(SVD_METHODS)}")
    if latent_dim > s.shape[0]:  # a latent wider than the matrix's rank: pad with zero directions (still exact)
        pad = latent_dim - s.shape[0]
        up = torch.cat((up, up.new_zeros(up.shape[0], pad)), 1)
        vh = torch.cat((vh, vh.new_zeros(pad, vh.shape[1])), 0)
        root = torch.cat((root, root.new_zeros(pad)))
    down = root[:, None] * vh
    n = k_nope.shape[0]
    return LowRankKV(down=down, k_up=up[:n], v_up=up[n:], singular_values=s)


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


def _text_layers(model):
    from portvlm.shims.layer_paths import resolve

    return resolve(model).text_layers


def convert(model, spec: MLASpec, *, latent: bool = True, svd: str = "full"):
    """Replace every text decoder layer's ``self_attn`` of ``model`` (a LLaVA) by ``MLAAttention``; returns ``model``.

    ``latent=False`` converts to the partial-RoPE MHA oracle instead (same RoPE selection, no SVD). ``svd``: one
    of ``SVD_METHODS`` (``joint_svd``).
    """
    from portvlm.errors import UnsupportedError
    from portvlm.mla.attention import MLAAttention

    geo = Geometry.of(model.config)
    reasons = spec_reasons(spec, geo)
    if reasons:
        raise ValueError(f"cannot convert to MLA with {spec}: " + "; ".join(reasons))
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = _text_layers(model)
    for i, layer in enumerate(layers):
        old = getattr(layer, "self_attn", None)
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(old, n)]
        if missing:
            raise UnsupportedError(f"text layer {i} ({type(old).__name__}) has no {', '.join(missing)}: "
                                   "MHA2MLA converts Llama-style attention (q/k/v/o projections) only")
        q_w, k_w, v_w = old.q_proj.weight, old.k_proj.weight, old.v_proj.weight
        bias = old.k_proj.bias is not None
        index = rope_index(q_w, k_w, geo, spec)
        backbone = sys.modules.get(type(old).__module__)
        with torch.device(q_w.device):  # built where the weights are (a 7B layer's init on a CPU takes seconds)
            new = MLAAttention(
                getattr(old, "config", text_config), getattr(old, "layer_idx", i),
                num_heads=geo.heads, num_kv_heads=geo.kv_heads, head_dim=geo.head_dim, hidden_size=geo.hidden,
                rank=spec.rank, rope_index=index, bias=bias, eager_module=type(old).__module__, latent=latent,
                returns_cache=returns_cache(backbone),
            ).to(dtype=q_w.dtype)
        with torch.no_grad():
            _copy(new.q_proj, old.q_proj.weight, old.q_proj.bias)
            _copy(new.o_proj, old.o_proj.weight, old.o_proj.bias)
            k_heads = k_w.view(geo.kv_heads, geo.head_dim, -1)
            rows = lambda t, idx: torch.cat([t.view(geo.kv_heads, geo.head_dim, -1)[h, idx[h]] for h in range(geo.kv_heads)])  # noqa: E731
            k_b = old.k_proj.bias.view(geo.kv_heads, geo.head_dim, 1) if bias else None
            _copy(new.k_rope_proj, rows(k_heads, index), rows(k_b, index).flatten() if bias else None)
            k_nope = rows(k_heads, new.nope_index)
            k_nope_b = rows(k_b, new.nope_index).flatten() if bias else None
            if latent:
                low = joint_svd(k_nope, v_w, spec.rank * geo.kv_heads, svd)
                _copy(new.kv_down, low.down, None)
                _copy(new.k_up, low.k_up, k_nope_b)
                _copy(new.v_up, low.v_up, old.v_proj.bias)
            else:
                _copy(new.k_nope_proj, k_nope, k_nope_b)
                _copy(new.v_proj, v_w, old.v_proj.bias)
        new.train(old.training)
        layer.self_attn = new
    setattr(model, SPEC_ATTR, spec)
    return model


def returns_cache(backbone_module) -> bool:
    """Whether the backbone's decoder layer unpacks ``(out, weights, present_key_value)`` from ``self_attn``.

    Feature probe: modules that still pick attention from a per-backend ``*_ATTENTION_CLASSES`` table and have no
    ``ALL_ATTENTION_FUNCTIONS`` (Llama before 4.48) return the cache as a third value.
    """
    names = vars(backbone_module) if backbone_module is not None else {}
    has_table = any(n.endswith("_ATTENTION_CLASSES") and "VISION" not in n for n in names)
    return has_table and "ALL_ATTENTION_FUNCTIONS" not in names


def spec_of(model) -> MLASpec | None:
    """The ``MLASpec`` a model was converted with, or ``None`` for an MHA model."""
    return getattr(model, SPEC_ATTR, None)


def _copy(linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight.copy_(weight.to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_(bias.to(linear.bias.dtype))
