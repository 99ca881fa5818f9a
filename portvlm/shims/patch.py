"""``portvlm.patch``: apply the shims a model needs on this transformers version and arch, report why, revert.

    with portvlm.patch(model, arch="sm70") as handle:   # arch=None: the host's arch
        out = model(**inputs)
    print(handle.report)
    portvlm.patch(model).revert()                       # also usable without `with`

A patch belongs to its model. What only this model sees (its configs, its own registry name ``portvlm_<n>``,
instance attributes) goes through the handle's ``Patcher``, which records the old value (or that there was none)
and restores it. What lives on a shared class (a vision attention ``forward``) is a dispatcher installed once per
class and shared by every live handle (``portvlm.shims.dispatch``): it runs portvlm's code with the owning
handle's state for that handle's modules and the class's previous code for every other instance; the last handle
to let go puts the class back. So two models of one class run two policies, handles revert in any order, and after
the last revert transformers is as it was. Patching a model that a live handle owns is an error. A forward that is
not transformers' own (a user's port, another library's monkey patch) is named in the report and warned about, or
refused with ``foreign="refuse"``. No ``importlib.reload``; nothing is read from the current directory.

Shims are declared records (name, the upstream change they answer, version range, probe); the probe returns
reasons, empty meaning "applies", and the report lists both sides.
"""

from __future__ import annotations

import itertools
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from portvlm.errors import UnsupportedError
from portvlm.shims import dispatch, hub_kernels, versions

_ABSENT = object()


class Patcher:
    """Records every attribute / mapping entry it changes and restores them in reverse order."""

    def __init__(self):
        self._undo: list[tuple[str, object, object, object]] = []  # (kind, target, key, old value or _ABSENT)
        self.touched: list[tuple[object, str]] = []  # (object or mapping, attribute or key), for tests and the report

    def record_attr(self, obj, name: str) -> None:
        """Remember ``obj.name`` as it is now (its own ``__dict__`` entry, or that it had none)."""
        own = vars(obj) if hasattr(obj, "__dict__") else {}
        self._undo.append(("attr", obj, name, own.get(name, _ABSENT)))
        self.touched.append((obj, name))

    def record_added(self, obj, name: str) -> None:
        """Remember that ``obj`` did not own ``name`` before (a value someone else added while we patched)."""
        self._undo.append(("attr", obj, name, _ABSENT))
        self.touched.append((obj, name))

    def set_attr(self, obj, name: str, value) -> None:
        """``setattr(obj, name, value)``, restored on revert (deleted again if ``obj`` did not own it)."""
        self.record_attr(obj, name)
        setattr(obj, name, value)

    def on_restore(self, undo: Callable[[], None]) -> None:
        """Call ``undo()`` on restore, in its turn (newest first) with the recorded attributes and items."""
        self._undo.append(("call", undo, None, None))

    def record_item(self, mapping, key) -> None:
        """Remember ``mapping[key]`` as it is now (or that the key was absent)."""
        self._undo.append(("item", mapping, key, mapping.get(key, _ABSENT)))
        self.touched.append((mapping, key))

    def set_item(self, mapping, key, value) -> None:
        self.record_item(mapping, key)
        mapping[key] = value

    def restore(self) -> None:
        """Undo everything, newest first; idempotent."""
        errors = []
        while self._undo:
            kind, target, key, old = self._undo.pop()
            try:
                if kind == "call":
                    target()
                elif kind == "attr":
                    if old is _ABSENT:
                        if key in vars(target):
                            delattr(target, key)
                    else:
                        setattr(target, key, old)
                elif old is _ABSENT:
                    target.pop(key, None)
                else:
                    target[key] = old
            except Exception as exc:  # keep restoring the rest; report at the end
                errors.append(f"{kind} {key!r} on {type(target).__name__}: {exc}")
        if errors:
            raise RuntimeError("portvlm could not restore: " + "; ".join(errors))


