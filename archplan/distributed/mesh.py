"""The process group and the DeviceMeshes of a `Layout`.

Two meshes over the same ranks, as Megatron-Core's "parallel folding" (Liu et al. 2025) and
torchtitan's ETP = 1 meshes build them:
- the dense mesh, slowest first ("pp", "dp", "cp", "tp"): Megatron-LM's rank order
  (`order="tp-cp-ep-dp-pp"`, docs of `planning.layout`), a TP group tp consecutive ranks, the
  context-parallel ranks of a sequence next, then the data-parallel replicas; the dense weights'
  data-parallel group is dp × cp (context-parallel ranks hold the same weights; Megatron reduces
  gradients over the data × context group);
- the expert mesh ("expert_dp", "ep") over the rank's pipeline stage: the stage's tp·cp·dp ranks,
  in the same order, regrouped as expert_dp replicas of ep consecutive ranks (Megatron-Core's
  expert rank generator with expert tensor parallelism 1), so an EP group may span tp, cp and dp
  ranks alike. torch builds it with `DeviceMesh._unflatten` (private, as torchtitan uses it), from
  the stage's ranks flattened.
Every dimension is kept even at size 1, so the plans never branch on which ones exist.
"""

from __future__ import annotations

import functools
import gc
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

try:  # private: the layout types `DeviceMesh._init_one_process_group` takes (torch >= 2.13)
    from torch.distributed._mesh_layout import _FlatLayout, _MeshLayout
except ImportError:
    _FlatLayout = _MeshLayout = None  # type: ignore[assignment,misc]

from archplan.errors import ArchplanError
from archplan.planning.layout import Layout
from archplan.planning.records import MeshDim

MESH_DIMS: tuple[MeshDim, ...] = ("pp", "dp", "cp", "tp")
EXPERT_DIMS: tuple[MeshDim, ...] = ("expert_dp", "ep")


# What the fake process group and the meshes hold per rank of the world: the rank lists of every
# group and mesh dimension. verify --layout on a 2-layer toy at dp 10^6 and 3·10^6 peaked at
# 0.75 and 1.64 GiB (VmHWM): 478 B a rank.
FAKE_WORLD_BYTES_PER_RANK = 512


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def init_fake_world(world: int, rank: int) -> None:
    """One process acting as `rank` of `world` (torch's fake backend: collectives do nothing).
    A world whose rank lists alone exceed the host's available memory is refused in one line,
    before the system kills the process or Python raises MemoryError mid-build."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    available = available_host_bytes()
    if available is not None and world * FAKE_WORLD_BYTES_PER_RANK > available:
        from archplan.units import nbytes

        raise ArchplanError(f"a world of {world:,} ranks: torch's fake process group and meshes hold about "
                            f"{nbytes(world * FAKE_WORLD_BYTES_PER_RANK)} of rank lists, more than the "
                            f"{nbytes(available)} this machine has available; give smaller degrees")
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
        # `type`, not `isinstance`: isinstance reads `__class__`, which warns on deprecated
        # objects such as `torch.distributed.reduce_op` (a FutureWarning in every verify run)
        if type(obj) is functools._lru_cache_wrapper and \
                getattr(obj, "__module__", "").startswith("torch.distributed.tensor"):
            obj.cache_clear()


def stage_rank(layout: Layout, stage: int) -> int:
    """The first global rank of pipeline stage `stage` (pp is the slowest mesh dimension)."""
    return stage * layout.stage_ranks


@dataclass(frozen=True)
class LayoutMesh:
    layout: Layout
    root: DeviceMesh  # (pp, dp, cp, tp)
    dp: DeviceMesh  # dp × cp flattened: the dense weights' data(-context)-parallel group
    folded: DeviceMesh  # (expert_dp, ep) over the stage's ranks: the expert mesh

    def __getitem__(self, dim: MeshDim) -> DeviceMesh:
        if dim in ("dp", "dp_cp"):
            return self.dp
        return self.folded[dim] if dim in EXPERT_DIMS else self.root[dim]

    @property
    def experts(self) -> DeviceMesh:
        """The ranks holding the same experts, over which their gradients reduce (expert_dp)."""
        return self.folded["expert_dp"]

    @property
    def dp_name(self) -> MeshDim:
        """The dense weights' reduction group as `planning.cluster` names it."""
        return "dp_cp" if self.layout.cp > 1 else "dp"

    @property
    def data_rank(self) -> int:
        """Which data-parallel replica this rank is (its cp ranks share the sequences)."""
        return self.dp.get_local_rank() // self.layout.cp

    def _groups(self) -> list[tuple[MeshDim, DeviceMesh]]:
        named = (dim for dim in (*MESH_DIMS, *EXPERT_DIMS) if dim != "dp")
        return [*((dim, self[dim]) for dim in named), (self.dp_name, self.dp)]

    @property
    def dims_by_group(self) -> dict[str, tuple[MeshDim, ...]]:
        """Process-group name → the mesh dimensions over it (dimensions over the same ranks may share one)."""
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


