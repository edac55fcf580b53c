"""Multi-token prediction in the torch model (DeepSeek-V3 §2.2, arXiv:2412.19437): parameter names
and counts under `mtp.{k}`, inference untouched, each depth's causality and its equations on
truncated sequences, the training loss of eq. 25 and its gradients, meta builds."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from archplan.errors import ArchplanError
from archplan.loader import load_spec
from archplan.modules.attention import Attention
from archplan.modules.block import Block
from archplan.modules.mla import MLA
from archplan.modules.model import ArchplanModel, build_model
from archplan.modules.moe import MoEFFN
from archplan.modules.mtp import MTPLayer
from archplan.modules.norms import build_norm
from archplan.resolve import resolve
from archplan.spec import MultiTokenPrediction, Spec

V, D, T = 50, 32, 10


def tiny(depth: int | None = None, loss_weight: float = 0.3, **overrides: Any) -> Spec:
    base: dict[str, Any] = dict(
        name="tiny", vocab_size=V, d_model=D, n_layers=2, max_seq_len=64,
        attention=dict(kind="gqa", n_heads=4, n_kv_heads=2), ffn=dict(kind="glu", d_ff=48),
    )
    base.update(overrides)
    if depth is not None:
        base["mtp"] = dict(depth=depth, loss_weight=loss_weight)
    return Spec.model_validate(base)


# DeepSeek-V3 in miniature: MLA, first layer dense, then sigmoid-scored experts with the
# score-correction bias, a shared expert and a per-sequence balance loss; its MTP blocks are MoE
DEEPSEEK = dict(
    attention=dict(kind="mla", n_heads=4, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6,
                   qk_rope_head_dim=4, v_head_dim=5),
    moe=dict(n_experts=4, top_k=2, expert=dict(kind="glu", d_ff=16), shared=dict(n=1, d_ff=16),
             router=dict(scoring="sigmoid", score_correction_bias=True, scale=2.5),
             aux_loss_coef=0.01, aux_loss_scope="sequence"),
    layout=dict(first_dense=1),
)
VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},
    "tied": dict(embedding=dict(tied=True, lm_head_bias=True)),
    "learned_embed_norm": dict(position=dict(kind="learned"), embedding=dict(norm=True),
                               norm=dict(kind="layernorm")),
    "alibi_no_final_norm": dict(position=dict(kind="alibi"), final_norm=False),
    "deepseek": DEEPSEEK,
}


def built(spec: Spec, seed: int = 0) -> ArchplanModel:
    torch.manual_seed(seed)
    return build_model(spec, device="cpu")


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameters_sit_under_the_module_paths(variant: str) -> None:
    """mtp.{k}: enorm, hnorm, proj (2·D → D, no bias), final_norm where the model has one, and the
    block named as a main layer's; the rest of the model is what the spec without MTP builds."""
    spec = tiny(2, **VARIANTS[variant])
    plan = resolve(spec)
    model = build_model(spec)
    plain = build_model(tiny(None, **VARIANTS[variant]))
    with_mtp = [(n, p.shape) for n, p in model.named_parameters()]
    assert [(n, p.shape) for n, p in plain.named_parameters()] == [x for x in with_mtp if not x[0].startswith("mtp.")]
    assert [n for n, _ in plain.named_buffers()] == [n for n, _ in model.named_buffers() if not n.startswith("mtp.")]
    names = dict(model.named_parameters())
    norm = numel(build_norm(plan.norm, D))
    for k, layer in enumerate(plan.mtp):
        assert layer.path == f"mtp.{k}"
        with torch.device("meta"):
            block = Block(layer, plan)  # the block alone, as the main model would build this layer
        own = {n.removeprefix(f"mtp.{k}."): p for n, p in names.items() if n.startswith(f"mtp.{k}.")}
        extra = {"enorm", "hnorm", "proj"} | ({"final_norm"} if plan.final_norm else set())
        assert {n for n in own if n.split(".")[0] not in extra} == {n for n, _ in block.named_parameters()}
        assert own["proj.weight"].shape == (D, 2 * D) and "proj.bias" not in own
        expected = 2 * norm + 2 * D * D + numel(block) + (norm if plan.final_norm else 0)
        assert sum(p.numel() for p in own.values()) == expected
    assert len(model.mtp) == 2 and len(plain.mtp) == 0


def test_moe_blocks_join_the_model_as_its_layers_do() -> None:
    """The MTP block is the layer the pattern gives next (here MoE): its router keeps the fp32
    score-correction buffer in a bf16 model; on ALiBi the MTP attention shares the layers' biases."""
    model = build_model(tiny(2, **DEEPSEEK))
    for module in model.mtp:
        assert isinstance(module.mixer, MLA) and isinstance(module.ffn, MoEFFN)
        bias = module.ffn.router.score_correction_bias
        assert bias is not None and bias.dtype == torch.float32
    assert "mtp.1.ffn.router.score_correction_bias" in dict(model.named_buffers())
    alibi = build_model(tiny(2, position=dict(kind="alibi")))
    attention = [m for m in alibi.modules() if isinstance(m, Attention)]
    assert len(attention) == 4 and all(m.biases is attention[0].biases for m in attention)


