"""Hugging Face model directories: find one, read GPT-2 or Llama weights, write one back.

A Hugging Face directory holds config.json plus model.safetensors (or pytorch_model.bin, or a
sharded model.safetensors.index.json), and for sampling maybe tokenizer.json. config.json's
model_type picks the format: GPT2LMHeadModel here, LlamaForCausalLM in gpt_jax/hf_llama.py.
GPT-2 tensor names carry the `transformer.` prefix when written by save_pretrained and lack it
in OpenAI's hub files; both are read. Every tensor is mapped by name in `_tensor_map`. HF's
Conv1D keeps its weight as (in, out), already the layout of a Flax Dense kernel, so no GPT-2
weight is transposed.
"""

import dataclasses
import json
import math
import re
from pathlib import Path

import jax
import ml_collections
import numpy as np

from gpt_jax import hf_llama, tokenization
from gpt_jax.errors import UserError
from gpt_jax.metrics import log
from gpt_jax.model import GPTConfig, abstract_params, saved_model_fields, to_layout

# The published GPT-2 sizes: hub name -> (n_layer, n_head, n_embd); all use context 1024.
GPT2_SIZES = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
GPT2_VOCAB_SIZE = 50257
GPT2_BLOCK_SIZE = 1024
PREFIX = "hf:"
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Buffers older transformers versions saved beside the weights (the causal mask); not weights.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def gpt2_model_fields(size: str) -> dict:
    """Returns config.model fields (shape and GPT-2 switches) of a published GPT-2 size."""
    if size not in GPT2_SIZES:
        raise UserError(f"unknown GPT-2 size {size!r}: use one of {', '.join(GPT2_SIZES)}")
    n_layer, n_head, n_embd = GPT2_SIZES[size]
    return {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
            "block_size": GPT2_BLOCK_SIZE, "bias": True, "qkv_bias": True,
            "pos_encoding": "learned", "tie_embeddings": True}


# --------------------------------------------------------------------------- locating a model


def resolve(spec: str) -> Path:
    """Returns the local directory that `hf:DIR` or `hf:NAME` names, downloading NAME if needed.

    DIR is any existing directory; NAME (gpt2, gpt2-medium, ..., or any hub repo id) is
    fetched with huggingface_hub into its usual cache.
    """
    target = spec.removeprefix(PREFIX)
    if not target:
        raise UserError(f"init_from={spec!r} names nothing: use hf:DIR or hf:gpt2")
    path = Path(target).expanduser()
    if path.is_dir():
        return path
    if path.exists() or target.startswith(("/", ".", "~")):
        raise UserError(f"{target} is not a directory: pass hf:DIR with DIR holding config.json "
                        "and model.safetensors, or a hub name such as hf:gpt2")
    return _download(target)


def _download(name: str) -> Path:
    try:
        import huggingface_hub
    except ImportError:
        raise UserError(f"{name!r} is not a local directory, and fetching it from the hub needs "
                        "huggingface_hub: pip install huggingface_hub, or pass hf:DIR") from None
    try:
        return Path(huggingface_hub.snapshot_download(
            name, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                                  "tokenizer.json"]))
    except Exception as err:  # noqa: BLE001 (offline, unknown repo, auth: all end here)
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"could not fetch {name!r} from the Hugging Face hub ({reason}): when "
                        "offline, download the model elsewhere and pass hf:DIR") from None


# --------------------------------------------------------------------------- reading


def _read_json(directory: Path) -> dict:
    """Returns config.json of a Hugging Face directory, its model_type checked."""
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory} has no config.json: pass a directory written by "
                        "GPT2LMHeadModel or LlamaForCausalLM.save_pretrained, or from the hub")
    hf = json.loads(path.read_text())
    if hf.get("model_type", "gpt2") not in ("gpt2", hf_llama.MODEL_TYPE):
        raise UserError(f"{path} describes a {hf.get('model_type')!r} model: only GPT-2 "
                        "(model_type 'gpt2') and Llama ('llama') can be imported")
    return hf


def _is_llama(hf: dict) -> bool:
    return hf.get("model_type") == hf_llama.MODEL_TYPE


