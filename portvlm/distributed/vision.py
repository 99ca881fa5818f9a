"""The vision tower under sequence parallelism: whole images / video frames spread over SP ranks, not replicated.

Every image, and every frame (temporal patch) of a video, is one item. Items are assigned to SP ranks by patch count
(largest first, to the least-loaded rank: deterministic, so every rank computes the same plan without talking).
Each rank encodes its own items in one tower call; the merged features (and Qwen3-VL's deepstack features) are then
exchanged with an autograd all-to-all so that every rank holds all of them, and put back in sequence order. The
caller builds the whole row's ``inputs_embeds`` from them and slices its part — so an image whose tokens straddle a
rank boundary of the text split is exactly what one process would see. Gradients flow back to the rank that
encoded each item.

A rank that got no item still runs the tower (one dummy ``spatial_merge_size²`` patch frame, times zero): FSDP
all-gathers and reduce-scatters every vision block on every rank, so all ranks must take part.

Splitting a Qwen video into frames is exact: Qwen2.5-VL and Qwen3-VL vision attention is per frame (``cu_seqlens``
repeats ``h*w`` ``t`` times), windows and rotary depend on ``h, w`` only, and Qwen3-VL's position embedding is
interpolated per ``(h, w)`` and repeated per frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from portvlm.shims.model_io import tower_outputs, vision_channels


@dataclass(frozen=True)
class Item:
    """One image or video frame: where its patches sit in ``pixel_values[_videos]`` and its grid."""

    kind: str  # "image" | "video"
    index: int  # order among items of its kind (sequence order)
    start: int  # first patch row in the kind's pixel tensor
    grid: tuple[int, int, int]  # (t, h, w) in patches; videos are split into t=1 frames

    @property
    def patches(self) -> int:
        t, h, w = self.grid
        return t * h * w


def items_of(image_grid_thw, video_grid_thw) -> list[Item]:
    """Images, then video frames, in sequence order (how the model concatenates its features)."""
    items: list[Item] = []
    start = 0
    for i, (t, h, w) in enumerate(image_grid_thw.tolist() if image_grid_thw is not None else []):
        items.append(Item("image", i, start, (int(t), int(h), int(w))))
        start += t * h * w
    start, k = 0, 0
    for t, h, w in video_grid_thw.tolist() if video_grid_thw is not None else []:
        for _ in range(int(t)):
            items.append(Item("video", k, start, (1, int(h), int(w))))
            start += h * w
            k += 1
    return items


def assign(items: list[Item], ranks: int) -> list[list[int]]:
    """Item positions per rank, balanced by patch count (longest-processing-time first; ties by position)."""
    load = [0] * ranks
    plan: list[list[int]] = [[] for _ in range(ranks)]
    for pos in sorted(range(len(items)), key=lambda p: (-items[p].patches, p)):
        r = min(range(ranks), key=lambda x: (load[x], x))
        plan[r].append(pos)
        load[r] += items[pos].patches
    return [sorted(p) for p in plan]


def zero_anchor(x):
    """An exact fp32 zero that depends on every element of ``x`` (gradient 0 to each), in any dtype of ``x``.

    Never ``0.0 * x.sum()``: in fp16 the sum of many finite features passes 65504, the sum is inf and 0·inf = NaN,
    which the caller adds to every embedding (issue 22: every packed row with ~17+ images at 7B widths gave loss NaN
    under the sm70 policy). Multiplying first keeps every term an exact zero, so the sum cannot overflow; an element
    that is itself inf or NaN (a real overflow in the tower) still surfaces as NaN.
    """
    import torch

    return (x * 0).sum(dtype=torch.float32)


def merge_size(tower) -> int:
    value = getattr(tower, "spatial_merge_size", None)
    return int(value if value is not None else tower.config.spatial_merge_size)


def encode_local(tower, items: list[Item], mine: list[int], pixels: dict, pixel_dim: int, like):
    """Run the tower on this rank's items (or a zero-weighted dummy frame): ``(features, deepstack, n_rows)``."""
    import torch

    m = merge_size(tower)
    if mine:
        parts = [pixels[items[p].kind][items[p].start : items[p].start + items[p].patches] for p in mine]
        grid = torch.tensor([items[p].grid for p in mine], device=like.device)
        feats, deep = tower_outputs(tower(torch.cat(parts, 0), grid_thw=grid))
        return feats, deep, feats.shape[0]
    dummy = torch.zeros(m * m, pixel_dim, dtype=like.dtype, device=like.device)
    feats, deep = tower_outputs(tower(dummy, grid_thw=torch.tensor([[1, m, m]], device=like.device)))
    # Zero rows out, but connected to the graph: backward reaches every vision parameter on this rank too.
    return feats[:0] + zero_anchor(feats), [d[:0] + zero_anchor(d) for d in deep], 0


