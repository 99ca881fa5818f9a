"""The README's distributed recipe runs as written (issue 22): two gloo processes on the CPU, the sm70 policy (fp16),
FSDP2 mixed precision by default and ``torch.amp.GradScaler``.

    PY=$(python -m portvlm.run.env --transformers 5.24.0 --torch 2.13.0+cpu --python 3.11 | tail -1)
    $PY -m pytest tests/torch/test_readme_recipe.py -q -p no:cacheprovider
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "## Training on N GPUs"
STEPS = 3


def recipe() -> str:
    """The first ```python block under the README's distributed heading."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(HEADING):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _worker(rank, world, port, out):
    from portvlm.distributed.parallel import pack  # noqa: F401 - the recipe imports it itself
    from portvlm.models import inputs as model_inputs
    from portvlm.models import tiny

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.pop("PORTVLM_SHARED_DEVICE", None)
    torch.set_num_threads(1)
    model = tiny.build("qwen2_5vl", attn_implementation="sdpa").train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    samples = [tiny.labelled(model_inputs.build("qwen2_5vl", kind, seed=i)) for i, kind in enumerate(("image", "text"))]
    losses = []

    class Loader:  # the recipe's loop, observed: each step's loss
        def __iter__(self):
            for _ in range(STEPS):
                if "out" in scope:
                    losses.append(float(scope["out"].loss_value))
                yield samples

    scope = {"model": model, "loader": Loader()}
    try:
        exec(compile(recipe(), str(README), "exec"), scope)  # noqa: S102 - the README's own code, as written
        losses.append(float(scope["out"].loss_value))
        pmodel = scope["pmodel"]
        after = {k.removeprefix("module."): p.full_tensor().detach() for k, p in pmodel.named_parameters()}
        moved = sum(not torch.equal(after[k].to(before[k].dtype), before[k]) for k in after)
        record = {"losses": losses, "moved": moved, "params": len(after), "scale": float(scope["scaler"].get_scale()),
                  "dtypes": sorted({str(p.dtype) for p in pmodel.parameters()}), "topology": scope["ranks"].topology}
        if rank == 0:
            torch.save(record, out)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_readme_recipe_trains_as_written(tmp_path):
    from portvlm.testing.distributed import load_result, spawn

    code = recipe()
    assert "GradScaler" in code and "parallelize(" in code and "init_ranks()" in code  # the block we mean
    out = str(tmp_path / "recipe.pt")
    spawn(_worker, 2, out, timeout_s=300, what="the README recipe", tcp=True)  # init_ranks() reads MASTER_PORT
    got = load_result(out, "the README recipe")
    assert len(got["losses"]) == STEPS and all(math.isfinite(x) for x in got["losses"]), got
    assert got["dtypes"] == ["torch.float32"], got  # fp32 master shards under the fp16 policy
    assert got["moved"] > 0, got  # the scaler took steps: parameters changed
    assert got["topology"].transport == "gloo" and got["topology"].world_size == 2, got
