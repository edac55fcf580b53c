"""The torch interpreter of a cluster `Layout` (torch only; imported by `verify --layout` and
`bench --layout / --train`, never by the torch-free commands).

- `mesh`: the fake process group and the DeviceMesh of a layout;
- `plans`: tensor / sequence parallel plans as data beside each module kind, and the refusals;
- `stage`: one pipeline stage built from archplan's modules (its layers, plus the ends);
- `shard`: TP, expert parallelism, recompute and FSDP2 (`fully_shard`) for the layout's ZeRO stage;
- `expert`: the expert-parallel all-to-all around a rank's local experts;
- `comms`: a dispatch mode recording every collective (kind, mesh dimension, bytes);
- `step`: one training step of a stage in 1F1B order, AdamW;
- `fake`, `check`, `render`: `verify --layout`: the step at full world size on the fake process
  group, measured, beside `planning.cluster`;
- `workers`, `bench`: `bench --layout [--nproc N]`: real processes through torchrun;
- `train`, `train_render`: `bench --train`: one device, beside `size`'s training memory;
- `parity`: the equivalence check of the 2-process gloo tests.
"""
