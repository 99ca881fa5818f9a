"""Greedy decoding oracles: through a cache (the path under test) and with no cache (one full forward per step).

Used by the llava_mla checks, their tests and ``benchmarks/mla_kv.py``: a cache (``LatentCache``, ``SinkWindowCache``,
``DynamicCache``) is right when its tokens equal the no-cache ones and its logits are within tolerance.
"""

from __future__ import annotations

import torch

from portvlm.shims.kv_cache import cache_kwargs


def _next(model, logits: torch.Tensor) -> torch.Tensor:
    """The greedy token, never the image placeholder: a random-weight model may rank it first, and a prompt with one
    more placeholder than images is refused by the no-cache forward ("Image features and image tokens do not match")."""
    from portvlm.shims import model_io

    try:
        image = model_io.image_token_id(model.config)
    except AttributeError:  # a text-only model: no placeholder
        return logits.argmax(-1, keepdim=True)
    masked = logits.clone()
    masked[..., image] = float("-inf")
    return masked.argmax(-1, keepdim=True)


@torch.no_grad()
def greedy_cached(model, inputs: dict, steps: int, cache) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding through ``cache``: the prompt once, then one token per step with explicit positions."""
    out = model(**inputs, use_cache=True, **cache_kwargs(model, cache))
    logits = [out.logits[:, -1].float()]
    tokens = []
    n = inputs["input_ids"].shape[1]
    for step in range(steps):
        tok = _next(model, logits[-1])
        tokens.append(int(tok[0, 0]))
        if step == steps - 1:
            break
        pos = torch.tensor([[n + step]], device=tok.device)
        out = model(input_ids=tok, position_ids=pos, use_cache=True, **cache_kwargs(model, cache),
                    attention_mask=torch.ones(1, n + step + 1, dtype=torch.long, device=tok.device))
        logits.append(out.logits[:, -1].float())
    return tokens, logits


@torch.no_grad()
def greedy_full(model, inputs: dict, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with no cache: every step is one full forward over prompt + tokens so far."""
    ids = inputs["input_ids"]
    tokens, logits = [], []
    for _ in range(steps):
        n = ids.shape[1]
        kw = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(n)[None].to(ids.device))
        last = model(**kw, use_cache=False).logits[:, -1].float()
        logits.append(last)
        tok = _next(model, last)
        tokens.append(int(tok[0, 0]))
        ids = torch.cat((ids, tok), 1)
    return tokens, logits
