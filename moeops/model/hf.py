"""Interop with transformers' DeepseekV3ForCausalLM: the config mapping. Our state dict
already uses its parameter names and shapes, so weights load with `load_state_dict` as is."""

from __future__ import annotations

from moeops.config import ModelArgs


def hf_config_dict(args: ModelArgs) -> dict:
    """The transformers DeepseekV3Config fields for `args` (model_type deepseek_v3).
    transformers' DeepseekV3 scores with sigmoid only; a softmax-scored model has no
    exact DeepseekV3 equivalent (DeepseekV2 with greedy top-k is, see tests)."""
    return dict(
        model_type="deepseek_v3",
        architectures=["DeepseekV3ForCausalLM"],
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.inter_dim,
        moe_intermediate_size=args.moe_inter_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_heads,
        n_shared_experts=args.n_shared_experts,
        n_routed_experts=args.n_routed_experts,
        num_experts_per_tok=args.top_k,
        n_group=args.n_group,
        topk_group=args.topk_group,
        routed_scaling_factor=args.routed_scaling_factor,
        norm_topk_prob=args.norm_topk_prob,
        first_k_dense_replace=args.first_k_dense_replace,
        q_lora_rank=args.q_lora_rank or None,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        rope_interleave=True,
        tie_word_embeddings=False,
        attention_bias=False,
        hidden_act="silu",
        initializer_range=args.init_std,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )


def hf_model(args: ModelArgs, arch: str = "DeepseekV3", **extra):
    """An untrained transformers `<arch>ForCausalLM` with our config (the parity tests and the
    benchmark peer load our state dict into it)."""
    import transformers

    fields = {k: v for k, v in hf_config_dict(args).items() if k not in ("model_type", "architectures")}
    config = getattr(transformers, f"{arch}Config")(**fields, **extra)
    return getattr(transformers, f"{arch}ForCausalLM")(config)
