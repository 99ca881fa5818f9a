"""portvlm's generic path over every packed-image (``cu_seqlens``) VLM family of the installed transformers.

A declared family (``portvlm.models``) has cells, a tiny model and inputs; every other family gets what portvlm can
do without a declaration: the shims whose probes accept its modules. This module says what that would be for any
``model_type`` (``generic_plan``: the answer ``patch``, ``check`` and the doctor give for an undeclared family), and
measures it (``sweep``): on a tiny random config built from the family's own config class,

- vision: one vision attention module (the class whose ``forward`` takes ``hidden_states`` and ``cu_seqlens``) runs
  upstream's non-flash forward (one call per segment: the per-segment oracle) and portvlm's block-diagonal vision
  forward on the same packed segments;
- text: the text backbone runs each sample alone (eager, upstream) and the samples packed in one row through
  portvlm's registered text attention (``cu_seq_lens_q``), Gated DeltaNet layers through
  ``portvlm.shims.linear_attention``.

Each part is ``pass`` (with its max error), ``fail`` (portvlm applied and the figures miss), ``not applicable``
(the probes' reasons: portvlm would not apply), or ``not built`` (the generic tiny config could not be built: that
family needs a declaration's tiny config to say anything). ``python -m portvlm.models.generic --out FILE`` writes the
sweep as JSON; ``portvlm.publish`` puts it into SUPPORT.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The generic path is declared for transformers' 5.x attention registry: on 4.x the vision builder meets older
# config layouts (4.50.3: Qwen2.5-VL's vision attention takes the whole config). The sweep's stacks: 5.23 and newer.
SWEEP_FROM = "5.23.0"
TOL = 1e-4  # fp32 CPU: a masked single call vs upstream's split calls differ by summation order only (~1e-6)
SEGMENTS = (9, 16, 3, 20)  # vision segments (patch rows); uneven, one shorter than a merge window
TEXT_LENGTHS = (11, 3, 18)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_heads=2, num_attention_heads=2, depth=2,
                   num_hidden_layers=2, out_hidden_size=64, attention_heads=2)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256, moe_intermediate_size=32, num_experts=4,
                 n_routed_experts=4, num_experts_per_tok=2, moe_num_experts=4, moe_k=2, first_k_dense_replace=1,
                 shared_expert_intermediate_size=32, linear_num_value_heads=4, linear_num_key_heads=2,
                 linear_key_head_dim=16, linear_value_head_dim=16, kv_lora_rank=16, q_lora_rank=None,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


@dataclass
class SweepRow:
    """One family's generic-path outcome: ``status`` per part, and the figures or reasons behind it."""

    model_type: str
    declared: bool
    vision: str = "not built"
    text: str = "not built"
    vision_err: float | None = None
    text_err: float | None = None
    linear_layers: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``passes`` (every applicable part passes), ``fails``, or ``not built``."""
        parts = [self.vision, self.text]
        if any(p == "fail" for p in parts):
            return "fails"
        if any(p == "pass" for p in parts) and all(p in ("pass", "not applicable") for p in parts):
            return "passes"
        return "not built" if any(p == "not built" for p in parts) else "not applicable"


# -- which families ----------------------------------------------------------------------------------------------


def cu_seqlens_model_types() -> list[str]:
    """``model_type``s of the installed transformers whose config has a vision tower and whose modeling reads
    ``cu_seqlens`` (packed images), found by reading the modeling sources (nothing is imported)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    found = []
    for model_type in CONFIG_MAPPING_NAMES:
        folder = root / model_type
        sources = list(folder.glob("modeling_*.py")) if folder.is_dir() else []
        config_sources = list(folder.glob("configuration_*.py"))
        if not sources or not any("vision_config" in p.read_text(errors="replace") for p in config_sources):
            continue
        if any("cu_seqlens" in p.read_text(errors="replace") for p in sources):
            found.append(model_type)
    return sorted(found)


def declared_model_types() -> set[str]:
    """The model_types the packaged matrix declares (matrix.yaml's ``models:`` mirror the family records)."""
    from portvlm.policy import packaged_matrix

    return {m.family for m in packaged_matrix().models}


# -- tiny configs from the family's own config class --------------------------------------------------------------


def _shrink(cfg, values: dict) -> None:
    for key, value in values.items():
        if key in vars(cfg) or hasattr(type(cfg), key):
            with contextlib.suppress(Exception):  # a read-only or validated field keeps its default
                setattr(cfg, key, value)


