"""The fp16 range scan: run a model on calibration inputs in fp32 arithmetic and hold every peak against fp16's range.

    report = scan(model, batch)          # batch: forward kwargs (one dict or a list of them)
    report.ok, report.overflows          # a peak above 65504 at the weights as they are now
    report.alpha, report.islands         # what the fp16 policy does about it (portvlm.shims.fp16.protect applies it)

Each module's peak |output| is recorded (each Linear's and norm's peak |input| too): the residual stream of a tower
is what its blocks, its stream writers (embeddings, attention output and MLP down projections) and its norms' inputs
see; everything else inside a block (gate/up projections, the MLP intermediate, q/k/v) is internal to that block.
The stream is fixed by a power-of-two α (``FP16_MAX / HEADROOM`` at most after it); an internal overflow by an fp32
island on the block part that holds it. The model's weights are cast to fp32 for the scan and back afterwards
(fp16/bf16 -> fp32 -> back is exact), so a model in fp16 scans in place without a second copy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from portvlm.errors import UnsupportedError
from portvlm.shims.fp16 import FP16_MAX, FP16_TINY, HEADROOM
from portvlm.shims.model_io import reset_rope_state

ISLAND_ATTR = "_portvlm_fp32_island"  # set on a module that computes in fp32 (portvlm.shims.fp16.protect): why, as text
TOWERS = ("vision", "text")


# --------------------------------------------------------------------------------------------------------------
# Layout: which modules write each tower's residual stream, which norms read it, where the blocks are
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where a model's residual streams are written and normalised (module paths), per tower."""

    family: str
    towers: dict[str, str]  # tower -> module path ("model.visual", "model.language_model")
    blocks: dict[str, tuple[str, ...]]  # tower -> block paths (vision blocks, decoder layers)
    writers: dict[str, tuple[str, ...]]  # tower -> modules whose weights and biases write the stream (× α_tower)
    bridges: tuple[str, ...]  # vision -> text: the mergers' last linear layers (× α_text: image tokens at text scale)
    bridge_owners: tuple[str, ...]  # the mergers themselves (an overflow inside one islands the merger)
    norms: dict[str, tuple[str, ...]]  # tower -> norms that read the stream (eps × α_tower²)
    fixed: dict[str, str] = field(default_factory=dict)  # tower -> why its α stays 1

    def tower_of(self, path: str) -> str | None:
        """The tower a module path belongs to (bridges and the lm_head count as text), else None."""
        if any(_within(path, b) for b in self.bridges) or path in self.writers["text"]:
            return "text"
        for tower in TOWERS:
            if _within(path, self.towers[tower]):
                return tower
        return None

    def block_of(self, path: str) -> str | None:
        """The block path that holds ``path`` (or is it), else None."""
        for tower in TOWERS:
            for block in self.blocks[tower]:
                if _within(path, block):
                    return block
        return None


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower() and _eps_attr(module) is not None


def _eps_attr(module) -> str | None:
    """The attribute that holds a norm's epsilon (``eps`` for nn.LayerNorm, ``variance_epsilon`` for Qwen RMSNorm)."""
    for name in ("variance_epsilon", "eps"):
        if isinstance(getattr(module, name, None), float):
            return name
    return None


FIXED_LAYOUTS = ("qwen2_5_vl", "qwen3_vl", "llava")  # the families this layout was written (and calibrated) for