def read_config(directory: Path) -> GPTConfig:
    """Returns our GPTConfig for a Hugging Face GPT-2 or Llama config.json (dropout set to 0)."""
    hf = _read_json(directory)
    path = directory / "config.json"
    if _is_llama(hf):
        return hf_llama.read_config(hf, path)
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") in _TANH_GELUS,
                                "only the tanh-approximated GELU of GPT-2 is implemented"),
        "n_inner": (hf.get("n_inner") in (None, 4 * hf.get("n_embd", 768)),
                    "the MLP width must be 4 * n_embd"),
        "layer_norm_epsilon": (math.isclose(hf.get("layer_norm_epsilon", 1e-5), 1e-5),
                               "LayerNorm epsilon is fixed at GPT-2's 1e-5"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True),
                               "attention is always scaled by 1/sqrt(head_dim)"),
        "scale_attn_by_inverse_layer_idx": (not hf.get("scale_attn_by_inverse_layer_idx"),
                                            "per-layer attention scaling is not implemented"),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True),
                                "GPT-2's head is tied to the token embedding"),
        "add_cross_attention": (not hf.get("add_cross_attention"),
                                "cross-attention is not implemented"),
    }
    for key, (ok, why) in unsupported.items():
        if not ok:
            raise UserError(f"{path}: {key}={hf.get(key)!r} cannot be imported ({why})")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                     n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                     dropout=0.0, bias=True, qkv_bias=True, pos_encoding="learned",
                     tie_embeddings=True)


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Returns every tensor of the directory's weights file(s) as float32 numpy arrays."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file() or index.is_file():
        files = [single] if single.is_file() else sorted(
            {directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        tensors = {}
        for f in files:
            try:
                tensors.update(_read_safetensors(f))
            except Exception as err:  # noqa: BLE001 (a truncated or foreign file fails anywhere)
                raise UserError(f"{f} could not be read ({type(err).__name__}: {err}): "
                                "download it again") from None
        return tensors
    if (directory / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError:
            raise UserError(f"{directory} holds pytorch_model.bin, which needs torch to read: "
                            "pip install torch, or save the model as safetensors") from None
        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise UserError(f"{directory} has no weights (model.safetensors or pytorch_model.bin)")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Returns the tensors of one .safetensors file as float32 numpy arrays. A file holding
    bfloat16 (most Llama checkpoints) is read through safetensors' Flax loader, since numpy has
    no bfloat16; any other through its numpy loader, which is twice as fast."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        if all(f.get_slice(k).get_dtype() != "BF16" for k in f.keys()):  # noqa: SIM118
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}  # noqa: SIM118
    from safetensors.flax import load_file

    return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}


def _tensor_map(config: GPTConfig) -> dict[str, tuple[str, ...]]:
    """Returns HF tensor name (without `transformer.`) -> path in our parameter tree."""
    names = {"wte.weight": ("wte", "embedding"), "wpe.weight": ("wpe",),
             "ln_f.weight": ("ln_f", "scale"), "ln_f.bias": ("ln_f", "bias")}
    for i in range(config.n_layer):
        for ln in ("ln_1", "ln_2"):
            names[f"h.{i}.{ln}.weight"] = (f"h_{i}", ln, "scale")
            names[f"h.{i}.{ln}.bias"] = (f"h_{i}", ln, "bias")
        for sub, layer in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"),
                           ("mlp", "c_proj")):
            names[f"h.{i}.{sub}.{layer}.weight"] = (f"h_{i}", sub, layer, "kernel")
            names[f"h.{i}.{sub}.{layer}.bias"] = (f"h_{i}", sub, layer, "bias")
    return names


def params_from_tensors(tensors: dict[str, np.ndarray], config: GPTConfig, source="") -> dict:
    """Returns our parameter tree built from HF GPT-2 tensors; names every mismatch.

    `config.block_size` may be smaller than the checkpoint's context: the position table is
    cropped to its first block_size rows.
    """
    stripped = {}
    for name, value in tensors.items():
        key = name.removeprefix("transformer.")
        if key == "lm_head.weight" or _BUFFER.fullmatch(key):
            continue  # the head is tied to wte; the buffers are causal masks
        stripped[key] = value
    if "lm_head.weight" in tensors and "wte.weight" in stripped and not np.array_equal(
            tensors["lm_head.weight"], stripped["wte.weight"]):
        raise UserError(f"{source}: lm_head.weight differs from wte.weight, but GPT-2's head "
                        "is tied to the token embedding: only tied models can be imported")
    mapping = _tensor_map(config)
    unknown = sorted(set(stripped) - set(mapping))
    missing = sorted(set(mapping) - set(stripped))
    if unknown or missing:
        what = (f"unexpected tensor {unknown[0]}" if unknown else f"missing tensor {missing[0]}")
        raise UserError(f"{source}: {what} ({len(unknown)} unexpected, {len(missing)} missing): "
                        "the weights do not match config.json's GPT-2 shape")
    if "wpe.weight" in stripped:
        stripped["wpe.weight"] = stripped["wpe.weight"][: config.block_size]
    shapes = abstract_params(config)
    params: dict = {}
    for name, path in mapping.items():
        expected = _get(shapes, path).shape
        if stripped[name].shape != expected:
            raise UserError(f"{source}: tensor {name} has shape {stripped[name].shape}, "
                            f"expected {expected} for {'/'.join(path)}")
        _set(params, path, stripped[name])
    return jax.tree.map(np.asarray, params)


