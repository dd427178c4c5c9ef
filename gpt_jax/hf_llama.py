"""Llama weights in Hugging Face's format: the LlamaForCausalLM config and tensors, both ways.

A Llama is our model with rope, rmsnorm and swiglu, no biases, pre-norm with a final norm:
SmolLM and TinyLlama are of this family. HF's Linear layers keep their weight as (out, in),
so every projection is transposed into a Flax kernel (in, out); q, k and v are concatenated
into c_attn and gate and up into c_fc (gate first). Our rotary is Llama's half-split layout
(HF's rotate_half), so q and k need no permutation. gpt_jax/hf.py finds the directory and reads
and writes the files; this module only maps names, shapes and config fields.
"""

import numpy as np
from flax import traverse_util

from gpt_jax.errors import UserError
from gpt_jax.model import GPTConfig

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
# Buffers older transformers versions saved beside the weights (the rotary table); not weights.
_BUFFER_SUFFIX = ".rotary_emb.inv_freq"


# --------------------------------------------------------------------------- config


def read_config(hf: dict, path) -> GPTConfig:
    """Returns our GPTConfig for a Llama config.json (already parsed; `path` names it in errors).

    Raises UserError naming the first field our model cannot express (rope scaling, biases,
    another activation, a head_dim that is not hidden_size / num_attention_heads).
    """
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}  # transformers 5 keeps rope_theta in here
    scaling = hf.get("rope_scaling") or {}  # transformers 4: rope_theta at the top level
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu") == "silu",
                       "the gated MLP is implemented with SiLU only"),
        "rope_scaling": (scaling.get("rope_type", scaling.get("type", "default")) == "default",
                         "RoPE scaling (linear, dynamic, yarn, llama3) is not implemented"),
        "rope_parameters": (rope_type == "default" and rope.get("partial_rotary_factor", 1) == 1,
                            "only plain RoPE over the whole head is implemented"),
        "head_dim": (hf.get("head_dim") in (None, n_embd // n_head),
                     "the head size is always hidden_size / num_attention_heads"),
        "attention_bias": (not hf.get("attention_bias"),
                           "Llama import has no biases; only bias-free models are read"),
        "mlp_bias": (not hf.get("mlp_bias"),
                     "Llama import has no biases; only bias-free models are read"),
    }
    for key, (ok, why) in unsupported.items():
        if not ok:
            raise UserError(f"{path}: {key}={hf.get(key)!r} cannot be imported ({why})")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                     n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
                     dropout=0.0, bias=False, pos_encoding="rope",
                     rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                     norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                     activation="swiglu", mlp_hidden=hf["intermediate_size"],
                     n_kv_head=hf.get("num_key_value_heads") or n_head,
                     tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def export_blockers(config: GPTConfig) -> list[str]:
    """Returns why `config` cannot be written as a LlamaForCausalLM (empty when it can).

    zero_init_proj only initialises and dropout only trains: neither blocks an export.
    """
    reasons = []
    if config.pos_encoding != "rope":
        reasons.append(f"pos_encoding={config.pos_encoding!r} (Llama rotates q and k: rope)")
    if config.norm != "rmsnorm":
        reasons.append(f"norm={config.norm!r} (Llama uses RMSNorm)")
    if config.activation != "swiglu":
        reasons.append(f"activation={config.activation!r} (Llama's MLP is swiglu)")
    if config.bias:
        reasons.append("bias=True (Llama's projections have no biases)")
    if config.norm_position != "pre":
        reasons.append(f"norm_position={config.norm_position!r} (Llama normalises before each "
                       "sublayer)")
    if not config.has_final_norm:
        reasons.append("final_norm=False (Llama ends in an RMSNorm, model.norm)")
    if config.token_scale != 1.0:
        reasons.append(f"embed_scale={config.token_scale:g} (Llama uses its token embeddings "
                       "unscaled)")
    if config.qk_norm:
        reasons.append("qk_norm=True (Llama does not normalise queries and keys)")
    if config.logit_softcap:
        reasons.append(f"logit_softcap={config.logit_softcap:g} (Llama's logits are not capped)")
    return reasons


def hf_config(config: GPTConfig, end_of_text: int | None = None) -> dict:
    """Returns the config.json of a LlamaForCausalLM with `config`'s shape.

    rope_theta is written at the top level, which transformers 4 and 5 both read.
    `end_of_text` is the token id written as bos_token_id and eos_token_id (None: unset).
    """
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.block_size,
        "hidden_size": config.n_embd, "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads, "head_dim": config.n_embd // config.n_head,
        "hidden_act": "silu", "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02, "use_cache": True, "bos_token_id": end_of_text,
        "eos_token_id": end_of_text, "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------- tensors