# --------------------------------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shim:
    """One shim: what upstream change it answers, where it is meant to apply, and how to tell (reasons)."""

    name: str
    answers: str  # the upstream change, with the version it happened in
    transformers: str  # PEP 440 range the shim is written for
    probe: Callable  # (context) -> list[str]; empty = applies
    apply: Callable | None = None  # (context, patcher) -> list[str] targets; None for accessor-only shims
    families: tuple[str, ...] = ()  # model_types it serves; empty = every family
    present: str | None = None  # narrower range where upstream has what the probe looks for (None: all of it)
    labels: tuple[tuple[str, str], ...] = ()  # (transformers range, a few words for the doctor), first match wins

    def label_for(self, version) -> str:
        """The few words that say what this shim does on ``version`` (the doctor's one-screen view)."""
        return next((text for spec, text in self.labels if versions.in_range(spec, version)), "")

    def prediction_reasons(self, family: str | None, version) -> list[str]:
        """Why this shim would not apply to ``family`` on ``version``, judged from the declaration alone (no model).

        The probes need a built model; the doctor predicts from the range, ``present`` and ``families`` instead.
        """
        reasons = []
        if not versions.in_range(self.transformers, version):
            reasons.append(f"written for transformers {self.transformers}, found {version}")
        elif self.present and not versions.in_range(self.present, version):
            reasons.append(f"upstream has its target only in transformers {self.present}, found {version}")
        if self.families and family not in self.families:
            reasons.append(f"serves {', '.join(self.families)}, not {family}")
        return reasons


@dataclass(frozen=True)
class Applied:
    shim: str
    target: str
    why: str


@dataclass(frozen=True)
class NotApplied:
    shim: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Replaced:
    """A forward that was not transformers' own when portvlm took it over for this model."""

    target: str  # "transformers....Qwen2_5_VLVisionAttention.forward" (or "<module path>.forward" on an instance)
    origin: str  # where the replaced code comes from: "module.qualname (file)"


@dataclass
class Report:
    """What ``patch`` did, and why everything else was not done."""

    transformers: str
    family: str | None
    arch: str
    platform: str
    emulation: str | None  # set when the arch's policy is judged on other hardware
    dtype: str
    dtype_why: str
    vision_backend: object | None = None  # portvlm.backends.Selection
    text_backend: object | None = None
    applied: list[Applied] = field(default_factory=list)
    not_applied: list[NotApplied] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    replaced: list[Replaced] = field(default_factory=list)  # foreign forwards portvlm runs in place of, for this model
    attn_name: str | None = None  # this handle's registered attention name
    wrappers: list[str] = field(default_factory=list)  # what the model was found inside (portvlm.wrappers), outermost first
    fp16: list = field(default_factory=list)  # portvlm.shims.fp16.protect.Change: rescaled modules, islands, the guard
    hub_kernels: dict | None = None  # shims.hub_kernels.report: kernelized layers, kept off or running, and why

    def shim_names(self) -> set[str]:
        return {a.shim for a in self.applied}

    def to_dict(self) -> dict:
        def sel(s):
            return None if s is None else {"name": s.name, "lost": dict(s.lost)}

        return {
            "transformers": self.transformers,
            "family": self.family,
            "arch": self.arch,
            "platform": self.platform,
            "emulation": self.emulation,
            "dtype": self.dtype,
            "dtype_why": self.dtype_why,
            "vision_backend": sel(self.vision_backend),
            "text_backend": sel(self.text_backend),
            "applied": [a.__dict__ for a in self.applied],
            "not_applied": [{"shim": n.shim, "reasons": list(n.reasons)} for n in self.not_applied],
            "warnings": list(self.warnings),
            "replaced": [{"target": r.target, "origin": r.origin} for r in self.replaced],
            "attn_name": self.attn_name,
            "wrappers": list(self.wrappers),
            "fp16": [c.__dict__ for c in self.fp16],
            "hub_kernels": self.hub_kernels,
        }

    def __str__(self) -> str:
        lines = [
            f"portvlm patch: {self.family or 'no model'} on transformers {self.transformers}, arch {self.arch} ({self.platform})",
            f"  dtype {self.dtype}: {self.dtype_why}",
        ]
        if self.emulation:
            lines.append(f"  emulation: {self.emulation}")
        if self.wrappers:
            lines.append(f"  found inside: {' -> '.join(self.wrappers)}")
        for label, s in (("vision", self.vision_backend), ("text", self.text_backend)):
            if s is not None:
                lines.append(f"  {label} backend {s.name}")
                lines += [f"    not {n}: {'; '.join(r)}" for n, r in s.lost.items()]
        lines.append("  applied:")
        by_shim: dict[str, list[Applied]] = {}
        for a in self.applied:
            by_shim.setdefault(a.shim, []).append(a)
        for name, items in by_shim.items():
            lines.append(f"    {name} (answers: {items[0].why})")
            lines += [f"      -> {a.target}" for a in items]
        if not by_shim:
            lines.append("    (none)")
        lines.append("  not applied:")
        lines += [f"    {n.shim}: {'; '.join(n.reasons)}" for n in self.not_applied] or ["    (none)"]
        if self.fp16:
            lines.append("  fp16 (the policy's dtype is float16):")
            lines += [f"    {c.kind} {c.target}: {c.why}" for c in self.fp16]
        lines += [f"  replaced (not transformers' own): {r.target} <- {r.origin}" for r in self.replaced]
        if self.hub_kernels is not None:
            lines.append(f"  hub kernels: {self.hub_kernels['verdict']}")
            lines += [f"    {k['path']} ({k['class']}) <- {k['origin']}"
                      for k in self.hub_kernels["kernelized"] + self.hub_kernels["kept_off"]]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclass
