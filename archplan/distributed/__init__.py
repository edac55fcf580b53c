"""The torch interpreter of a cluster `Layout` (torch only; imported by `verify --layout` and
`bench --nproc`, never by the torch-free commands).

- `mesh`: the process group (fake for verify, gloo / NCCL for bench) and the DeviceMesh of a layout;
- `plans`: tensor / sequence / expert parallel plans as data beside each module kind;
- `stage`: one pipeline stage of an `ArchplanModel` (its layers, plus embedding / head at the ends);
- `shard`: applies the plans and FSDP2 (`fully_shard`) for the layout's ZeRO stage;
- `expert`: the expert-parallel all-to-all around a rank's local experts;
- `comms`: a dispatch mode recording every collective (kind, mesh dimension, bytes);
- `step`: one training step of a stage under the 1F1B schedule's in-flight micro-batches;
- `fake`: `verify --layout`: the step at full world size on the fake process group, measured;
- `workers`, `bench`: `bench --layout [--nproc N]`: real processes through torchrun.
- `parity`: the equivalence check of the 2-process gloo tests.
- `check`, `render`: verify --layout beside `planning.cluster`.
"""