def layout_of(model) -> Layout:
    """The stream layout of a Qwen2.5-VL / Qwen3-VL / LLaVA model on any supported transformers (UnsupportedError else)."""
    import torch

    from portvlm.shims.layer_paths import resolve

    paths = resolve(model)
    names = {id(m): n for n, m in model.named_modules()}
    family = model.config.model_type

    def sub(parent: str, rel: str):
        path = f"{parent}.{rel}" if parent else rel
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            raise UnsupportedError(f"fp16 layout of {family}: no module {path} on this transformers version; "
                                   "portvlm.shims.fp16.scan.layout_of needs updating for it") from None

    def first(parent: str, rels: tuple[str, ...], optional: bool = False):
        """The first of ``rels`` under ``parent`` (Qwen3.5's DeltaNet layers write through linear_attn.out_proj;
        a MoE layer has no single down_proj): ``None`` when ``optional`` and none exists."""
        for rel in rels:
            path = f"{parent}.{rel}" if parent else rel
            try:
                model.get_submodule(path)
                return path
            except AttributeError:
                continue
        if optional:
            return None
        return sub(parent, rels[0])[0]

    def norms_in(prefix: str) -> list[str]:
        return [n for n, m in model.named_modules() if _within(n, prefix) and _is_norm(m)]

    text_layers = paths.paths["text_layers"]
    text_model = text_layers.rsplit(".", 1)[0]
    embed = model.get_input_embeddings()
    layers = tuple(f"{text_layers}.{i}" for i in range(len(paths.text_layers)))
    text_writers = [names[id(embed)]]
    text_norms = []
    for layer in layers:
        text_writers.append(first(layer, ("self_attn.o_proj", "linear_attn.out_proj")))
        down = first(layer, ("mlp.down_proj", "mlp.shared_expert.down_proj"), optional=family not in FIXED_LAYOUTS)
        text_writers += [down] if down else []
        text_norms += [sub(layer, "input_layernorm")[0], sub(layer, "post_attention_layernorm")[0]]
    final_norm = sub(text_model, "norm")[0]
    text_norms.append(final_norm)

    tower = paths.paths["vision_tower"]
    vblocks = tuple(f"{paths.paths['vision_blocks']}.{i}" for i in range(len(paths.vision_blocks)))
    fixed: dict[str, str] = {}
    patch_tower = getattr(model.get_submodule(tower), "patch_embed", None) is not None  # probed: no registry import
    if family in ("qwen2_5_vl", "qwen3_vl") or (family not in FIXED_LAYOUTS and patch_tower):
        # Qwen-style patch towers (the declared 5.x families too: Qwen3.5, GLM-V, Qwen2-VL, Qwen3-VL-MoE)
        vision_writers = [sub(tower, "patch_embed.proj")[0]]
        pos = first(tower, ("pos_embed",), optional=True)
        if pos:
            vision_writers.append(pos)  # learned positions are added to the patch embeddings
        vision_norms = []
        for block in vblocks:
            vision_writers += [first(block, ("attn.proj", "attn.out_proj")),
                               first(block, ("mlp.down_proj", "mlp.linear_fc2", "mlp.fc2"))]
            vision_norms += [sub(block, "norm1")[0], sub(block, "norm2")[0]]
        owners = [sub(tower, "merger")[0]]
        if getattr(model.get_submodule(tower), "deepstack_merger_list", None) is not None:  # deepstack: intermediate vision states merged into the first text layers
            deep = model.get_submodule(tower).deepstack_merger_list
            owners += [f"{tower}.deepstack_merger_list.{i}" for i in range(len(deep))]
        bridges = []
        for owner in owners:
            linears = [n for n, m in model.get_submodule(owner).named_modules() if isinstance(m, torch.nn.Linear)]
            bridges.append(f"{owner}.{linears[-1]}")
            vision_norms += norms_in(owner)  # the merger's norm reads the vision stream first thing
    else:  # LLaVA: the projector reads CLIP's hidden_states[-2], which no norm follows
        vision_writers, vision_norms = [], []
        fixed["vision"] = ("LLaVA's projector reads the CLIP tower's penultimate hidden state directly (no norm "
                           "follows it), so the vision stream is not scale-invariant there; fp32 islands only")
        owners = [paths.paths["projector"]]
        linears = [n for n, m in paths.projector.named_modules() if isinstance(m, torch.nn.Linear)]
        bridges = [f"{owners[0]}.{linears[-1]}"]
    return Layout(
        family=family,
        towers={"vision": tower, "text": text_model},
        blocks={"vision": vblocks, "text": layers},
        writers={"vision": tuple(vision_writers), "text": tuple(text_writers)},
        bridges=tuple(bridges),
        bridge_owners=tuple(owners),
        norms={"vision": tuple(vision_norms), "text": tuple(text_norms)},
        fixed=fixed,
    )