class Context:
    """What the probes look at: the model (or None), its resolved parts, the policy, the attention state."""

    model: object | None
    family: str | None
    paths: object | None  # LayerPaths
    state: object  # attention.AttentionState
    arch: object  # portvlm.matrix.Arch
    platform: object  # portvlm.platform.Platform
    dtype: str
    claim: Callable | None = None  # (cls, attr, make_dispatcher) -> dispatch.Hook, held by this handle


# -- shim probes and appliers -----------------------------------------------------------------------------------


def _kv_cache_probe(ctx) -> list[str]:
    from transformers import DynamicCache

    from portvlm.shims import kv_cache

    return kv_cache.layout_reasons(DynamicCache())


def _kv_cache_apply(ctx, patcher) -> list[str]:
    from transformers import DynamicCache

    from portvlm.shims import kv_cache

    layout = kv_cache.layout_of(DynamicCache())
    return [f"CacheView/SinkWindowCache over {layout.name} ({layout.answers})"]


def _layer_paths_probe(ctx) -> list[str]:
    if ctx.model is None:
        return ["no model given (patch(model=None) prepares classes and registries only)"]
    return [] if ctx.paths is not None else ["layer paths did not resolve"]


def _layer_paths_apply(ctx, patcher) -> list[str]:
    return [f"{part} = model.{path}" for part, path in ctx.paths.paths.items()]


def _vision_targets(ctx):
    """Vision attention modules of the model (Qwen ViT blocks' ``attn``), grouped by class."""
    groups: dict[type, list] = {}
    if ctx.paths is None:
        return groups
    for block in ctx.paths.vision_blocks:
        attn = getattr(block, "attn", None)
        if attn is not None:
            groups.setdefault(type(attn), []).append(attn)
    return groups


def _vision_probe(ctx) -> list[str]:
    from portvlm.shims import attention

    if ctx.model is None:
        return ["no model given: the vision attention classes are found on the model instance"]
    groups = _vision_targets(ctx)
    if not groups:
        block = type(ctx.paths.vision_blocks[0]).__name__ if ctx.paths is not None else "?"
        return [
            f"{ctx.family}'s vision blocks ({block}) have no packed varlen attention: one image per batch row, "
            "nothing to make block-diagonal; the tower's attention follows text_registry on 4.53+ (it sets every "
            "config; CLIP dispatches through the registry from 4.52), else stays on the tower's own sdpa/eager classes"
        ]
    reasons = []
    for mods in groups.values():
        reasons += attention.vision_module_reasons(mods[0])
    return reasons


def _vision_apply(ctx, patcher) -> list[str]:
    from portvlm.shims import attention

    tower = ctx.paths.vision_tower
    bound = attention.window_bound(tower)
    full = attention.full_block_indexes(tower)
    targets = []
    for cls in _vision_targets(ctx):
        ctx.state.rotary[cls] = attention.rotary_of(cls)
        ctx.claim(cls, "forward", attention.vision_dispatcher)
        targets.append(f"{cls.__module__}.{cls.__qualname__}.forward")
    windowed = 0
    if bound is not None and full is not None:
        for i, block in enumerate(ctx.paths.vision_blocks):
            if i not in full and getattr(block, "attn", None) is not None:
                ctx.state.bounds[block.attn] = bound
                windowed += 1
    if windowed:
        targets.append(f"{windowed} window block(s): max_seqlen bound {bound} (no host sync)")
    return targets


def _dense_mask_probe(ctx) -> list[str]:
    if ctx.paths is None:
        return ["no model given"]
    tower = ctx.paths.vision_tower
    if not callable(getattr(type(tower), "_prepare_attention_mask", None)):
        return [f"{type(tower).__name__} builds no dense vision mask (only transformers 4.53.1-4.53.x does)"]
    if not _vision_targets(ctx):
        return ["vision attention is not portvlm's; the tower's own mask is still needed"]
    return []


