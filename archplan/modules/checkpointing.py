"""Activation checkpointing of a model's blocks, one device or many: the single-device training
step (`bench --train`) and the pipeline stages of a layout (`distributed.shard`) checkpoint the
same way, so the two measure the same recompute. Plain torch.utils.checkpoint: nothing here needs
a process group, so `bench --train` runs without torch.distributed's engine. (`recompute.py` holds
something else: the pieces of the autograd units whose own backward recomputes.)"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import noop_context_fn

from archplan.errors import ArchplanError
from archplan.modules.attention import Attention
from archplan.modules.mla import MLA


def apply_recompute(layers: nn.ModuleList | nn.ModuleDict, recompute: str) -> None:
    """Activation checkpointing per layer, before FSDP as torchtitan applies it: full keeps each
    layer's input and re-runs the layer in the backward; selective re-runs only the attention core
    (Korthikanti et al. 2022 §5), a checkpoint of the one SDPA call (`attention.attention_core`).
    Its region holds no FSDP unit and no collective (context parallelism gathers K/V before it).
    Until 2026-12-02 it was torch's selective checkpointing of the whole mixer with a policy saving
    every op but the core: that saved every op's output, those plain autograd frees included, and
    kept more than no recompute at all (Llama 3 8B +31% a layer, Qwen3-30B-A3B +50%). A mixer
    without an attention core has nothing to re-run: selective recompute leaves it as it is, as
    the layout model prices it."""
    names = list(layers.keys()) if isinstance(layers, nn.ModuleDict) else range(len(layers))
    match recompute:
        case "none":
            return
        case "full":
            for name in names:
                layers[name] = checkpoint_wrapper(layers[name], context_fn=noop_context_fn, preserve_rng_state=False)
        case "selective":
            for name in names:
                mixer = layers[name].mixer
                if isinstance(mixer, Attention | MLA):
                    mixer.recompute_core = True
        case _:
            raise ArchplanError(f"recompute={recompute} is not none, selective or full")