def _fit_rope(text, uses_mrope: bool) -> None:
    """Scale an mrope section (sums to the released rotary dim / 2) to the tiny head dim; where the config leaves it
    to the modeling code's default (GLM-4V: ``rope_parameters.get("mrope_section", [8, 12, 12])``), write one."""
    params = next((p for p in (getattr(text, "rope_parameters", None), getattr(text, "rope_scaling", None))
                   if isinstance(p, dict) and "mrope_section" in p), None)
    if params is None:
        params = getattr(text, "rope_parameters", None)
        if not (uses_mrope and isinstance(params, dict)):
            return
        params["mrope_section"] = [2, 3, 3]  # t/h/w in Qwen2-VL's 16:24:24 proportion
    partial = (params.get("partial_rotary_factor") or getattr(text, "partial_rotary_factor", None) or 1.0)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    half = int(head_dim * partial) // 2
    section = list(params["mrope_section"])
    total = sum(section)
    scaled = [max(1, round(s * half / total)) for s in section]
    scaled[-1] += half - sum(scaled)
    params["mrope_section"] = scaled


def _modeling_source(model_type: str) -> str:
    import transformers

    folder = Path(transformers.__file__).parent / "models" / model_type
    return "".join(p.read_text(errors="replace") for p in folder.glob("modeling_*.py"))


def tiny_config(model_type: str, attn_implementation: str = "eager"):
    """The family's config class at its defaults, shrunk to tiny widths (2 layers, head dim 16); may raise."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    vision = getattr(cfg, "vision_config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
    if vision is not None:
        _shrink(vision, TINY_VISION)
        if hasattr(vision, "image_size"):
            vision.image_size = 4 * getattr(vision, "patch_size", 14)
    if text is not None and text is not cfg:
        types = list(getattr(text, "layer_types", None) or [])
        _shrink(text, TINY_TEXT)
        if types:  # keep one layer of each kind, in the family's order (Qwen3.5: linear, then full attention)
            kinds = list(dict.fromkeys(types))
            text.layer_types = kinds
            text.num_hidden_layers = len(kinds)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # released ids lie outside the tiny vocab
            value = getattr(text, key, None)
            if isinstance(value, int) and value >= text.vocab_size:
                setattr(text, key, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key])
        _fit_rope(text, "mrope_section" in _modeling_source(model_type))
    for c in (cfg, vision, text):
        if c is not None:
            c._attn_implementation = attn_implementation
    return cfg


# -- the two checks ------------------------------------------------------------------------------------------------


def vision_attention_classes(model_type: str) -> list[type]:
    """Classes of the family's modeling module whose ``forward`` takes ``hidden_states`` and ``cu_seqlens``."""
    import importlib
    import inspect

    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    out = []
    for obj in vars(module).values():
        if isinstance(obj, type) and obj.__module__ == module.__name__ and "Attention" in obj.__name__:
            params = inspect.signature(obj.forward).parameters
            if "hidden_states" in params and "cu_seqlens" in params:
                out.append(obj)
    return out