def _dense_mask_apply(ctx, patcher) -> list[str]:
    from portvlm.shims import attention

    cls = type(ctx.paths.vision_tower)
    ctx.claim(cls, "_prepare_attention_mask", attention.dense_mask_dispatcher)
    return [f"{cls.__qualname__}._prepare_attention_mask -> None (this model's tower)"]


def _text_probe(ctx) -> list[str]:
    from portvlm.shims import attention

    reasons = attention.registry_reasons()
    if reasons:
        reasons.append("no masks per registered name before 4.53: text_registry_legacy (backbones that call "
                       "ALL_ATTENTION_FUNCTIONS) or text_classes (per-backend classes) answer it")
    return reasons


def _text_apply(ctx, patcher) -> list[str]:
    from portvlm.shims import attention

    return attention.install_text(patcher, ctx.model, ctx.state)


def _text_attn_groups(ctx) -> dict:
    """Text attention modules of the model (decoder layers' ``self_attn``), grouped by class."""
    groups: dict[type, list] = {}
    for layer in ctx.paths.text_layers if ctx.paths is not None else ():
        attn = getattr(layer, "self_attn", None)
        if attn is not None:
            groups.setdefault(type(attn), []).append(attn)
    return groups


def _text_legacy_probe(ctx) -> list[str]:
    from portvlm.shims import attention

    if ctx.model is None:
        return ["no model given: before 4.53 the name is set on the text backbone's configs"]
    mapping, label = attention.legacy_registry()
    if not isinstance(mapping, dict):
        return [f"{label} keeps no dict of entries (upstream changed the registry)"]
    reasons = []
    groups = _text_attn_groups(ctx)
    if not groups:
        reasons.append(f"{ctx.family}'s text layers have no `self_attn`")
    for cls in groups:
        table = attention.attention_table_of(cls)
        if table is not None:
            reasons.append(f"{cls.__name__} is picked from {table[0]} at build time (a registered name raises "
                           "KeyError there): text_classes patches it")
        elif getattr(sys.modules.get(cls.__module__), "ALL_ATTENTION_FUNCTIONS", None) is None:
            reasons.append(f"{cls.__module__} does not dispatch through ALL_ATTENTION_FUNCTIONS")
    text_model = attention.text_model_of(ctx.model, ctx.paths.text_layers) if ctx.paths is not None else None
    if text_model is None or not callable(getattr(text_model, "_update_causal_mask", None)):
        reasons.append("the text backbone has no `_update_causal_mask` (the 4-D mask a custom name relies on)")
    return reasons


def _text_legacy_apply(ctx, patcher) -> list[str]:
    from portvlm.shims import attention

    text_model = attention.text_model_of(ctx.model, ctx.paths.text_layers)
    return attention.install_text_legacy(patcher, ctx.model, text_model, ctx.state)


def _text_classes_probe(ctx) -> list[str]:
    from portvlm.shims import attention

    if ctx.model is None:
        return ["no model given: the text attention classes are found on the model instance"]
    groups = _text_attn_groups(ctx)
    if not groups:
        return [f"{ctx.family}'s text layers have no `self_attn`"]
    reasons = []
    for mods in groups.values():
        reasons += attention.text_class_reasons(mods[0])
    return reasons


def _text_classes_apply(ctx, patcher) -> list[str]:
    from portvlm.shims import attention

    return attention.install_text_classes(ctx.claim, ctx.model, list(_text_attn_groups(ctx)))


def _linear_probe(ctx) -> list[str]:
    from portvlm.shims import linear_attention

    if ctx.model is None:
        return ["no model given: the Gated DeltaNet layers are found on the model instance"]
    groups = linear_attention.linear_modules(ctx.model)
    if not groups:
        return [f"{ctx.family} has no Gated DeltaNet (linear-attention) layers"]
    return [r for mods in groups.values() for r in linear_attention.module_reasons(mods[0])]


def _linear_apply(ctx, patcher) -> list[str]:
    from portvlm.shims import linear_attention

    return linear_attention.install(ctx.claim, ctx.model)