def load(spec: str, block_size: int | None = None) -> tuple[GPTConfig, dict]:
    """Returns (config, params) of the HF GPT-2 or Llama model `hf:DIR` or `hf:NAME` names.

    Args:
      spec: `hf:DIR` (a local directory) or `hf:NAME` (a hub model, fetched when online).
      block_size: crop the context to this many positions (at most the model's n_positions).
    """
    directory = resolve(spec)
    config = read_config(directory)
    if block_size is not None:
        if block_size > config.block_size:
            raise UserError(f"block_size {block_size} exceeds the context of {directory} "
                            f"({config.block_size} positions): use at most {config.block_size}")
        config = dataclasses.replace(config, block_size=block_size)
    tensors = read_tensors(directory)
    if _is_llama(_read_json(directory)):
        return config, hf_llama.params_from_tensors(tensors, config, str(directory))
    return config, params_from_tensors(tensors, config, str(directory))


def read_tokenizer(directory: Path, vocab_size: int):
    """Returns the tokenizer to sample a Hugging Face directory with: its tokenizer.json (through
    the `tokenizers` library, ending a sample at config.json's eos_token_id), or without one
    GPT-2's BPE for GPT-2's vocabulary of 50257 tokens."""
    path = directory / "tokenizer.json"
    if path.is_file():
        eos = _read_json(directory).get("eos_token_id")
        tokenizer = tokenization.HFTokenizer(path.read_text(encoding="utf-8"),
                                     eos[0] if isinstance(eos, list) and eos else eos)
        if tokenizer.vocab_size > vocab_size:
            raise UserError(f"{path} has {tokenizer.vocab_size} tokens but the model only "
                            f"{vocab_size}: use the tokenizer.json the model was trained with")
        return tokenizer
    if vocab_size != GPT2_VOCAB_SIZE:
        raise UserError(f"{directory} has no tokenizer.json and a vocabulary of {vocab_size} "
                        f"tokens, not GPT-2's {GPT2_VOCAB_SIZE}: copy the model's "
                        "tokenizer.json into it")
    return tokenization.TiktokenTokenizer("gpt2")


# --------------------------------------------------------------------------- writing


def export_blockers(config: GPTConfig) -> list[str]:
    """Returns why `config` cannot be written as a GPT2LMHeadModel (empty when it can)."""
    reasons = []
    if config.pos_encoding != "learned":
        reasons.append(f"pos_encoding={config.pos_encoding!r} (GPT-2 has a learned position "
                       "table)")
    if not config.tie_embeddings:
        reasons.append("tie_embeddings=False (GPT-2's head is tied to the token embedding)")
    if config.norm_position != "pre":
        reasons.append(f"norm_position={config.norm_position!r} (GPT-2 normalises before each "
                       "sublayer)")
    if config.activation != "gelu":
        reasons.append(f"activation={config.activation!r} (GPT-2's MLP uses tanh-GELU)")
    if config.token_scale != 1.0:
        reasons.append(f"embed_scale={config.token_scale:g} (GPT-2 adds its token embeddings "
                       "unscaled)")
    if not config.has_final_norm:
        reasons.append("final_norm=False (GPT-2 ends in a LayerNorm, ln_f)")
    # The switches of the Llama family (zero_init_proj only initialises: it exports as is),
    # which a Llama export writes: see hf_llama.export_blockers.
    if config.norm != "layernorm":
        reasons.append(f"norm={config.norm!r} (GPT-2 uses LayerNorm)")
    if config.norm_eps != 1e-5:
        reasons.append(f"norm_eps={config.norm_eps:g} (GPT-2's LayerNorm epsilon is 1e-5)")
    if config.mlp_width != 4 * config.n_embd:
        reasons.append(f"mlp_hidden={config.mlp_width} (GPT-2's MLP is 4 * n_embd wide)")
    if config.qk_norm:
        reasons.append("qk_norm=True (GPT-2 does not normalise queries and keys)")
    if config.kv_heads != config.n_head:
        reasons.append(f"n_kv_head={config.kv_heads} (GPT-2 has a key/value head per query "
                       "head)")
    if config.logit_softcap:
        reasons.append(f"logit_softcap={config.logit_softcap:g} (GPT-2's logits are not "
                       "capped)")
    return reasons