def _vision(row: SweepRow, cfg) -> None:
    import torch

    from portvlm.shims import attention
    from portvlm.shims.attention import AttentionState, vision_forward

    classes = vision_attention_classes(row.model_type)
    if not classes:
        row.vision = "not applicable"
        row.notes.append("vision: no attention class takes cu_seqlens (the tower is not packed varlen)")
        return
    cls = classes[0]
    try:
        try:
            module = cls(cfg.vision_config).eval()
        except TypeError:  # some take the layer index too (LFM3-VL)
            module = cls(cfg.vision_config, 0).eval()
    except Exception as exc:  # noqa: BLE001
        row.notes.append(f"vision: {cls.__name__}(vision_config) failed: {type(exc).__name__}: {exc}")
        return
    reasons = attention.vision_module_reasons(module)
    if reasons:
        row.vision = "not applicable"
        row.notes.append("vision: " + "; ".join(reasons))
        return
    heads = module.num_heads
    dim = (module.qkv if hasattr(module, "qkv") else module.q_proj).in_features
    head_dim = dim // heads
    total = sum(SEGMENTS)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(total, dim, generator=g)
    freqs = torch.randn(total, head_dim // 2, generator=g)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    cu = torch.tensor([0, *torch.tensor(SEGMENTS).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        try:
            want = module(hidden, cu_seqlens=cu, position_embeddings=(cos, sin))
        except Exception as exc:  # noqa: BLE001
            row.notes.append(f"vision: upstream forward with (cos, sin) failed: {type(exc).__name__}: {exc}")
            return
        want = want[0] if isinstance(want, tuple) else want
        state = AttentionState(vision_backend="sdpa_masked")
        got = vision_forward(state, None, module, hidden, cu, position_embeddings=(cos, sin))
        got = got[0] if isinstance(got, tuple) else got
    row.vision_err = float((got - want).abs().max())
    row.vision = "pass" if row.vision_err <= TOL and state.calls["vision"] == 1 else "fail"


def text_model_class(model_type: str, text_cfg) -> type:
    """The text backbone class for ``text_cfg``: ``AutoModel``'s, else the modeling module's ``*TextModel`` for it."""
    import importlib

    from transformers import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(text_cfg)]
    except KeyError:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and obj.__name__.endswith("TextModel")
                    and getattr(obj, "config_class", None) is type(text_cfg)):
                return obj
        raise LookupError(f"no AutoModel entry and no *TextModel for {type(text_cfg).__name__}") from None