SHIMS: tuple[Shim, ...] = (
    Shim(
        name="kv_cache",
        answers="4.54.0 layered cache (Cache.layers[i].keys/.values; key_cache lists before, removed 4.56.0); "
        "5.0.0 no legacy tuples / cache[i]; 5.15.0 Cache.crop(tokens_to_remove)",
        transformers=">=4.49.0",
        probe=_kv_cache_probe,
        apply=_kv_cache_apply,
        labels=(("<4.54", "key_cache lists"), (">=5.15", "crop() inverted, layers"), (">=4.54", "cache.layers")),
    ),
    Shim(
        name="layer_paths",
        answers="4.52.0 *Model split out of *ForConditionalGeneration (m.model.language_model, m.model.visual); "
        "5.0.0 removed the visual/language_model BC properties",
        transformers=">=4.49.0",
        probe=_layer_paths_probe,
        apply=_layer_paths_apply,
        labels=(("<4.52", "≤4.51 paths"), ("<5.0", "4.52+ paths"), (">=5.0", "5.x paths")),
    ),
    Shim(
        name="vision_varlen",
        answers="<=4.52 per-backend vision classes with a looped [S,S] mask; 4.53 dense mask through the registry; "
        "4.54.0+ one call per segment (split + .tolist()) for every non-flash backend",
        transformers=">=4.49.0",
        probe=_vision_probe,
        apply=_vision_apply,
        labels=(("<4.53", "class patching"), (">=4.53", "one block-diagonal call")),
    ),
    Shim(
        name="vision_dense_mask",
        answers="4.53.1-4.53.x Qwen2_5_VisionTransformerPretrainedModel._prepare_attention_mask builds [1,1,S,S] "
        "with a Python loop over cu_seqlens for every non-flash backend",
        transformers=">=4.53.0",  # the probe finds the method; it exists in 4.53.1-4.53.x only
        probe=_dense_mask_probe,
        apply=_dense_mask_apply,
        present=">=4.53.1,<4.54",  # breakpoints §3: the looped mask method exists in 4.53.1-4.53.x only
        labels=((">=0", "skip the looped [S,S] mask"),),
    ),
    Shim(
        name="text_registry",
        answers="4.53.0 AttentionMaskInterface (masks per registered name; unregistered names get mask=None); "
        "4.54.0 set_attn_implementation; 5.x 'flash' in a name selects the flash path",
        transformers=">=4.53.0",
        probe=_text_probe,
        apply=_text_apply,
        labels=((">=0", "AttentionInterface + masks"),),
    ),
    Shim(
        name="text_registry_legacy",
        answers="<=4.52 no AttentionMaskInterface (4.53.0): backbones calling ALL_ATTENTION_FUNCTIONS (a dict in "
        "4.49/4.50, AttentionInterface from 4.51) get the name on their configs and the eager 4-D mask that "
        "_update_causal_mask builds for it; packed rows through the cu_seq_lens_q kwargs they pass down",
        transformers=">=4.49.0,<4.53.0",
        probe=_text_legacy_probe,
        apply=_text_legacy_apply,
        families=("llava",),  # Qwen2.5-VL picks classes at build time there: text_classes answers it
        labels=((">=0", "registry without mask interface"),),
    ),
    Shim(
        name="text_classes",
        answers="<=4.52 Qwen2.5-VL picks its text attention from QWEN2_5_VL_ATTENTION_CLASSES at build time (a custom "
        "name raises KeyError) and passes no kwargs down (one class through the registry from 4.53.0): the sdpa/eager "
        "forwards run packed rows (cu_seq_lens_q / packed_rows) as one causal varlen call, else unchanged",
        transformers=">=4.49.0,<4.53.0",
        probe=_text_classes_probe,
        apply=_text_classes_apply,
        families=("qwen2_5_vl",),
        labels=((">=0", "Qwen2.5-VL text classes patched for packed rows"),),
    ),
    Shim(
        name="linear_attention_packed",
        answers="Qwen3.5 Gated DeltaNet torch fallbacks (causal_conv1d_fn, torch_chunk_gated_delta_rule) ignore "
        "cu_seqlens: samples of a packed row share conv windows and recurrent state (silent to 5.17; 5.23+ refuses "
        "with ValueError without flash-linear-attention)",
        transformers=">=5.0",
        probe=_linear_probe,
        apply=_linear_apply,
        families=("qwen3_5", "qwen3_5_moe"),
        labels=((">=0", "packed rows: per-sample conv windows + fresh fp32 state"),),
    ),
)


# --------------------------------------------------------------------------------------------------------------
# Policy (portvlm.policy.resolve_policy: arch -> platform, dtype, backend priorities) and what the report says of it
# --------------------------------------------------------------------------------------------------------------