def gather_features(local, counts: list[int], rank: int, group):
    """Every rank's rows, concatenated in rank order (uneven counts; autograd: grads return to the owner)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    from portvlm.distributed.ulysses import _wait

    ranks = len(counts)
    if ranks == 1:
        return local
    # Each rank sends its rows to every rank: an all-gather of uneven sizes written as one all-to-all.
    out = all_to_all_single_autograd(local.repeat(ranks, 1).contiguous(), list(counts), [counts[rank]] * ranks, group)
    return _wait(out)


def distributed_features(tower, row: dict, rank: int, ranks: int, group, *, ordered: bool = True):
    """``{"image": feats, "video": feats, "deepstack": [(image, video), ...]}`` for the whole row, on every rank.

    ``ordered=False`` leaves the features in rank order (a negative control: it must make the result wrong).
    """
    import torch

    items = items_of(row.get("image_grid_thw"), row.get("video_grid_thw"))
    pixels = {"image": row.get("pixel_values"), "video": row.get("pixel_values_videos")}
    like = next(p for p in (pixels["image"], pixels["video"]) if p is not None) if items else None
    if like is None:  # a row with no vision at all on any rank: every rank still encodes the same dummy
        like = torch.zeros(1, _pixel_dim(tower), device=row["input_ids"].device)
    plan = assign(items, ranks)
    feats, deep, _ = encode_local(tower, items, plan[rank], pixels, like.shape[-1], like)
    m2 = merge_size(tower) ** 2
    counts = [sum(items[p].patches // m2 for p in plan[r]) for r in range(ranks)]
    width = feats.shape[-1]
    gathered = gather_features(torch.cat([feats, *deep], dim=-1), counts, rank, group)
    if ordered:
        # rows of item p in rank order -> sequence order
        starts, offset = {}, 0
        for r in range(ranks):
            for p in plan[r]:
                starts[p] = offset
                offset += items[p].patches // m2
        index = torch.cat([torch.arange(starts[p], starts[p] + items[p].patches // m2) for p in range(len(items))]) \
            if items else torch.zeros(0, dtype=torch.long)
        gathered = gathered.index_select(0, index.to(gathered.device))
    n_image = sum(it.patches // m2 for it in items if it.kind == "image")
    chunks = gathered.split(width, dim=-1)
    out = {"image": chunks[0][:n_image], "video": chunks[0][n_image:], "deepstack": [(d[:n_image], d[n_image:]) for d in chunks[1:]]}
    # A zero that depends on every feature: the row's embeddings add it, so the tower's backward (and FSDP's
    # reduce-scatter of its blocks) runs on every rank, also where the row has no vision token at all.
    out["anchor"] = zero_anchor(gathered)
    out["items"], out["plan"] = len(items), plan
    return out


def _pixel_dim(tower) -> int:
    cfg = tower.config
    channels = vision_channels(cfg)
    return int(channels * cfg.temporal_patch_size * cfg.patch_size**2)