def tensor_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Returns every tensor name of a LlamaForCausalLM with `config`'s shape -> its shape."""
    D, F, V = config.n_embd, config.mlp_width, config.vocab_size
    K = D // config.n_head
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(config.n_layer):
        layer = f"model.layers.{i}"
        shapes.update({
            f"{layer}.input_layernorm.weight": (D,),
            f"{layer}.post_attention_layernorm.weight": (D,),
            f"{layer}.self_attn.q_proj.weight": (config.n_head * K, D),
            f"{layer}.self_attn.k_proj.weight": (config.kv_heads * K, D),
            f"{layer}.self_attn.v_proj.weight": (config.kv_heads * K, D),
            f"{layer}.self_attn.o_proj.weight": (D, config.n_head * K),
            f"{layer}.mlp.gate_proj.weight": (F, D),
            f"{layer}.mlp.up_proj.weight": (F, D),
            f"{layer}.mlp.down_proj.weight": (D, F),
        })
    return shapes


def params_from_tensors(tensors: dict[str, np.ndarray], config: GPTConfig, source="") -> dict:
    """Returns our parameter tree built from LlamaForCausalLM tensors; names every mismatch.

    A tied model may carry lm_head.weight too (equal to the embedding) or leave it out.
    """
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_BUFFER_SUFFIX)}
    if config.tie_embeddings and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        if not np.array_equal(head, tensors.get("model.embed_tokens.weight")):
            raise UserError(f"{source}: lm_head.weight differs from model.embed_tokens.weight "
                            "though config.json ties them: set tie_word_embeddings to false")
    shapes = tensor_shapes(config)
    unknown, missing = sorted(set(tensors) - set(shapes)), sorted(set(shapes) - set(tensors))
    if unknown or missing:
        what = f"unexpected tensor {unknown[0]}" if unknown else f"missing tensor {missing[0]}"
        raise UserError(f"{source}: {what} ({len(unknown)} unexpected, {len(missing)} missing): "
                        "the weights do not match config.json's Llama shape")
    for name, shape in shapes.items():
        if tensors[name].shape != shape:
            raise UserError(f"{source}: tensor {name} has shape {tensors[name].shape}, "
                            f"expected {shape}")
    flat = {("wte", "embedding"): tensors["model.embed_tokens.weight"],
            ("ln_f", "scale"): tensors["model.norm.weight"]}
    if not config.tie_embeddings:
        flat["lm_head", "kernel"] = tensors["lm_head.weight"].T
    for i in range(config.n_layer):
        hf = {k.removeprefix(f"model.layers.{i}."): v for k, v in tensors.items()
              if k.startswith(f"model.layers.{i}.")}
        h = f"h_{i}"
        flat[h, "ln_1", "scale"] = hf["input_layernorm.weight"]
        flat[h, "ln_2", "scale"] = hf["post_attention_layernorm.weight"]
        flat[h, "attn", "c_attn", "kernel"] = np.concatenate(
            [hf[f"self_attn.{p}_proj.weight"].T for p in "qkv"], axis=1)
        flat[h, "attn", "c_proj", "kernel"] = hf["self_attn.o_proj.weight"].T
        flat[h, "mlp", "c_fc", "kernel"] = np.concatenate(
            [hf["mlp.gate_proj.weight"].T, hf["mlp.up_proj.weight"].T], axis=1)
        flat[h, "mlp", "c_proj", "kernel"] = hf["mlp.down_proj.weight"].T
    return traverse_util.unflatten_dict(
        {path: np.ascontiguousarray(value, np.float32) for path, value in flat.items()})


def tensors_from_params(params: dict, config: GPTConfig) -> dict[str, np.ndarray]:
    """Returns LlamaForCausalLM tensors for our parameters (a tied head is not written)."""
    blockers = export_blockers(config)
    if blockers:
        raise UserError(f"this model cannot be written as Llama: {'; '.join(blockers)}")
    p = traverse_util.flatten_dict(params)
    H, N, K = config.n_head, config.kv_heads, config.n_embd // config.n_head
    tensors = {"model.embed_tokens.weight": p["wte", "embedding"],
               "model.norm.weight": p["ln_f", "scale"]}
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = np.asarray(p["lm_head", "kernel"]).T
    for i in range(config.n_layer):
        h, layer = f"h_{i}", f"model.layers.{i}"
        q_DQ, k_DC, v_DC = np.split(np.asarray(p[h, "attn", "c_attn", "kernel"]),
                                    [H * K, (H + N) * K], axis=1)
        gate_DF, up_DF = np.split(np.asarray(p[h, "mlp", "c_fc", "kernel"]), 2, axis=1)
        tensors.update({
            f"{layer}.input_layernorm.weight": p[h, "ln_1", "scale"],
            f"{layer}.post_attention_layernorm.weight": p[h, "ln_2", "scale"],
            f"{layer}.self_attn.q_proj.weight": q_DQ.T,
            f"{layer}.self_attn.k_proj.weight": k_DC.T,
            f"{layer}.self_attn.v_proj.weight": v_DC.T,
            f"{layer}.self_attn.o_proj.weight": np.asarray(p[h, "attn", "c_proj", "kernel"]).T,
            f"{layer}.mlp.gate_proj.weight": gate_DF.T,
            f"{layer}.mlp.up_proj.weight": up_DF.T,
            f"{layer}.mlp.down_proj.weight": np.asarray(p[h, "mlp", "c_proj", "kernel"]).T,
        })
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}

