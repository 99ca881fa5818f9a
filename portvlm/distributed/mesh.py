"""The ``(dp, sp)`` device mesh: which ranks share a row (sequence parallel) and which hold different rows (data
parallel), and the flattened mesh FSDP2 shards over (every rank holds the same parameters, so all of them shard)."""

from __future__ import annotations

from dataclasses import dataclass

DIM_NAMES = ("dp", "sp")


def make_mesh(dp: int, sp: int, device_type: str):
    """``init_device_mesh(device_type, (dp, sp), mesh_dim_names=("dp", "sp"))``: rows over dp, one row over sp."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dp, sp), mesh_dim_names=DIM_NAMES)


@dataclass(frozen=True)
class Layout:
    """Sizes, this rank's coordinates and process groups of a ``(dp, sp)`` mesh (``None`` group: size 1)."""

    dp: int
    sp: int
    dp_rank: int
    sp_rank: int
    dp_group: object | None
    sp_group: object | None
    fsdp_mesh: object

    @property
    def world(self) -> int:
        return self.dp * self.sp

    @classmethod
    def single(cls) -> Layout:
        """One process, no FSDP, no process group: the reference a sharded run is compared to."""
        return cls(dp=1, sp=1, dp_rank=0, sp_rank=0, dp_group=None, sp_group=None, fsdp_mesh=None)


def mesh_reasons(mesh) -> list[str]:
    """Why ``mesh`` is not a ``(dp, sp)`` mesh portvlm can use (empty: it is)."""
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if not names:
        return ["the DeviceMesh has no mesh_dim_names; build it with mesh_dim_names=('dp', 'sp') "
                "(portvlm.distributed.make_mesh)"]
    unknown = [n for n in names if n not in DIM_NAMES]
    if unknown:
        return [f"mesh dims {names}: {unknown} unknown; portvlm parallelizes over 'dp' (rows) and 'sp' (one row)"]
    return []


def layout_of(mesh) -> Layout:
    """Read a 1-D ``("dp",)`` / ``("sp",)`` or 2-D ``("dp", "sp")`` mesh."""
    from portvlm.errors import UnsupportedError

    reasons = mesh_reasons(mesh)
    if reasons:
        raise UnsupportedError("; ".join(reasons))
    names = tuple(mesh.mesh_dim_names)

    def part(name):
        if name not in names:
            return 1, 0, None
        sub = mesh[name]
        return sub.size(), sub.get_local_rank(), sub.get_group() if sub.size() > 1 else None

    dp, dp_rank, dp_group = part("dp")
    sp, sp_rank, sp_group = part("sp")
    flat = mesh
    if len(names) > 1:
        # FSDP2 wants a 1-D mesh (2-D means HSDP); all dp×sp ranks hold the same parameters, so shard over all.
        flat = mesh._flatten("dp_sp") if hasattr(mesh, "_flatten") else None
        if flat is None:
            raise UnsupportedError("this torch's DeviceMesh has no _flatten (torch >= 2.5); pass a 1-D mesh")
    return Layout(dp, sp, dp_rank, sp_rank, dp_group, sp_group, flat)
