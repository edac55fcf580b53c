"""Real torch modules built from a resolved `ModelPlan`; everything builds and runs on meta.

Shape suffixes name every multi-rank tensor (`x_BTD`, `w_EFD`). The letters:

    B    batch                          T    new tokens in this forward (query length)
    L    key length: cache capacity or context (max_len, or the window for sliding layers)
    S    key length actually attended in one forward (cached + new)
    D    d_model                        V    vocab size
    H    query heads                    Hkv  key/value heads (H for MHA, 1 for MQA)
    Dh   attention head dim             R    rotary dims of a head (rotary_dim / qk_rope_head_dim)
    Dn   MLA non-rotary q/k head dim    Dv   value head dim (MLA)
    Q    MLA q_lora_rank                C    MLA kv_lora_rank
    F    FFN hidden width (d_ff)        E    routed experts
    K    top-k experts per token        M    routed rows (B·T·K)
    I    Mamba d_inner                  N    SSM state size (d_state)
    W    conv width (d_conv)            P    Mamba-2 head dim
    G    Mamba-2 groups                 Hs   Mamba-2 SSM heads
    Rdt  Mamba-1 dt_rank                X    a projection's fused output width (H·Dh, H·(Dn+R), ...);
                                             in mamba2.py the conv width I + 2·G·N
    1    a literal size-1 axis (the depthwise conv weight `weight_C1W`, C its channels)

Local to a file, where the loop structure needs more letters:
    chunked scans (mamba1.py, mamba2.py): C chunks, L positions within a chunk, S source
        positions within a chunk, J SSM heads per group;
    moe.py: N the B·T flattened tokens, I and O a grouped matmul's input and output widths.

The modules receive final integers from `archplan.resolve`; no size is derived here.
"""