def test_deepnorm_scales_the_mtp_blocks_as_it_scales_the_layers() -> None:
    """DeepNet's β on the value/output projections (Wang et al. 2022, Algorithm 1), MTP blocks too."""
    pre = built(tiny(1), seed=3)
    deep = built(tiny(1, residual=dict(kind="deepnorm")), seed=3)
    beta = (8 * 2) ** -0.25
    a, b = pre.mtp[0].mixer, deep.mtp[0].mixer
    assert isinstance(a, Attention) and isinstance(b, Attention)
    torch.testing.assert_close(b.v_proj.weight, beta * a.v_proj.weight)
    torch.testing.assert_close(b.q_proj.weight, a.q_proj.weight)
    torch.testing.assert_close(deep.mtp[0].proj.weight, pre.mtp[0].proj.weight)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_inference_is_untouched(variant: str) -> None:
    """The same seed draws the same main weights with or without MTP (the modules are built last);
    `forward`, with or without a cache, never runs them and gives the plain model's logits."""
    model = built(tiny(2, **VARIANTS[variant]), seed=1)
    plain = built(tiny(None, **VARIANTS[variant]), seed=1)
    shared = {n: p for n, p in model.state_dict().items() if not n.startswith("mtp.")}
    assert all(torch.equal(p, plain.state_dict()[n]) for n, p in shared.items())
    plain = built(tiny(None, **VARIANTS[variant]), seed=2)  # other weights, then the MTP model's loaded
    plain.load_state_dict(shared, strict=True)

    def refuse(*_: object) -> None:
        raise AssertionError("an MTP module ran at inference")

    for module in model.mtp:
        module.register_forward_pre_hook(refuse)
    model.eval(), plain.eval()
    tokens = torch.randint(0, V, (2, T))
    with torch.no_grad():
        assert torch.equal(model(tokens), plain(tokens))
        cache, plain_cache = model.new_cache(2, T), plain.new_cache(2, T)
        for step in (tokens[:, :6], tokens[:, 6:7], tokens[:, 7:]):
            assert torch.equal(model(step, cache), plain(step, plain_cache))


@pytest.mark.parametrize("variant", ["gqa", "learned_embed_norm", "deepseek"])
def test_each_depth_is_causal(variant: str) -> None:
    """Depth k at position i reads tokens 0 … i + k + 1 only: a token j changes no position before
    j − k − 1 and does change position j − k − 1 (the main logits: before j, and j)."""
    model = built(tiny(2, **VARIANTS[variant])).eval()
    tokens = torch.randint(0, V, (2, T))
    with torch.no_grad():
        main, depths = model.mtp_logits(tokens)
        for j in range(T):
            changed = tokens.clone()
            changed[:, j] = (changed[:, j] + 1) % V
            main2, depths2 = model.mtp_logits(changed)
            for ahead, (a, b) in enumerate([(main, main2), *zip(depths, depths2)]):
                first = j - ahead  # the first position that reads token j
                torch.testing.assert_close(a[:, :max(first, 0)], b[:, :max(first, 0)], rtol=0, atol=1e-5)
                if first >= 0:
                    assert not torch.allclose(a[:, first], b[:, first], atol=1e-4)


@pytest.mark.parametrize("variant", ["gqa", "learned_embed_norm", "alibi_no_final_norm", "deepseek"])
def test_depths_follow_the_report_on_truncated_sequences(variant: str) -> None:
    """Eq. 21-23 without the roll: depth k on positions 0 … T − k − 2 is
    head(final_norm(TRM(proj([enorm(emb(t_{i+k+1})); hnorm(h^{k-1}_i)])))), h^{-1} the main model's
    last hidden state and h^{k-1} the previous depth's normed output (Megatron-Core's chaining)."""
    model = built(tiny(2, **VARIANTS[variant])).eval()
    tokens = torch.randint(0, V, (2, T))
    with torch.no_grad():
        main, depths = model.mtp_logits(tokens)
        torch.testing.assert_close(main, model(tokens), rtol=0, atol=0)
        emb = model.embed_tokens(tokens)
        hidden = model.trunk(emb)
        for k, module in enumerate(model.mtp):
            assert isinstance(module, MTPLayer)
            n = T - k - 1
            x = module.proj(torch.cat([module.enorm(emb[:, k + 1:k + 1 + n]), module.hnorm(hidden[:, :n])], -1))
            hidden = Block.forward(module, x)
            if module.final_norm is not None:
                hidden = module.final_norm(hidden)
            torch.testing.assert_close(depths[k][:, :n], model.head(hidden), rtol=1e-5, atol=1e-5)


def expected_loss(model: ArchplanModel, tokens: Tensor, weight: float) -> Tensor:
    main, depths = model.mtp_logits(tokens)
    loss = F.cross_entropy(main[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))
    for k, logits in enumerate(depths):
        loss = loss + weight / len(depths) * F.cross_entropy(logits[:, :T - k - 2].reshape(-1, V),
                                                            tokens[:, k + 2:].reshape(-1))
    return loss