def _describe_platform(platform) -> str:
    from portvlm.platform import sm_name

    arch = sm_name(platform.capability) or platform.gfx or platform.arch_id or platform.device
    return f"{arch} policy on {platform.device}: {platform.name}"


def _head_dims(model) -> tuple[int, int]:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    t = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    vision = getattr(cfg, "vision_config", None)
    heads = getattr(vision, "num_heads", None) or getattr(vision, "num_attention_heads", None)
    v = vision.hidden_size // heads if vision is not None and heads else t
    return int(v), int(t)


# --------------------------------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------------------------------


_NAMES = itertools.count(1)  # per-handle attention names: portvlm_1, portvlm_2, … (never reused in a process)
# id(config) -> (weakref to it, attention name of the live handle that set it); configs are unhashable (they
# define __eq__), so they are keyed by id and checked by identity.
_LIVE_CONFIGS: dict[int, tuple[weakref.ref, str]] = {}
_LIVE_HANDLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its live PatchHandle


def handle_of(model) -> PatchHandle | None:
    """The live ``PatchHandle`` that patched ``model`` (None: not patched by portvlm now)."""
    handle = _LIVE_HANDLES.get(model)
    return None if handle is None or handle.reverted else handle


# attention name of a handle -> the implementation its model had before the patch. A model built from a patched
# model's config (TRL builds its reference model with the policy's ``attn_implementation``) or deep-copied from a
# patched model inherits the name; patching it points it back here first, so its revert never restores a name that
# the other handle's revert unregisters. Names are never reused in a process.
_ORIGINAL_IMPL: dict[str, str | None] = {}


def _inherited_names(model, report: Report) -> None:
    """Configs of ``model`` that name another handle's attention get that handle's original implementation back."""
    from portvlm.shims import attention

    reset: dict[tuple[str, str | None], list[str]] = {}
    for cfg in attention.configs_of(model):
        name = vars(cfg).get("_attn_implementation_internal")
        if isinstance(name, str) and name in _ORIGINAL_IMPL:
            cfg._attn_implementation_internal = _ORIGINAL_IMPL[name]
            reset.setdefault((name, _ORIGINAL_IMPL[name]), []).append(type(cfg).__name__)
    for (name, original), configs in reset.items():
        report.warnings.append(
            f"{', '.join(configs)} named {name!r}, another patch's attention (inherited: the model was built from or "
            f"copied off a patched model's config, as TRL builds its reference model); reset to {original!r}, what "
            f"{name!r} replaced, before this patch (revert restores that)")


