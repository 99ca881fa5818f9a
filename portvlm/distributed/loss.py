"""The loss of packed rows split over ranks: the mean over every token of the batch, never a mean of means.

Targets are shifted inside each sample (``cu_seqlens``): a sample's last token predicts nothing, so no token is
trained to predict the next sample's first. Each rank sums the losses of its own tokens and divides by the token
count of the whole batch (every DP rank's rows, each row counted once across its SP ranks). The gradients of those
local terms add up to the gradient of the global mean, so FSDP must SUM them: ``parallelize`` sets the gradient
divide factor to 1 (FSDP2's default divides by the number of ranks — right for a mean of per-rank means over equal
batches, wrong for packed rows of different lengths and for SP, where each rank holds part of one row).
"""

from __future__ import annotations

IGNORE = -100


def shift_targets(labels, cu_seqlens):
    """``[1, S]`` next-token targets of a packed row: ``labels[t+1]`` within a sample, ``-100`` at sample ends."""
    import torch

    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    ends = cu_seqlens[1:].to(device=labels.device, dtype=torch.long) - 1
    targets[0, ends] = IGNORE
    return targets


def token_loss_sum(hidden, lm_head, targets, *, chunk: int = 8192):
    """Sum of fp32 cross-entropy over ``targets != -100``; logits of at most ``chunk`` tokens exist at a time."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)

    def part(h, t):
        return F.cross_entropy(lm_head(h).float(), t, ignore_index=IGNORE, reduction="sum")

    if hidden.shape[0] <= chunk:
        return part(hidden, targets)
    # Long rows: the [S, vocab] fp32 logits would dominate memory (32k × 152k × 4 B = 19 GiB); recompute per chunk.
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(part, hidden[s : s + chunk], targets[s : s + chunk], use_reentrant=False)
    return total