def _private_group_api_matches(init_one: object) -> bool:
    """Whether torch's private group factory is the one `_member_groups_only` replaces (torch 2.13's
    layout types and arguments). Another torch keeps its own: every group is created, which is
    slower at thousands of fake ranks and creates the same groups."""
    names = ["sub_layout", "rank_map", "dim_name", "backend_override"]
    return _MeshLayout is not None and list(inspect.signature(init_one).parameters) == names  # type: ignore[arg-type]


@contextmanager
def _member_groups_only() -> Iterator[None]:
    """On the fake backend, DeviceMesh creates only the process groups holding this rank.
    `DeviceMesh._init_one_process_group` (torch/distributed/device_mesh.py) calls `new_group` for
    every group of a mesh dimension, as real backends need (every rank takes part in creating
    every group), and keeps the one holding the rank; for the others `new_group` returns
    `GroupMember.NON_GROUP_MEMBER` and registers nothing. The fake backend synchronises
    nothing, so the other calls do nothing but cost: 36,113 groups for the 16,384-rank
    llama-3.1-405b layout (2.3 s CPU). The group kept is the same (ranks, description);
    its name is the next of torch's sequential names, fewer of them having been drawn."""
    original = DeviceMesh._init_one_process_group
    if dist.get_backend() != "fake" or not _private_group_api_matches(original):
        yield
        return

    def member_only(sub_layout: _FlatLayout, rank_map: torch.Tensor, dim_name: str,
                    backend_override: tuple[object, object]) -> str | None:
        if backend_override != (None, None) or sub_layout.numel() == dist.get_world_size():
            return original(sub_layout, rank_map, dim_name, backend_override)  # torch's special cases
        groups = _MeshLayout([sub_layout]).remap_to_tensor(rank_map)
        row = (groups == dist.get_rank()).any(dim=1).nonzero()
        if len(row) == 0:
            return None  # as torch's: this rank is in no group of the dimension
        group = dist.new_group(ranks=groups[int(row[0, 0])].tolist(), group_desc=f"mesh_{dim_name}")
        return group.group_name  # type: ignore[union-attr]

    DeviceMesh._init_one_process_group = staticmethod(member_only)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        DeviceMesh._init_one_process_group = staticmethod(original)  # type: ignore[method-assign,assignment]


def build_mesh(layout: Layout, device_type: str) -> LayoutMesh:
    """The DeviceMeshes of `layout` over the initialised default process group."""
    if dist.get_world_size() != layout.world:
        raise ArchplanError(f"--layout needs {layout.world} ranks, the process group has {dist.get_world_size()}")
    with _member_groups_only():
        root = init_device_mesh(device_type, (layout.pp, layout.dp, layout.cp, layout.tp), mesh_dim_names=MESH_DIMS)
        dp = root[("dp", "cp")]._flatten("dp_cp") if layout.cp > 1 else root["dp"]
        stage = root[("dp", "cp", "tp")]._flatten("stage")
        folded = stage._unflatten(0, (layout.expert_dp, layout.ep), EXPERT_DIMS)
    return LayoutMesh(layout, root, dp, folded)