def _text(row: SweepRow, cfg) -> None:
    import torch

    from portvlm.shims import attention, dispatch, linear_attention
    from portvlm.shims.attention import AttentionState
    from portvlm.shims.patch import Patcher

    text_cfg = cfg.get_text_config()
    if text_cfg is cfg:
        row.notes.append("text: no separate text config")
        return
    try:
        torch.manual_seed(0)
        model = text_model_class(row.model_type, text_cfg)(text_cfg).eval()
    except Exception as exc:  # noqa: BLE001
        row.notes.append(f"text: the text model of {type(text_cfg).__name__} failed: {type(exc).__name__}: {exc}")
        return
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, 200, (1, n), generator=g) for n in TEXT_LENGTHS]
    cu = torch.tensor([0, *torch.tensor(TEXT_LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in TEXT_LENGTHS])[None]
    with torch.no_grad():
        try:
            want = torch.cat([model(input_ids=x, position_ids=torch.arange(x.shape[1])[None],
                                    use_cache=False).last_hidden_state for x in ids], 1)
        except Exception as exc:  # noqa: BLE001
            row.notes.append(f"text: upstream forward failed: {type(exc).__name__}: {exc}")
            return
    state = AttentionState(name=f"{attention.ATTN_NAME}_sweep", text_backend="sdpa_masked")
    patcher, hooks, token = Patcher(), [], object()  # token: this sweep's hold on the shared dispatchers

    def claim(cls, attr, make):
        hooks.append(dispatch.acquire(cls, attr, make, token))
        return hooks[-1]

    try:
        reasons = attention.registry_reasons()
        if reasons:
            row.text = "not applicable"
            row.notes.append("text: " + "; ".join(reasons))
            return
        attention.install_text(patcher, model, state)
        linear = linear_attention.linear_modules(model)
        row.linear_layers = sum(len(m) for m in linear.values())
        if linear:
            linear_attention.install(claim, model)
            for mods in linear.values():
                for m in mods:
                    dispatch.OWNERS[m] = state
        with torch.no_grad():
            got = model(input_ids=torch.cat(ids, 1), position_ids=positions, use_cache=False, cu_seq_lens_q=cu,
                        cu_seq_lens_k=cu, max_length_q=max(TEXT_LENGTHS),
                        max_length_k=max(TEXT_LENGTHS)).last_hidden_state
    except Exception as exc:  # noqa: BLE001
        row.text = "fail"
        row.notes.append(f"text: portvlm's packed row raised {type(exc).__name__}: {exc}")
        return
    finally:
        for m in [m for mods in linear_attention.linear_modules(model).values() for m in mods]:
            dispatch.OWNERS.pop(m, None)
        for hook in hooks:
            dispatch.release(hook, token)
        patcher.restore()
    row.text_err = float((got - want).abs().max())
    ran = state.calls["text_packed"] > 0 and (not row.linear_layers or state.calls["linear_packed"] > 0)
    row.text = "pass" if row.text_err <= TOL and ran else "fail"
    if not ran:
        row.notes.append(f"text: portvlm's packed path did not run (calls {state.calls})")


def check_family(model_type: str, declared: set[str] | None = None) -> SweepRow:
    """Build the family tiny and run both generic checks; never raises (failures are the row's)."""
    declared = declared_model_types() if declared is None else declared
    row = SweepRow(model_type, model_type in declared)
    try:
        cfg = tiny_config(model_type)
    except Exception as exc:  # noqa: BLE001
        row.notes.append(f"tiny config: {type(exc).__name__}: {exc}")
        return row
    for part in (_vision, _text):
        try:
            part(row, cfg)
        except Exception as exc:  # noqa: BLE001
            row.notes.append(f"{part.__name__[1:]}: {type(exc).__name__}: {exc} "
                             f"({traceback.format_exc(limit=-1).splitlines()[-2].strip()})")
    return row


def sweep_reasons(version: str | None = None) -> list[str]:
    """Why the generic sweep cannot run on transformers ``version`` (default: the installed one); empty: it can."""
    from portvlm.versions import parse

    if version is None:
        import transformers

        version = transformers.__version__
    if parse(version) < parse(SWEEP_FROM):
        return [f"the generic family sweep is declared for transformers >= {SWEEP_FROM}, found {version} "
                f"(install a newer transformers, or use a declared family: portvlm.models)"]
    return []


def sweep(model_types: list[str] | None = None) -> dict:
    """Every cu_seqlens family of the installed transformers (or ``model_types``) through the generic checks."""
    import torch
    import transformers

    from portvlm.errors import UnsupportedError

    if sweep_reasons():
        raise UnsupportedError("; ".join(sweep_reasons()))

    types = cu_seqlens_model_types() if model_types is None else model_types
    declared = declared_model_types()
    rows = [check_family(t, declared) for t in types]
    return {"transformers": transformers.__version__, "torch": torch.__version__, "evidence": "hardware",
            "device": "cpu", "dtype": "float32", "tolerance": TOL,
            "rows": [asdict(r) | {"status": r.status} for r in rows]}


def generic_plan(model) -> list[str]:
    """What portvlm's generic path would apply to this (undeclared) model: one line per shim, with its reasons."""
    lines = []
    vision = [m for m in model.modules() if "cu_seqlens" in _params(type(m).forward) and "Attention" in type(m).__name__]
    if vision:
        from portvlm.shims import attention

        reasons = attention.vision_module_reasons(vision[0])
        lines.append(f"vision_varlen on {type(vision[0]).__name__}: "
                     + ("one block-diagonal call per layer" if not reasons else "no (" + "; ".join(reasons) + ")"))
    else:
        lines.append("vision_varlen: no (no vision attention takes cu_seqlens)")
    from portvlm.shims import attention, linear_attention

    reasons = attention.registry_reasons()
    lines.append("text_registry: " + ("packed rows through AttentionInterface" if not reasons
                                      else "no (" + "; ".join(reasons) + ")"))
    linear = linear_attention.linear_modules(model)
    if linear:
        reasons = [r for mods in linear.values() for r in linear_attention.module_reasons(mods[0])]
        lines.append("linear_attention_packed: " + ("per-sample conv windows and state" if not reasons
                                                    else "no (" + "; ".join(reasons) + ")"))
    return lines


def _params(fn) -> tuple[str, ...]:
    import inspect

    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()


def main(argv: list[str] | None = None) -> int:
    """``python -m portvlm.models.generic [--out FILE] [model_type ...]``: run the sweep, print a table."""
    p = argparse.ArgumentParser(prog="python -m portvlm.models.generic", description=__doc__.splitlines()[0])
    p.add_argument("model_types", nargs="*")
    p.add_argument("--out", help="write the sweep as JSON here")
    args = p.parse_args(argv)
    if sweep_reasons():
        print(f"error: {'; '.join(sweep_reasons())}", file=sys.stderr)
        return 2
    result = sweep(args.model_types or None)
    for r in result["rows"]:
        err = " ".join(f"{k}={r[k]:.1e}" for k in ("vision_err", "text_err") if r[k] is not None)
        print(f"{r['model_type']:18} {'declared' if r['declared'] else 'undeclared':10} {r['status']:14} "
              f"vision={r['vision']:14} text={r['text']:14} {err}")
        for note in r["notes"]:
            print(f"{'':20}{note[:200]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