# --------------------------------------------------------------------------------------------------------------
# The scan
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peak:
    """One module's fp32 figures over the calibration batch."""

    path: str
    cls: str
    out_peak: float  # max |output|
    out_rms: float  # root mean square of the output (the scale its typical values live at)
    in_peak: float | None = None  # max |input| (Linear and norm modules)
    role: str = "other"  # "writer" | "bridge" | "norm" | "block" | "internal" | "head" | "other"
    tower: str | None = None
    island: str | None = None  # set when the module runs in (or inside) an fp32 island


@dataclass(frozen=True)
class Overflow:
    """A peak above fp16's range, and what the fp16 policy does about it."""

    path: str
    peak: float
    what: str  # "output" | "input"
    fix: str  # what the policy does ("rescales the text residual stream by α=2^-3", "runs ... as an fp32 island")

    def __str__(self) -> str:
        where = self.path if self.what == "output" else f"the input of {self.path}"
        return f"fp16 overflow at {where}: |x| up to {self.peak:.3g} > {FP16_MAX:.0f}"


@dataclass
class ScanReport:
    """What the scan measured and what the fp16 policy would do: α per tower and the fp32 islands, with reasons."""

    family: str
    arch: str | None  # the policy the model is patched with ("sm70"), None when unpatched
    batches: int
    peaks: list[Peak]
    stream_peak: dict[str, float]  # tower -> peak of its residual stream at the current weights
    stream_rms: dict[str, float]  # tower -> smallest rms among its stream modules
    alpha: dict[str, float]  # tower -> the power of two the policy scales the stream by (1.0: unchanged)
    islands: dict[str, str]  # module path -> why it computes in fp32
    overflows: list[Overflow]
    unfixable: list[str] = field(default_factory=list)
    fixed: dict[str, str] = field(default_factory=dict)  # tower -> why its α stays 1

    @property
    def ok(self) -> bool:
        """True when every calibrated peak fits fp16 at the weights as they are (the islands computing in fp32)."""
        return not self.overflows

    @property
    def needs_fix(self) -> bool:
        return any(a != 1.0 for a in self.alpha.values()) or bool(self.islands)

    def headroom(self, tower: str) -> tuple[float, float]:
        """(×65504 / peak, ×rms / subnormal floor) of ``tower``'s stream after α."""
        a = self.alpha.get(tower, 1.0)
        peak, rms = self.stream_peak.get(tower, 0.0) * a, self.stream_rms.get(tower, 0.0) * a
        return (FP16_MAX / peak if peak else math.inf), (rms / FP16_TINY if rms else math.inf)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "family": self.family, "arch": self.arch, "batches": self.batches,
            "stream_peak": self.stream_peak, "stream_rms": self.stream_rms, "alpha": self.alpha,
            "headroom": {t: dict(zip(("max", "subnormal"), self.headroom(t), strict=True)) for t in self.stream_peak},
            "islands": dict(self.islands), "overflows": [o.__dict__ | {"message": str(o)} for o in self.overflows],
            "unfixable": list(self.unfixable), "fixed": dict(self.fixed),
            "peaks": [p.__dict__ for p in self.peaks],
        }

    def lines(self) -> list[str]:
        """The report body (no header): overflows with their fix, then each stream's headroom, then the islands."""
        out = []
        for o in self.overflows:
            out += [f"  {o}", f"    the fp16 policy: {o.fix}"]
        out += [f"  cannot fix: {u}" for u in self.unfixable]
        for tower in sorted(self.stream_peak):
            a = self.alpha.get(tower, 1.0)
            up, down = self.headroom(tower)
            scale = "" if a == 1.0 else f", after α=2^{int(math.log2(a))}"
            out.append(f"  {tower} stream: peak {self.stream_peak[tower]:.3g} (x{FP16_MAX / self.stream_peak[tower]:.2g} "
                       f"below 65504){scale}: x{up:.3g} below 65504, smallest rms x{down:.3g} above the subnormal "
                       f"floor {FP16_TINY:.2g}" + (f" ({self.fixed[tower]})" if tower in self.fixed else ""))
        out += [f"  fp32 island: {p}: {why}" for p, why in self.islands.items()]
        return out

    def __str__(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        policy = f"arch {self.arch} policy" if self.arch else "unpatched"
        return "\n".join([f"portvlm fp16 scan: {verdict} — {self.family} ({policy}), {self.batches} calibration "
                          "batch(es) in fp32 arithmetic, peaks vs 65504"] + self.lines())


@contextlib.contextmanager
def fp32_arithmetic(model, *, lean: bool | None = None):
    """Run ``model`` in fp32 arithmetic; its tensors return to their own dtypes on exit (fp16/bf16 -> fp32 -> back is
    exact). ``lean`` False: the whole model is cast at once. True: each module's own tensors are cast just before its
    forward (its floating inputs too) and back just after, so one module's fp32 copy exists at a time — a 7B model in
    fp16 (15 GB) on a 16 GB V100 cannot hold a second, fp32 copy (30 GB). None: lean where the whole fp32 copy would
    not fit in the device's free memory."""
    if lean is None:
        lean = not _fp32_copy_fits(model)
    if lean:
        yield from _fp32_per_module(model)
        return
    saved = [(module, _cast_own(module)) for module in model.modules()]
    try:
        yield
    finally:
        for module, dtypes in reversed(saved):
            _restore_own(module, dtypes)


def _low_precision_tensors(module):
    """``(kind, name, tensor)`` of ``module``'s own floating parameters and buffers not in fp32."""
    import torch

    return [(kind, name, t) for kind in ("_parameters", "_buffers") for name, t in getattr(module, kind).items()
            if t is not None and t.is_floating_point() and t.dtype != torch.float32]


def _cast_own(module) -> list[tuple[str, str, object]]:
    """Cast ``module``'s own low-precision tensors to fp32 in place; ``(kind, name, dtype)`` to restore them."""
    import torch

    own = _low_precision_tensors(module)
    dtypes = [(kind, name, t.dtype) for kind, name, t in own]  # before the cast: a parameter's dtype follows .data
    with torch.no_grad():
        for kind, name, t in own:
            if kind == "_parameters":
                t.data = t.data.float()
            else:
                module._buffers[name] = t.float()
    return dtypes


def _restore_own(module, dtypes) -> None:
    """Undo :func:`_cast_own` (fp16/bf16 -> fp32 -> back is exact)."""
    import torch

    with torch.no_grad():
        for kind, name, dtype in dtypes:
            t = getattr(module, kind)[name]
            if kind == "_parameters":
                t.data = t.data.to(dtype)
            else:
                module._buffers[name] = t.to(dtype)


def _fp32_copy_fits(model) -> bool:
    """Whether an fp32 copy of ``model``'s low-precision tensors fits in its device's free memory (CPU: assumed)."""
    import torch

    tensors = [t for m in model.modules() for _, _, t in _low_precision_tensors(m)]
    if not tensors or tensors[0].device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(tensors[0].device)
    extra = sum(t.numel() * (4 - t.element_size()) for t in tensors)  # fp32 replaces each in place, one at a time
    return extra < 0.8 * free


def _fp32_per_module(model):
    """The lean path of :func:`fp32_arithmetic`: per-module casts around each forward (a module whose tensors a
    parent reads, e.g. a dtype probe, sees its own dtype there; its inputs are cast to fp32 on the way in)."""
    import torch

    from portvlm.shims.fp16.protect import _cast

    held: dict[int, list] = {}  # id(module) -> [(kind, name, dtype)] while its forward runs

    def pre(module, args, kwargs):
        if id(module) not in held:
            held[id(module)] = _cast_own(module)
        return _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}

    def post(module, args, kwargs, out):
        _restore_own(module, held.pop(id(module), []))

    modules = [m for m in model.modules() if _low_precision_tensors(m)] + [model]
    hooks = []
    for m in dict.fromkeys(modules):
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for m in model.modules():  # anything a failed forward left cast
            _restore_own(m, held.pop(id(m), []))