class PatchHandle:
    """The result of ``patch``: a context manager; ``.report`` says what was applied and why; ``.revert()`` undoes."""

    def __init__(self, report: Report, patcher: Patcher, state, dtype: str, foreign: str = "warn"):
        self.report = report
        self._patcher = patcher
        self.state = state
        self.dtype_name = dtype
        self.foreign = foreign
        self.reverted = False
        self._hooks: list = []  # dispatch.Hook this handle holds
        self._owned: list = []  # weakrefs to the modules this handle owns (dispatch.OWNERS)
        self._configs: list[int] = []  # ids in _LIVE_CONFIGS
        self.fp16 = None  # portvlm.shims.fp16.protect.Protection under an fp16 policy (its scans, α, islands, guard)

    @property
    def dtype(self):
        """The policy's compute dtype as a ``torch.dtype`` (casting the model is the caller's choice)."""
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def attn_name(self) -> str:
        """The attention implementation name this handle registered (``portvlm_<n>``)."""
        return self.state.name

    @property
    def touched(self) -> list[tuple[object, str]]:
        """Every (object, attribute-or-key) the patch changed: its own entries and the class attributes it holds."""
        return list(self._patcher.touched) + [(h.cls, h.attr) for h in self._hooks]

    def claim(self, cls: type, attr: str, make: Callable) -> dispatch.Hook:
        """Hold the shared dispatcher ``make(fallback)`` on ``cls.attr``; a foreign fallback is reported (or refused)."""
        hook = dispatch.acquire(cls, attr, make, self, foreign=self.foreign)
        if hook not in self._hooks:
            self._hooks.append(hook)
        if hook.foreign is not None and not any(r.target == hook.target for r in self.report.replaced):
            self._replaced(hook.target, hook.foreign)
        return hook

    def _replaced(self, target: str, origin: str) -> None:
        self.report.replaced.append(Replaced(target, origin))
        text = (f"{target} was not transformers' own (it came from {origin}); portvlm runs in its place for this "
                "model and revert puts it back (patch(..., foreign='refuse') refuses instead)")
        self.report.warnings.append(text)
        warnings.warn(text, stacklevel=4)

    def own(self, model) -> None:
        """Make every module of ``model`` this handle's (the class dispatchers run portvlm's code for them)."""
        for module in model.modules():  # the model itself first: revert finds its _LIVE_HANDLES entry by it
            dispatch.OWNERS[module] = self.state
            self._owned.append(weakref.ref(module))

    def take_configs(self, model) -> None:
        from portvlm.shims import attention

        for cfg in attention.configs_of(model):
            live = _LIVE_CONFIGS.get(id(cfg))
            if live is not None and live[0]() is cfg:
                raise UnsupportedError(
                    f"{type(model).__name__} shares its config object ({type(cfg).__name__}) with a model patched "
                    f"as {live[1]!r}: one config cannot name two patches; give each model its own config "
                    "(copy.deepcopy(config)) or revert the other patch first")
            _LIVE_CONFIGS[id(cfg)] = (weakref.ref(cfg), self.state.name)
            self._configs.append(id(cfg))

    def revert(self) -> None:
        """Undo this patch (its modules, configs, registry name; class attributes once no live patch holds them)."""
        problems = []
        model = self._owned[0]() if self._owned else None
        for ref in self._owned:
            module = ref()
            if module is not None and dispatch.OWNERS.get(module) is self.state:
                del dispatch.OWNERS[module]
        self._owned.clear()
        while self._hooks:
            problems += dispatch.release(self._hooks.pop(), self)
        for key in self._configs:
            if key in _LIVE_CONFIGS and _LIVE_CONFIGS[key][1] == self.state.name:
                del _LIVE_CONFIGS[key]
        self._configs.clear()
        self._patcher.restore()
        if model is not None and _LIVE_HANDLES.get(model) is self:
            # A WeakKeyDictionary holds its values strongly: a handle that refers to its model (its report, an fp16
            # guard) would keep the entry, and so the model and all its weights, alive for the life of the process.
            del _LIVE_HANDLES[model]
        self.reverted = True
        for text in problems:
            self.report.warnings.append(text)
            warnings.warn(text, stacklevel=2)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.revert()

    def __repr__(self) -> str:
        state = "reverted" if self.reverted else "active"
        names = ", ".join(sorted(self.report.shim_names())) or "nothing applied"
        return f"<portvlm.PatchHandle {self.state.name} {state}: {names}>"


def _instance_overrides(handle: PatchHandle, model, patcher: Patcher) -> None:
    """Instance attributes that shadow a claimed class attribute (``module.forward = ...``): foreign too."""
    for hook in list(handle._hooks):
        if not isinstance(hook.cls, type):  # a modeling module's function: no instance can shadow it
            continue
        for name, module in model.named_modules():
            if not isinstance(module, hook.cls) or hook.attr not in vars(module):
                continue
            where = f"{type(model).__name__}.{name or '(model)'}.{hook.attr} (instance attribute)"
            origin = dispatch.code_origin(getattr(vars(module)[hook.attr], "func", vars(module)[hook.attr]))
            if handle.foreign == "refuse" or hasattr(module, "_hf_hook"):
                why = ("accelerate's hook keeps the class forward it found (portvlm's would never run there); patch "
                       "before dispatching the model" if hasattr(module, "_hf_hook") else "foreign='refuse'")
                raise UnsupportedError(f"{where} is not transformers' own: it came from {origin}; portvlm refuses "
                                       f"to replace it ({why})")
            patcher.record_attr(module, hook.attr)
            delattr(module, hook.attr)
            handle._replaced(where, origin)