@pytest.mark.parametrize(("variant", "depth"), [("gqa", 1), ("gqa", 2), ("tied", 2), ("learned_embed_norm", 1),
                                                ("deepseek", 2)])
def test_training_loss_is_eq_25_and_trains_every_part(variant: str, depth: int) -> None:
    """L_main + λ/D · Σ_k CE_k, each CE over the positions with a target; the backward reaches
    every MTP parameter, the embedding (through the main model and each depth's input) and the head."""
    model = built(tiny(depth, loss_weight=0.5, **VARIANTS[variant]))
    tokens = torch.randint(0, V, (2, T))
    loss = model.training_loss(tokens)
    with torch.no_grad():
        torch.testing.assert_close(loss, expected_loss(model, tokens, 0.5))
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            assert p.grad is not None, name
    for k, module in enumerate(model.mtp):
        for part in (module.proj, module.enorm, module.hnorm):
            assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0, (k, part)
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
    head = model.embed.weight if model.plan.tied else model.lm_head.weight
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_mtp_loss_reaches_the_main_model_and_the_embedding_ahead_only_where_targets_are() -> None:
    """The MTP loss trains the main model through h^0 and the embedding through emb(t_{i+k+1}). Depth
    0 reads token T − 2 as the token ahead at position T − 3, which has a target, and at T − 2 as the
    main model's input, which has none: its embedding row gets a gradient from the first only. Token
    T − 1 is read at positions without a target only (the rolled tail): no gradient."""
    model = built(tiny(1))
    tokens = torch.randint(0, V - 2, (1, T))
    tokens[0, -2:] = torch.tensor([V - 2, V - 1])  # vocabulary entries the sequence uses only there
    _, depths = model.mtp_logits(tokens)
    F.cross_entropy(depths[0][:, :T - 2].reshape(-1, V), tokens[:, 2:].reshape(-1)).backward()
    grad = model.embed.weight.grad
    assert grad is not None and grad[V - 2].abs().sum() > 0 and grad[V - 1].abs().sum() == 0
    layer_grad = model.layers[0].mixer.q_proj.weight.grad
    assert layer_grad is not None and layer_grad.abs().sum() > 0


def test_moe_balance_losses_include_the_mtp_blocks() -> None:
    """The MTP blocks' load-balancing losses are computed in training and reported by `aux_loss`."""
    model = built(tiny(2, **DEEPSEEK)).train()
    model.training_loss(torch.randint(0, V, (2, T))).backward()
    moe = [m.ffn for m in [*model.layers, *model.mtp] if isinstance(m.ffn, MoEFFN)]
    assert len(moe) == 3 and all(m.last_aux_loss is not None for m in moe)
    torch.testing.assert_close(model.aux_loss(), sum(m.last_aux_loss for m in moe))  # type: ignore[misc]
    router = model.mtp[1].ffn.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_without_mtp_the_loss_is_next_token_cross_entropy() -> None:
    model = built(tiny())
    tokens = torch.randint(0, V, (2, T))
    main, depths = model.mtp_logits(tokens)
    assert depths == []
    torch.testing.assert_close(model.training_loss(tokens),
                               F.cross_entropy(main[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1)))


def test_a_sequence_too_short_for_the_depth_is_a_user_error() -> None:
    model = built(tiny(3))
    model.training_loss(torch.randint(0, V, (1, 5)))  # the deepest module predicts token 4 from position 0
    with pytest.raises(ArchplanError, match="at least 5 tokens"):
        model.training_loss(torch.randint(0, V, (1, 4)))


def test_meta_builds_and_trains() -> None:
    """On meta, as verify builds large models: a forward and a backward of the training loss."""
    model = build_model(resolve(tiny(2, **DEEPSEEK)), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    tokens = torch.zeros(2, T, dtype=torch.long, device="meta")
    main, depths = model.mtp_logits(tokens)
    assert main.shape == (2, T, V) and [d.shape for d in depths] == [(2, T, V)] * 2
    model.training_loss(tokens).backward()
    assert model.mtp[1].proj.weight.grad is not None and model.mtp[1].proj.weight.grad.device.type == "meta"


def test_deepseek_v3_mtp_module_on_meta() -> None:
    """DeepSeek-V3's one MTP module (its layer 61): 2·7168² for the projection, three norms, and
    exactly what the model's MoE layer holds, nothing allocated."""
    spec = load_spec("deepseek-v3").model_copy(update={"mtp": MultiTokenPrediction(depth=1)})
    plan = resolve(spec)
    d = plan.d_model
    with torch.device("meta"):
        module = MTPLayer(plan.mtp[0], plan)
        layer = Block(plan.layers[-1], plan)
    assert isinstance(module.ffn, MoEFFN)
    assert numel(module) == numel(layer) + 2 * d * d + 3 * d