def hf_config(config: GPTConfig) -> dict:
    """Returns the config.json of a GPT2LMHeadModel with `config`'s shape."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": GPT2_VOCAB_SIZE - 1, "eos_token_id": GPT2_VOCAB_SIZE - 1,
        "torch_dtype": "float32",
    }


def tensors_from_params(params: dict, config: GPTConfig) -> dict[str, np.ndarray]:
    """Returns GPT2LMHeadModel tensors (`transformer.` names) for our parameters.

    Biases a model was trained without (bias=False, qkv_bias=False) are written as zeros,
    which computes the same function.
    """
    blockers = export_blockers(config)
    if blockers:
        raise UserError(f"this model cannot be written as GPT-2: {'; '.join(blockers)}")
    shapes = abstract_params(dataclasses.replace(config, bias=True, qkv_bias=True))
    tensors = {}
    for name, path in _tensor_map(config).items():
        value = _get(params, path, default=None)
        if value is None:  # a bias the model does not have
            value = np.zeros(_get(shapes, path).shape, np.float32)
        tensors["transformer." + name] = np.ascontiguousarray(np.asarray(value, np.float32))
    return tensors


def export_architecture(config: GPTConfig, source: str = "this model") -> str:
    """Returns the HF class `config` is written as: GPT2LMHeadModel when GPT-2 can express it,
    else LlamaForCausalLM; raises UserError with the reasons neither can."""
    gpt2, llama = export_blockers(config), hf_llama.export_blockers(config)
    if not gpt2:
        return "GPT2LMHeadModel"
    if not llama:
        return hf_llama.ARCHITECTURE
    raise UserError(f"{source} cannot be written as GPT-2 ({'; '.join(gpt2)}) nor as Llama "
                    f"({'; '.join(llama)})")


def write(directory: Path, params: dict, config: GPTConfig) -> str:
    """Writes config.json and model.safetensors of a GPT2LMHeadModel, or of a LlamaForCausalLM
    when GPT-2 cannot express the model, into `directory`; returns the class written."""
    from safetensors.numpy import save_file

    # Both formats name each layer's tensors: the blocks unstacked from scan_layers.
    config = dataclasses.replace(config, scan_layers=False)
    params = to_layout(params, config)
    architecture = export_architecture(config)
    if architecture == hf_llama.ARCHITECTURE:
        # A GPT-2-sized vocabulary is GPT-2's BPE, which ends a text with <|endoftext|>.
        eot = GPT2_VOCAB_SIZE - 1 if config.vocab_size == GPT2_VOCAB_SIZE else None
        tensors = hf_llama.tensors_from_params(params, config)
        hf = hf_llama.hf_config(config, end_of_text=eot)
    else:
        tensors, hf = tensors_from_params(params, config), hf_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return architecture


_REQUIRED = object()


def _get(tree, path, default=_REQUIRED):
    """Returns tree[path[0]][path[1]]...; `default` where a key is missing (if given)."""
    for key in path:
        if key not in tree and default is not _REQUIRED:
            return default
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# The fields a pretrained model fixes in config.model (block_size only as an upper bound).
SHAPE_FIELDS = ("block_size", "n_layer", "n_head", "n_embd", "bias", "qkv_bias",
                "pos_encoding", "tie_embeddings", "norm_position", "activation", "embed_scale",
                "final_norm", "rope_theta", "norm", "norm_eps", "mlp_hidden", "qk_norm",
                "n_kv_head", "logit_softcap", "zero_init_proj")


def resolve_init_from(config, saved_config: dict | None, vocab_size: int):
    """Returns (config with the pretrained model's shape, its params or None on a resume).

    The pretrained model fixes every shape field of config.model except block_size, which
    may crop its context; dropout and dtype stay the config's. A resume (`saved_config`, the
    checkpoint's) reads the shape from the checkpoint and ignores init_from, so the weights
    are not fetched again.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    if saved_config is not None:
        saved_model = saved_model_fields(saved_config["model"])
        config.model.update({k: saved_model[k] for k in SHAPE_FIELDS})
        return config, None
    hf_cfg, params = load(config.init_from, block_size=config.model.block_size)
    if hf_cfg.vocab_size != vocab_size:
        raise UserError(
            f"{config.init_from} has a vocabulary of {hf_cfg.vocab_size} tokens but the corpus's "
            f"tokenizer has {vocab_size}: set --config.data.tokenizer=gpt2 "
            "or use a corpus prepared with python -m gpt_jax.prepare")
    config.model.update({k: getattr(hf_cfg, k) for k in SHAPE_FIELDS})
    log(f"init_from {config.init_from}: {hf_cfg.n_layer} layers, {hf_cfg.n_head} heads, "
        f"{hf_cfg.n_embd} wide, context {hf_cfg.block_size}")
    return config, params
