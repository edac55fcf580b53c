"""`mesh._member_groups_only`: on the fake backend the DeviceMesh of a layout gets the same process
groups for the measured rank (ranks of every mesh dimension and of the flattened dp and expert
meshes) when only the groups holding that rank are created, as when torch creates all of them."""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from archplan.distributed import mesh as mesh_mod  # noqa: E402
from archplan.planning.layout import parse_layout  # noqa: E402


@pytest.fixture()
def fake_world():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _groups(layout_text: str, rank: int) -> tuple[dict[str, list[int]], int]:
    layout = parse_layout(layout_text).complete()
    assert layout is not None
    mesh_mod.init_fake_world(layout.world, rank)
    before = dist.distributed_c10d._world.group_count
    built = mesh_mod.build_mesh(layout, "cpu")
    ranks = {dim: dist.get_process_group_ranks(built[dim].get_group()) for dim in (*mesh_mod.MESH_DIMS, *mesh_mod.EXPERT_DIMS)}
    ranks["dp"] = dist.get_process_group_ranks(built.dp.get_group())
    ranks["experts"] = dist.get_process_group_ranks(built.experts.get_group())
    return ranks, dist.distributed_c10d._world.group_count - before


@pytest.mark.parametrize(("layout", "rank"), [
    ("tp=2,cp=2,pp=2,dp=4,ep=2,zero=3,recompute=none,mb=1", 21),
    ("tp=2,cp=1,pp=3,dp=4,ep=1,zero=1,recompute=none,mb=1", 13),
])
def test_member_groups_are_torchs(fake_world: None, monkeypatch: pytest.MonkeyPatch, layout: str, rank: int) -> None:
    ours, created = _groups(layout, rank)
    with monkeypatch.context() as patch:
        patch.setattr(mesh_mod, "_member_groups_only", contextlib.nullcontext)
        torchs, all_created = _groups(layout, rank)
    assert ours == torchs
    assert created < all_created  # the groups not holding the rank were not made


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_a_given_round_size_is_refused_where_torch_sets_its_own(command: str) -> None:
    """torch's ScheduleInterleaved1F1B has no round size to set: verify and bench ran their own
    rounds while their analytic side priced the given group=N (a ✗ at group=4)."""
    from archplan.distributed.render import given_layout
    from archplan.errors import ArchplanError
    from archplan.loader import load_spec
    from archplan.resolve import resolve

    plan = resolve(load_spec("llama-3-8b"))
    with pytest.raises(ArchplanError, match=r"group=4: .* ScheduleInterleaved1F1B"):
        given_layout(plan, "tp=1,cp=1,pp=2,vpp=2,group=4,dp=1,ep=1,zero=1,recompute=none,mb=1", 64, command)
    assert given_layout(plan, "tp=1,cp=1,pp=2,vpp=2,dp=1,ep=1,zero=1,recompute=none,mb=1", 64, command).vpp == 2
