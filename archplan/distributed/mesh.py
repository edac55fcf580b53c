"""The process group and the DeviceMesh of a `Layout`.

Mesh dimensions, slowest first: ("pp", "expert_dp", "ep", "cp", "tp"), with ("expert_dp", "ep",
"cp") flattened into "dp". This is Megatron-LM's rank order (`order="tp-cp-ep-dp-pp"`,
docs of `planning.layout`): a TP group is tp consecutive ranks, the context-parallel ranks of a
sequence come next, then the ep ranks sharing experts, and the data-parallel group of dense
weights is dp × cp (context-parallel ranks hold the same weights; Megatron reduces gradients over
the data × context group). Every dimension is kept even at size 1, so the plans never branch on
which ones exist. Here ep divides dp (expert_dp = dp / ep); the layout model allows ep | dp·cp.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from archplan.errors import ArchplanError
from archplan.planning.layout import Layout
from archplan.planning.records import MeshDim

MESH_DIMS: tuple[MeshDim, ...] = ("pp", "expert_dp", "ep", "cp", "tp")


def init_fake_world(world: int, rank: int) -> None:
    """One process acting as `rank` of `world` (torch's fake backend: collectives do nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    forget_meshes()
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())


def forget_meshes() -> None:
    """Drop DTensor's sharding caches before a new world (or a new set of meshes in one world, as
    the gloo tests build case after case). A DeviceMesh compares equal to an earlier
    world's mesh of the same shape and names (`DeviceMesh.__eq__` ignores its process groups), so a
    cached output spec would hand the new world the old mesh, whose groups no longer exist ("Could
    not resolve the process group"). The caches live in C++ (the dispatch fast path) and in
    functools caches across `torch.distributed.tensor`."""
    torch._C._clear_DTensor_sharding_propagator_cache()
    for obj in gc.get_objects():
        if isinstance(obj, functools._lru_cache_wrapper) and \
                getattr(obj, "__module__", "").startswith("torch.distributed.tensor"):
            obj.cache_clear()


def stage_rank(layout: Layout, stage: int) -> int:
    """The first global rank of pipeline stage `stage` (pp is the slowest mesh dimension)."""
    return stage * layout.dp * layout.cp * layout.tp


@dataclass(frozen=True)
class LayoutMesh:
    layout: Layout
    root: DeviceMesh  # (pp, expert_dp, ep, cp, tp)
    dp: DeviceMesh  # expert_dp × ep × cp flattened: the dense weights' data(-context)-parallel group
    # the ranks holding the same experts: expert_dp × cp, × tp when tp > 1 (experts are whole on
    # every tp rank, expert tensor parallelism 1, and each tp rank feeds them its own tokens)
    experts: DeviceMesh

    def __getitem__(self, dim: MeshDim) -> DeviceMesh:
        return self.dp if dim in ("dp", "dp_cp") else self.root[dim]

    @property
    def dp_name(self) -> MeshDim:
        """The dense weights' reduction group as `planning.cluster` names it."""
        return "dp_cp" if self.layout.cp > 1 else "dp"

    @property
    def data_rank(self) -> int:
        """Which data-parallel replica this rank is (its cp ranks share the sequences)."""
        return self.dp.get_local_rank() // self.layout.cp

    def _groups(self) -> list[tuple[MeshDim, DeviceMesh]]:
        return [*((dim, self[dim]) for dim in MESH_DIMS), (self.dp_name, self.dp), ("expert_dp", self.experts)]

    @property
    def dims_by_group(self) -> dict[str, tuple[MeshDim, ...]]:
        """Process-group name → the mesh dimensions over it (ep and dp share one when expert_dp = 1)."""
        names: dict[str, tuple[MeshDim, ...]] = {}
        for dim, mesh in self._groups():
            if mesh.size() > 1:
                name = mesh.get_group().group_name
                if dim not in names.get(name, ()):
                    names[name] = (*names.get(name, ()), dim)
        return names

    @property
    def group_sizes(self) -> dict[str, int]:
        return {mesh.get_group().group_name: mesh.size() for _, mesh in self._groups() if mesh.size() > 1}

    @property
    def stage(self) -> int:
        return self.root.get_coordinate()[0]


def build_mesh(layout: Layout, device_type: str) -> LayoutMesh:
    """The DeviceMesh of `layout` over the initialised default process group."""
    if dist.get_world_size() != layout.world:
        raise ArchplanError(f"--layout needs {layout.world} ranks, the process group has {dist.get_world_size()}")
    if layout.dp % layout.ep:
        raise ArchplanError(f"--layout: ep={layout.ep} must divide dp={layout.dp} on torch.distributed "
                            "(the expert mesh takes its ep ranks from the data-parallel ranks)")
    root = init_device_mesh(device_type, (layout.pp, layout.dp // layout.ep, layout.ep, layout.cp, layout.tp),
                            mesh_dim_names=MESH_DIMS)
    cp = ("cp",) if layout.cp > 1 else ()
    replicas = ("expert_dp", *cp, *(("tp",) if layout.tp > 1 else ()))
    experts = root[replicas]._flatten("expert_dp_tp") if len(replicas) > 1 else root["expert_dp"]
    return LayoutMesh(layout, root, root["expert_dp", "ep", *cp]._flatten("dp"), experts)