def _tensors(out):
    import torch

    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point()][:1]
    return []


def _as_batches(batch) -> list[Mapping]:
    if isinstance(batch, Mapping):
        return [batch]
    batches = list(batch)
    if not batches or not all(isinstance(b, Mapping) for b in batches):
        raise TypeError("calibration: the model's forward kwargs, one dict or a list of dicts "
                        "(input_ids, attention_mask, pixel_values, image_grid_thw, ...)")
    return batches


def _to(value, device, float_dtype):
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device, float_dtype) if value.is_floating_point() else value.to(device)
    return value


def measure(model, batch, *, lean: bool | None = None) -> tuple[dict[str, tuple], int]:
    """Run ``model`` on ``batch`` in fp32 arithmetic; per module path: (class, out peak, out rms, in peak or None)."""
    import torch

    batches = _as_batches(batch)
    device = next(model.parameters()).device
    stats: dict[str, list] = {}
    hooks = []

    def hook_for(path: str, wants_input: bool):
        def hook(module, args, out):
            ts = _tensors(out)
            if not ts:
                return
            t = ts[0].detach().float()
            s = stats.setdefault(path, [type(module).__name__, None, None, 0, None])
            peak = torch.linalg.vector_norm(t, float("inf"))
            s[1] = peak if s[1] is None else torch.maximum(s[1], peak)
            sq = t.pow(2).sum()  # fp32: the sum of squares can leave fp16's range, never fp32's here
            s[2] = sq if s[2] is None else s[2] + sq
            s[3] += t.numel()
            if wants_input and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                inp = torch.linalg.vector_norm(args[0].detach().float(), float("inf"))
                s[4] = inp if s[4] is None else torch.maximum(s[4], inp)
        return hook

    for path, module in model.named_modules():
        if not path:
            continue
        wants = isinstance(module, torch.nn.Linear) or _is_norm(module)
        hooks.append(module.register_forward_hook(hook_for(path, wants)))
    was_training = model.training
    model.eval()
    try:
        with fp32_arithmetic(model, lean=lean), torch.no_grad():
            for b in batches:
                reset_rope_state(model)  # Qwen keeps rope deltas between calls
                model(**{k: _to(v, device, torch.float32) for k, v in b.items()}, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {}
    for path, (cls, peak, sq, n, inp) in stats.items():
        rms = math.sqrt(float(sq) / n) if n else 0.0
        out[path] = (cls, float(peak), rms, None if inp is None else float(inp))
    return out, len(batches)


def _power_of_two_below(peak: float) -> float:
    """The largest α = 2^-k (k >= 0) with peak·α <= FP16_MAX / HEADROOM."""
    if peak <= FP16_MAX / HEADROOM:
        return 1.0
    return 2.0 ** -math.ceil(math.log2(peak * HEADROOM / FP16_MAX))


def _island_target(layout: Layout, path: str) -> str:
    """The module an overflow at ``path`` makes an fp32 island: the block part holding it, the merger, or itself."""
    block = layout.block_of(path)
    if block is not None and path != block:
        return f"{block}.{path[len(block) + 1:].split('.')[0]}"
    owner = next((o for o in layout.bridge_owners if _within(path, o)), None)
    return owner or path


def scan(model, batch, *, layout: Layout | None = None, arch: str | None = None,
         lean: bool | None = None) -> ScanReport:
    """Measure ``model`` on ``batch`` (forward kwargs; a dict or a list) in fp32 and plan the fp16 fix (pure of weights).
    ``lean``: as :func:`fp32_arithmetic` (None: per-module fp32 casts where a whole fp32 copy would not fit)."""
    layout = layout or layout_of(model)
    figures, n = measure(model, batch, lean=lean)
    return plan(layout, figures, n, arch=arch, islands_now=_islands_now(model))


def _islands_now(model) -> dict[str, str]:
    return {p: getattr(m, ISLAND_ATTR) for p, m in model.named_modules() if getattr(m, ISLAND_ATTR, None)}


def plan(layout: Layout, figures: dict[str, tuple], batches: int, *, arch: str | None = None,
         islands_now: dict[str, str] | None = None) -> ScanReport:
    """Classify each measured module, find the overflows and choose α per tower and the fp32 islands (pure)."""
    islands_now = islands_now or {}
    limit = FP16_MAX / HEADROOM
    peaks: list[Peak] = []
    stream: dict[str, float] = {t: 0.0 for t in TOWERS}
    rms: dict[str, float] = {t: math.inf for t in TOWERS}
    first_over: dict[str, tuple[str, float, str]] = {}  # tower -> the first stream site past FP16_MAX (figures are in
    # execution order: hooks record a module when it first returns)
    internal: list[tuple[str, float, str]] = []  # (path, peak, "output" | "input")
    # Containers hand on what a block, a writer or a bridge computed (a block's `mlp` returns its down projection's
    # output): counted at the module that computes it, never twice.
    computes = [*(b for t in TOWERS for b in layout.blocks[t]), *(w for t in TOWERS for w in layout.writers[t]),
                *layout.bridges]
    containers = {p for c in computes for p in _ancestors(c)}
    for path, (cls, out_peak, out_rms, in_peak) in figures.items():
        if path in containers:
            continue
        tower = layout.tower_of(path)
        island = next((why for p, why in islands_now.items() if _within(path, p)), None)
        block = layout.block_of(path)
        if path in layout.bridges:
            role = "bridge"
        elif tower and path in layout.writers[tower]:
            role = "writer"
        elif tower and path in layout.norms[tower]:
            role = "norm"
        elif block == path:
            role = "block"
        elif block is not None or any(_within(path, o) for o in layout.bridge_owners):
            role = "internal"
        elif tower is None:
            role = "head"  # the lm_head and anything else outside both towers
        else:
            role = "other"
        peaks.append(Peak(path, cls, out_peak, out_rms, in_peak, role, tower, island))
        if role in ("writer", "bridge", "block") and tower:
            if out_peak > FP16_MAX and tower not in first_over:  # execution order: the writer that overflows first
                first_over[tower] = (path, out_peak, "output")
            if out_peak > stream[tower]:
                stream[tower] = out_peak
            rms[tower] = min(rms[tower], out_rms) if out_rms > 0 else rms[tower]
        if role == "norm" and tower and in_peak is not None and in_peak > stream[tower]:
            stream[tower] = in_peak
            if in_peak > FP16_MAX and tower not in first_over:  # a residual add (no module) left the range first
                first_over[tower] = (path, in_peak, "input")
        if island is not None:
            continue  # computes in fp32 (its hand-off to fp16 is its output, counted above when it is a writer)
        if role in ("internal", "head", "other") and out_peak > limit:
            internal.append((path, out_peak, "output"))
        if role in ("writer", "bridge") and in_peak is not None and in_peak > limit and in_peak > stream[tower]:
            internal.append((path, in_peak, "input"))  # the MLP intermediate feeding a down projection
    alpha = {}
    overflows: list[Overflow] = []
    unfixable: list[str] = []
    for tower in TOWERS:
        if stream[tower] == 0.0:
            continue
        a = 1.0 if tower in layout.fixed else _power_of_two_below(stream[tower])
        alpha[tower] = a
        if stream[tower] > FP16_MAX:
            path, peak, what = first_over[tower]
            if a == 1.0:
                fix = f"nothing it can rescale ({layout.fixed.get(tower, 'no stream layout')}); run in fp32"
                unfixable.append(f"{Overflow(path, peak, what, fix)}: {fix}")
            else:
                fix = (f"rescales the {tower} residual stream by α=2^{int(math.log2(a))} (peak {stream[tower]:.3g} -> "
                       f"{stream[tower] * a:.3g}); the logits are unchanged")
            overflows.append(Overflow(path, peak, what, fix))
    islands: dict[str, str] = {}
    for path, peak, what in internal:
        target = _island_target(layout, path)
        where = path if what == "output" else f"the input of {path}"
        why = f"|x| up to {peak:.3g} at {where} (inside the block: no residual rescaling reaches it)"
        islands.setdefault(target, why)
        if peak > FP16_MAX:
            overflows.append(Overflow(path, peak, what, f"runs {target} as an fp32 island (fp16 in, fp16 out)"))
    overflows.sort(key=lambda o: -o.peak)
    return ScanReport(
        family=layout.family, arch=arch, batches=batches, peaks=peaks,
        stream_peak={t: v for t, v in stream.items() if v}, stream_rms={t: v for t, v in rms.items() if v != math.inf},
        alpha=alpha, islands=islands, overflows=overflows, unfixable=unfixable, fixed=dict(layout.fixed),
    )


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


__all__ = ["ISLAND_ATTR", "Layout", "Overflow", "Peak", "ScanReport", "fp32_arithmetic", "layout_of", "measure",
           "plan", "scan"]
