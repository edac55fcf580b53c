"""The one pair of gloo processes behind tests/test_distributed.py's equivalence tests: every
selected case of GLOO_CASES runs in turn in the same two ranks, one result file per case and rank.

conftest.py starts the pair in the background when the session begins (`start`), so no xdist
worker sits blocked in a fixture while it runs (the ranks compute most of the time: 21 cases
alone took 172 s wall and 257 s of CPU on the 2-core machine); the tests read the files once the
pair is done (`wait`). Run as a script: `python tests/gloo_pair.py
OUT CASE...`.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import sys
import time
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "distributed"


def variant(directory: Path, fixture: str, name: str, **fields: object) -> Path:
    """A copy of a fixture spec with top-level fields replaced, written under `directory`."""
    import yaml

    spec = yaml.safe_load((FIXTURES / fixture).read_text()) | {"name": name, **fields}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _qk(scope: str, kind: str, kv: int) -> dict[str, object]:
    attention = {"kind": "mqa" if kv == 1 else "gqa", "n_heads": 4,
                 "qk_norm": {"scope": scope, "norm": {"kind": kind}}}
    return {"attention": attention | ({"n_kv_heads": kv} if kv > 1 else {})}


# tensor-parallel edge cases, as variants of two fixtures: a vocabulary tp does not divide with
# absolute positions under SP (GPT-2 at tp=2), and qk-norm of every scope, with MQA's whole KV head
TP_EDGES: dict[str, tuple[str, dict[str, object]]] = {
    "odd-vocab-learned": ("tiny-gpt-odd-vocab.yaml", {}),
    "odd-vocab-sinusoidal": ("tiny-gpt-odd-vocab.yaml", {"position": {"kind": "sinusoidal"}}),
    "qk-full-rmsnorm": ("tiny-qk-norm.yaml", {}),
    "qk-head-rmsnorm": ("tiny-qk-norm.yaml", _qk("head", "rmsnorm", 2)),
    "qk-per-head-layernorm": ("tiny-qk-norm.yaml", _qk("per_head", "layernorm", 2)),
    "qk-full-layernorm-mqa": ("tiny-qk-norm.yaml", _qk("full", "layernorm", 1)),
    "qk-per-head-rmsnorm-mqa": ("tiny-qk-norm.yaml", _qk("per_head", "rmsnorm", 1)),
    # Qwen3's scope (one norm shared by the heads, applied token-major) with MQA's one KV head
    "qk-head-rmsnorm-mqa": ("tiny-qk-norm.yaml", _qk("head", "rmsnorm", 1)),
}
TP2 = "tp=2,cp=1,pp=1,dp=1,ep=1,zero=3,recompute=none,mb=2"
MAMBA2_ONE_GROUP = {"kind": "mamba2", "d_state": 16, "d_conv": 4, "expand": 2, "head_dim": 32, "n_groups": 1,
                    "chunk_size": 8}

TINY_MOE_PER_SEQUENCE = {"n_experts": 4, "top_k": 2, "expert": {"kind": "glu", "activation": "silu", "d_ff": 64},
                         "router": {"scoring": "softmax", "normalize_top_k": True}, "aux_loss_coef": 0.02,
                         "aux_loss_scope": "sequence"}

# Every gloo equivalence case: (check in archplan.distributed.parity, fixture, top-level fields
# replaced, layout). All of them run in ONE pair of processes: a pair per case paid two torch
# imports and a process group each, which on a loaded 2-core machine cost minutes.
GLOO_CASES: dict[str, tuple[str, str, dict[str, object], str]] = {
    "tp2": ("parity", "tiny-llama.yaml", {}, TP2),
    "fsdp2-full-recompute": ("parity", "tiny-llama.yaml", {}, "tp=1,cp=1,pp=1,dp=2,ep=1,zero=3,recompute=full,mb=2"),
    "zero1-selective": ("parity", "tiny-llama.yaml", {}, "tp=1,cp=1,pp=1,dp=2,ep=1,zero=1,recompute=selective,mb=2"),
    "zero0-replicate": ("parity", "tiny-llama.yaml", {}, "tp=1,cp=1,pp=1,dp=2,ep=1,zero=0,recompute=none,mb=2"),
    "ep2": ("parity", "tiny-moe.yaml", {}, "tp=1,cp=1,pp=1,dp=2,ep=2,zero=3,recompute=none,mb=2"),
    # the load-balancing loss over a micro-batch split by SP or CP: routed-pair counts summed over
    # the ranks, each rank's share of P (`modules.moe.TokenShards`)
    "tp2-moe": ("parity", "tiny-moe.yaml", {}, TP2),
    "cp2-moe": ("parity", "tiny-moe.yaml", {}, "tp=1,cp=2,pp=1,dp=1,ep=1,zero=3,recompute=none,mb=2"),
    # parallel folding: the EP group is the TP pair (dp = 1), each rank sending its sequence shard's
    # rows to the other's experts, or the CP pair, each rank its chunks' rows (the experts' gradient
    # averaged over dp·cp, as each cp rank's loss is its chunks'), full recompute re-running both
    "tp2-ep2-folded": ("parity", "tiny-moe.yaml", {}, "tp=2,cp=1,pp=1,dp=1,ep=2,zero=1,recompute=selective,mb=2"),
    "cp2-ep2-full-recompute": ("parity", "tiny-moe.yaml", {}, "tp=1,cp=2,pp=1,dp=1,ep=2,zero=3,recompute=full,mb=2"),
    # MLA with TP (k_pe's gradient summed over tp) and MoE under TP + SP (each rank routes its
    # sequence shard to whole experts, reduced over tp); full recompute re-runs both
    "tp2-mla-moe": ("parity", "tiny-mla-moe.yaml", {}, TP2),
    "tp2-mla-moe-full-recompute": ("parity", "tiny-mla-moe.yaml", {}, "tp=2,cp=1,pp=1,dp=1,ep=1,zero=2,recompute=full,mb=2"),
    # one KV head over both tp ranks (k and v split by rows, the output gathered), each rank's ALiBi
    # slopes, scaled with the scores as Falcon-RW's are (`RankAlibi` keeps the scale)
    "tp2-mqa-alibi": ("parity", "tiny-mqa-alibi.yaml", {"position": {"kind": "alibi", "scaled": True}}, TP2),
    # TP=2 with SP: the uneven vocabulary split (torch.chunk: 251 + 250 rows), each rank adding its
    # sequence shard's positions, qk-norm replicated, per head, or normalised across the ranks' heads
    **{f"tp2-{name}": ("parity", fixture, fields, TP2) for name, (fixture, fields) in TP_EDGES.items()},
    # Mamba-1 with Jamba's inner norms (x_proj's partial sums, B/C read by both ranks' channels),
    # Mamba-2 (heads and groups split), Hyena (replicated filter trunk) and StripedHyena, by channel
    "tp2-mamba1": ("parity", "tiny-mamba.yaml", {}, TP2),
    "tp2-hyena": ("parity", "tiny-hyena.yaml", {}, TP2),
    "tp2-mamba2-full-recompute": ("parity", "tiny-mamba2.yaml", {}, "tp=2,cp=1,pp=1,dp=1,ep=1,zero=3,recompute=full,mb=2"),
    "tp2-stripedhyena-no-sp": ("parity", "tiny-stripedhyena.yaml", {}, TP2 + ",sp=off"),
    # S4D: its input to channel shards by an all-to-all, one SSM copy replicated over tp
    "tp2-s4d": ("parity", "tiny-s4d.yaml", {}, TP2),
    # context parallelism: each rank holds chunks r and 3 − r of four (causal mask by position,
    # RoPE at the global positions), K/V all-gathered, their gradients reduce-scattered back;
    # with ALiBi the bias also comes from the global positions
    "cp2-full-recompute": ("parity", "tiny-llama.yaml", {}, "tp=1,cp=2,pp=1,dp=1,ep=1,zero=3,recompute=full,mb=2"),
    "cp2-mqa-alibi": ("parity", "tiny-mqa-alibi.yaml", {}, "tp=1,cp=2,pp=1,dp=1,ep=1,zero=1,recompute=none,mb=2"),
    # MLA: the latent [c_kv | k_pe] gathered (k_pe rotated at the keys' global positions), each
    # rank expanding every key; learned and sinusoidal positions added at the rank's positions
    "cp2-mla-full-recompute": ("parity", "tiny-mla.yaml", {}, "tp=1,cp=2,pp=1,dp=1,ep=1,zero=3,recompute=full,mb=2"),
    "cp2-learned": ("parity", "tiny-gpt-odd-vocab.yaml", {}, "tp=1,cp=2,pp=1,dp=1,ep=1,zero=1,recompute=none,mb=2"),
    "cp2-sinusoidal": ("parity", "tiny-gpt-odd-vocab.yaml", {"position": {"kind": "sinusoidal"}},
                       "tp=1,cp=2,pp=1,dp=1,ep=1,zero=0,recompute=selective,mb=2"),
    # long convolutions: the first convolution's input all-to-all'd to whole sequences of half
    # the channels, the per-channel weights sliced, the output all-to-all'd back to the rank's chunks
    "cp2-hyena-selective": ("parity", "tiny-hyena.yaml", {}, "tp=1,cp=2,pp=1,dp=1,ep=1,zero=3,recompute=selective,mb=2"),
    "cp2-stripedhyena-full-recompute": ("parity", "tiny-stripedhyena.yaml", {},
                                        "tp=1,cp=2,pp=1,dp=1,ep=1,zero=3,recompute=full,mb=2"),
    "cp2-s4d-selective": ("parity", "tiny-s4d.yaml", {}, "tp=1,cp=2,pp=1,dp=1,ep=1,zero=1,recompute=selective,mb=2"),
    # Mamba (Megatron-Core's MambaContextParallel): in_proj's output to whole sequences of half the
    # channels / heads, conv1d and scan there, the output back; Jamba-shaped Mamba-1 + attention with
    # x_proj's partial sums all-reduced over cp; Mamba-2 with a group per rank, and with its one
    # group's B and C repeated for both ranks (the gated norm after the exchange back)
    "cp2-mamba1-selective": ("parity", "tiny-mamba.yaml", {}, "tp=1,cp=2,pp=1,dp=1,ep=1,zero=3,recompute=selective,mb=2"),
    "cp2-mamba2-full-recompute": ("parity", "tiny-mamba2.yaml", {}, "tp=1,cp=2,pp=1,dp=1,ep=1,zero=3,recompute=full,mb=2"),
    "cp2-mamba2-one-group": ("parity", "tiny-mamba2.yaml", {"ssm": MAMBA2_ONE_GROUP},
                             "tp=1,cp=2,pp=1,dp=1,ep=1,zero=1,recompute=none,mb=2"),
    # PP=2 with tied embeddings: after one AdamW step both stages' weights, the last stage's copy of
    # the embedding included, equal the one-process model's (the copies' gradients summed)
    "tied-pp2-zero0": ("pipeline_parity", "tiny-gpt.yaml", {}, "tp=1,cp=1,pp=2,dp=1,ep=1,zero=0,recompute=none,mb=1"),
    "tied-pp2-zero3": ("pipeline_parity", "tiny-gpt.yaml", {}, "tp=1,cp=1,pp=2,dp=1,ep=1,zero=3,recompute=none,mb=1"),
    # interleaved (vpp = 2): two model chunks per rank, the tied copy on rank 1's second chunk
    "tied-pp2-vpp2": ("pipeline_parity", "tiny-gpt.yaml", {}, "tp=1,cp=1,pp=2,vpp=2,dp=1,ep=1,zero=3,recompute=none,mb=1"),
    # multi-token prediction: the MTP module on the last stage, its loss DeepSeek-V3's combined one,
    # the embedding copy it reads synced with the first stage's; and over dp = 2 with FSDP2 units
    # holding the module's input parts, fully recomputed
    # the MTP module under TP2 + SP: its norms on sequence shards, the projection column-parallel
    # over its gathered 2·d input, the output gathered over the last dim, its MLA + MoE block
    "tp2-mtp": ("parity", "tiny-mtp.yaml", {}, TP2),
    # under CP: each rank's chunks read the tokens ahead of their global positions, its loss the
    # sum over its targets scaled to the whole sequences' mean (the targetless tail is one rank's)
    "cp2-mtp-full-recompute": ("parity", "tiny-mtp.yaml", {}, "tp=1,cp=2,pp=1,dp=1,ep=1,zero=3,recompute=full,mb=2"),
    "mtp-pp2": ("pipeline_parity", "tiny-mtp.yaml", {}, "tp=1,cp=1,pp=2,dp=1,ep=1,zero=0,recompute=selective,mb=1"),
    "mtp-dp2-full-recompute": ("pipeline_parity", "tiny-mtp.yaml", {},
                               "tp=1,cp=1,pp=1,dp=2,ep=1,zero=3,recompute=full,mb=1"),
    # Gemma's embedding × sqrt(d_model) and a query scalar other than head_dim: the scale in the
    # context-parallel attention; the first stage's embedding and, with a norm eps large enough to
    # show an unscaled input through the MTP module's norm, the last stage's embedding for it
    "cp2-scaled-embedding-scale-dim": ("parity", "tiny-llama.yaml", {
        "embedding": {"scaled": True}, "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2, "scale_dim": 3}},
        "tp=1,cp=2,pp=1,dp=1,ep=1,zero=1,recompute=none,mb=2"),
    "mtp-pp2-scaled-embedding": ("pipeline_parity", "tiny-mtp.yaml", {
        "embedding": {"scaled": True}, "norm": {"kind": "rmsnorm", "eps": 0.01}},
        "tp=1,cp=1,pp=2,dp=1,ep=1,zero=0,recompute=selective,mb=1"),
    # two micro-batches a rank, each rank its own data: the step's gradient is the whole batch's,
    # the load-balancing loss (per sequence) counting 1/m a micro-batch as the cross-entropy does
    "ep2-two-microbatches": ("accumulation_parity", "tiny-moe.yaml", {"moe": TINY_MOE_PER_SEQUENCE},
                             "tp=1,cp=1,pp=1,dp=2,ep=2,zero=2,recompute=none,mb=1"),
}

# CI budget: the default run keeps one case per sharded code path (S4D's exchange beside Hyena's,
# learned positions and ALiBi at their global offsets under CP among them); these variants of a
# path run with `-m heavy` (about 8 s of the pair's wall time each, 12 s of CPU, on the 2-core
# machine alone)
HEAVY_CASES = {"tp2-mla-moe", "cp2-moe", "tp2-odd-vocab-sinusoidal", "tp2-qk-head-rmsnorm", "tp2-qk-per-head-layernorm",
               "tp2-qk-full-layernorm-mqa", "cp2-sinusoidal", "cp2-stripedhyena-full-recompute",
               "cp2-mamba2-full-recompute", "tied-pp2-zero0", "tied-pp2-zero3"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, cases: list[str]) -> None:
    """One of the two gloo ranks running `cases` in turn, one result file per case."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from archplan.distributed import parity
    from archplan.distributed.mesh import forget_meshes
    from archplan.loader import load_spec
    from archplan.planning.layout import parse_layout
    from archplan.resolve import resolve

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=timedelta(minutes=5))
    try:
        for case in cases:
            check, fixture, fields, layout_text = GLOO_CASES[case]
            spec = variant(Path(out), fixture, f"{case}-{rank}", **fields) if fields else FIXTURES / fixture
            forget_meshes()  # each case builds its own meshes over the one world
            try:
                result = getattr(parity, check)(resolve(load_spec(spec)), parse_layout(layout_text).complete())
            except Exception as exc:
                raise RuntimeError(f"gloo case {case}") from exc
            Path(out, f"{case}-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def start(out: Path, cases: list[str]) -> subprocess.Popen[bytes]:
    """The pair as a background process writing into `out` (its log `out/log`)."""
    with (out / "log").open("wb") as log:
        return subprocess.Popen([sys.executable, __file__, str(out), *cases], stdout=log, stderr=subprocess.STDOUT)


def wait(out: Path, timeout_s: float = 3600) -> Path:
    """`out` once the pair has finished; its log's end as the error if it failed."""
    deadline = time.monotonic() + timeout_s
    while not (out / "exit").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gloo pair did not finish in {timeout_s:.0f} s; log: {out / 'log'}")
        time.sleep(0.5)
    if (out / "exit").read_text() != "0":
        raise RuntimeError("the gloo pair failed:\n" + (out / "log").read_text()[-4000:])
    return out


def main(out: str, cases: list[str]) -> int:
    """Both ranks to completion (a rank's traceback goes to the log); 0 when both succeeded.
    This process never imports torch: only the ranks pay for it."""
    port = _free_port()
    spawn = multiprocessing.get_context("spawn")
    ranks = [spawn.Process(target=_worker, args=(rank, port, out, cases)) for rank in range(2)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    code = max(abs(rank.exitcode or 0) for rank in ranks)
    # written whole, then renamed: `wait` polls for the file and must never read it half-written
    Path(out, "exit.partial").write_text(str(code))
    Path(out, "exit.partial").replace(Path(out, "exit"))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