def patch(model=None, arch: str | None = None, *, dtype=None, matrix=None, foreign: str = "warn",
          calibration=None, guard: bool = True) -> PatchHandle:
    """Apply portvlm's shims for ``arch``'s policy (``None``: the host) to ``model``; returns a ``PatchHandle``.

    ``matrix``: a ``Matrix`` or a path whose archs define the policies (default: the packaged matrix; nothing is
    read from the current directory). ``foreign``: ``"warn"`` (default) runs portvlm in place of a forward that is
    not transformers' own and says so in the report; ``"refuse"`` raises instead.

    Under a float16 policy (sm70; ROCm in fp16) ``portvlm.shims.fp16.protect`` runs too: with ``calibration`` (the model's
    forward kwargs, one dict or a list) the residual streams are rescaled by a power of two and overflowing MLPs run
    as fp32 islands so the calibrated peaks fit fp16 (verified by a second scan); ``guard`` (default on) makes a
    non-finite activation raise ``FP16OverflowError`` naming the module instead of returning NaN.
    """
    from portvlm.policy import resolve_policy

    if foreign not in dispatch.FOREIGN_POLICIES:
        raise ValueError(f"foreign={foreign!r}: one of {', '.join(dispatch.FOREIGN_POLICIES)}")
    gate = versions.check_transformers()
    policy = resolve_policy(arch, dtype=dtype, matrix=matrix)
    spec, platform = policy.arch, policy.platform
    family = None
    paths = None
    held = None
    if model is not None:
        from portvlm import wrappers
        from portvlm.shims import layer_paths

        held = wrappers.unwrap(model)  # PEFT, DDP, FSDP, DeepSpeed, torch.compile: the transformers model inside
        model = held.model

        reasons = dispatch.owner_reasons(model.modules())
        if reasons:
            raise UnsupportedError(f"{type(model).__name__} is already patched: {reasons[0]}")
        family = getattr(getattr(model, "config", None), "model_type", None)
        minimums = versions.family_minimums(policy.matrix)  # the matrix patch was handed, else the packaged one
        reasons = versions.family_reasons(family, minimums=minimums)
        if reasons:
            raise UnsupportedError(
                f"{'; '.join(reasons)}. portvlm supports "
                + ", ".join(f"{f} (transformers >={v})" for f, v in minimums.items())
                + f" on transformers {versions.VERIFIED_RANGE_TEXT}; portvlm/models/ says how to add a family"
            )
        paths = layer_paths.resolve(model)

    from portvlm.backends import select
    from portvlm.shims.attention import ATTN_NAME, AttentionState

    training = bool(getattr(model, "training", False))
    v_head, t_head = _head_dims(model) if model is not None else (64, 64)
    vision_sel = select(policy.vision_backends, platform, policy.dtype, v_head, training)
    text_sel = select(policy.text_backends, platform, policy.dtype, t_head, training)
    state = AttentionState(name=f"{ATTN_NAME}_{next(_NAMES)}", vision_backend=vision_sel.name,
                           text_backend=text_sel.name)

    report = Report(
        transformers=gate.version,
        family=family,
        arch=spec.id,
        platform=_describe_platform(platform),
        emulation=policy.emulation,
        dtype=policy.dtype,
        dtype_why=policy.dtype_why,
        vision_backend=vision_sel,
        text_backend=text_sel,
        attn_name=state.name,
        wrappers=held.labels if held is not None else [],
    )
    for note in held.notes if held is not None else []:
        report.warnings.append(note)
        warnings.warn(note, stacklevel=2)
    if gate.warning:
        report.warnings.append(gate.warning)
        warnings.warn(gate.warning, stacklevel=2)

    patcher = Patcher()
    handle = PatchHandle(report, patcher, state, policy.dtype, foreign)
    ctx = Context(model, family, paths, state, spec, platform, policy.dtype, claim=handle.claim)
    version = versions.transformers_version()
    try:
        if model is not None:
            handle.take_configs(model)
            _inherited_names(model, report)
            _ORIGINAL_IMPL[state.name] = getattr(model.config, "_attn_implementation", None)
        for shim in SHIMS:
            reasons = []
            if not versions.in_range(shim.transformers, version):
                reasons.append(f"written for transformers {shim.transformers}, found {version}")
            reasons += shim.probe(ctx) if not reasons else []
            if reasons:
                report.not_applied.append(NotApplied(shim.name, tuple(reasons)))
                continue
            for target in shim.apply(ctx, patcher) if shim.apply else []:
                report.applied.append(Applied(shim.name, target, shim.answers))
        if model is not None:
            _instance_overrides(handle, model, patcher)
            kept = hub_kernels.keep_off(model, patcher) if spec.no_hub_kernels else []
            report.hub_kernels = hub_kernels.report(spec, hub_kernels.kernelized_layers(model), kept)
            handle.own(model)
            _LIVE_HANDLES[model] = handle
            if policy.dtype == "float16":
                from portvlm.shims.fp16.protect import protect

                handle.fp16 = protect(model, patcher, calibration=calibration, guard=guard, arch=spec.id)
                report.fp16 = list(handle.fp16.changes)
            elif calibration is not None:
                report.warnings.append(f"calibration unused: the {spec.id} policy runs {policy.dtype}, whose range "
                                       "needs no rescaling")
    except BaseException:
        handle.revert()
        raise
    return handle
