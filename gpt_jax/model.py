"""The GPT model: GPTConfig plus small Flax linen modules, read top to bottom like GPT-2."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen.dtypes import promote_dtype

from gpt_jax.errors import UserError
from gpt_jax.kernels import sets as kernels

POS_ENCODINGS = ("learned", "sinusoidal", "rope", "none")
NORM_POSITIONS = ("pre", "post")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "relu", "relu2", "swiglu")
REMATS = ("none", "block", "dots")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of one GPT; built as GPTConfig(vocab_size=V, **config.model)."""

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in every Dense and LayerNorm (GPT-2: True)
    qkv_bias: bool = True  # bias on the fused qkv projection (only when `bias`)
    # learned | sinusoidal (added to the embeddings) | rope (q and k rotated in attention) |
    # none (the causal mask alone)
    pos_encoding: str = "learned"
    rope_theta: float = 10000.0  # RoPE's base: pair i turns by position * theta^(-2i/head_dim)
    norm_position: str = "pre"  # pre: x + f(ln(x)) (GPT-2); post: ln(x + f(x)) (Transformer)
    norm: str = "layernorm"  # layernorm (GPT-2) | rmsnorm (a learned scale, no mean, no bias)
    norm_eps: float = 1e-5  # GPT-2's (PyTorch's default), not Flax's 1e-6
    # MLP nonlinearity: gelu (tanh approximation, GPT-2) | relu | relu2: relu(x)^2 |
    # swiglu: silu(x W_gate) * (x W_up), Llama's
    activation: str = "gelu"
    mlp_hidden: int | None = None  # the MLP's width; None: 4 * n_embd (swiglu: see mlp_width)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before attention
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head
    logit_softcap: float = 0.0  # logits = c * tanh(logits / c); 0: off
    zero_init_proj: bool = False  # the projections into the residual stream start at zero
    # Which implementations the layers run (gpt_jax/kernels/): reference | cpu | fused, or
    # auto (cpu on XLA:CPU, fused on GPU/TPU). The numbers are the same to float32 rounding.
    kernels: str = "auto"
    attention: str = "auto"  # the older switch: fused | einsum overrides the set's attention
    # Token embeddings times this before positions are added. None: the source's choice,
    # sqrt(n_embd) with sinusoidal positions ("Attention is all you need", 3.4), else 1.
    embed_scale: float | None = None
    # A LayerNorm (ln_f) after the last block. None: the source's choice, GPT-2's ln_f with
    # pre-LN; none with post-LN, whose blocks already end in a LayerNorm (the Transformer).
    final_norm: bool | None = None
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # Document masking: each occurrence of this token (<|endoftext|>) begins a new document,
    # and attention never crosses into an earlier one (a block-diagonal causal mask, as
    # modded-nanogpt's). None: one causal mask over the whole row. Set by data.doc_mask.
    doc_sep: int | None = None
    # How the blocks are laid out and differentiated; neither changes what the model computes.
    # scan_layers: one nn.scan over the blocks, their parameters stacked along a leading layer
    # axis under "h" (see stack_layers); False: h_0 ... h_{n_layer - 1}, one module each.
    scan_layers: bool = False
    # none | block: each block's activations recomputed in the backward pass (jax.checkpoint,
    # nothing saved) | dots: the matmul outputs without a batch dimension saved, the rest
    # recomputed.
    remat: str = "none"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise UserError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                "choose n_embd a multiple of n_head (e.g. --config.model.n_embd="
                f"{self.n_head * max(1, round(self.n_embd / self.n_head))})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            divisors = [d for d in range(1, self.n_head + 1) if self.n_head % d == 0]
            raise UserError(f"model.n_head={self.n_head} is not divisible by model.n_kv_head="
                            f"{self.n_kv_head}: choose n_kv_head among {divisors}")
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"model.pos_encoding=rope rotates pairs of dimensions, but the head "
                            f"size n_embd / n_head = {self.n_embd // self.n_head} is odd: "
                            "choose n_embd a multiple of 2 * n_head")
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.mlp_hidden is not None and (not isinstance(self.mlp_hidden, (int, np.integer))
                                            or self.mlp_hidden < 1):
            raise UserError(f"model.mlp_hidden must be a positive integer (or None: the "
                            f"activation's rule), got {self.mlp_hidden!r}")
        if self.doc_sep is not None and not 0 <= self.doc_sep < self.vocab_size:
            raise UserError(f"model.doc_sep={self.doc_sep} is no token of the vocabulary of "
                            f"{self.vocab_size}: use the tokenizer's <|endoftext|> id, or None")
        if not self.logit_softcap >= 0:
            raise UserError(f"model.logit_softcap must be >= 0 (0: off), got "
                            f"{self.logit_softcap}")
        if self.embed_scale is not None and not self.embed_scale > 0:
            raise UserError(f"model.embed_scale must be positive (or None: the source's "
                            f"choice), got {self.embed_scale}")
        for name, allowed in (("pos_encoding", POS_ENCODINGS),
                              ("norm_position", NORM_POSITIONS), ("norm", NORMS),
                              ("activation", ACTIVATIONS), ("remat", REMATS),
                              ("kernels", kernels.KERNEL_SETS),
                              ("attention", kernels.ATTENTIONS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"model.{name}={getattr(self, name)!r} is unknown: use one of "
                                f"{', '.join(allowed)}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def token_scale(self) -> float:
        """Returns the factor on the token embeddings (embed_scale, or the source's choice)."""
        if self.embed_scale is not None:
            return float(self.embed_scale)
        return math.sqrt(self.n_embd) if self.pos_encoding == "sinusoidal" else 1.0

    @property
    def kv_heads(self) -> int:
        """Returns the key/value heads (n_kv_head, or n_head)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_width(self) -> int:
        """Returns the MLP's hidden width: mlp_hidden, else 4 * n_embd, or with swiglu Llama's
        rule, 2/3 of 4 * n_embd rounded up to a multiple of 64 (the parameters of a 4 * n_embd
        MLP, in three matrices instead of two)."""
        if self.mlp_hidden is not None:
            return int(self.mlp_hidden)
        if self.activation == "swiglu":
            return -(-(2 * 4 * self.n_embd // 3) // 64) * 64
        return 4 * self.n_embd

    @property
    def has_final_norm(self) -> bool:
        """Returns whether a LayerNorm follows the last block (final_norm, or the source's)."""
        return self.norm_position == "pre" if self.final_norm is None else self.final_norm


def kernels_of(config: GPTConfig) -> kernels.Kernels:
    """Returns the kernel set config.kernels (and the older config.attention) names."""
    return kernels.select(config.kernels, config.attention)


# Fields added after checkpoints were first written, with the value those checkpoints were
# trained with: a saved config without the field predates it.
LEGACY_FIELDS = {"embed_scale": 1.0, "final_norm": True, "rope_theta": 10000.0,
                 "norm": "layernorm", "norm_eps": 1e-5, "mlp_hidden": None, "qk_norm": False,
                 "n_kv_head": None, "logit_softcap": 0.0, "zero_init_proj": False,
                 "doc_sep": None, "scan_layers": False, "remat": "none"}


def saved_model_fields(model: dict) -> dict:
    """Returns a saved config's model fields with the legacy values of those it lacks."""
    return {**LEGACY_FIELDS, **model}


def effective_fields(model: dict) -> dict:
    """Returns model fields with embed_scale, final_norm, n_kv_head and mlp_hidden as the model
    applies them (their None resolved), so that two configs of one model compare equal."""
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    cfg = GPTConfig(**{"vocab_size": 1, **{k: v for k, v in model.items() if k in names}})
    return {**model, "embed_scale": cfg.token_scale, "final_norm": cfg.has_final_norm,
            "n_kv_head": cfg.kv_heads, "mlp_hidden": cfg.mlp_width}


class Dense(nn.Module):
    """y = x W + b, the kernel initialised N(0, std) (std 0: zeros), the bias 0; the matmul is
    the kernel set's."""

    config: GPTConfig
    features: int
    std: float = 0.02
    use_bias: bool | None = None  # None: config.bias

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(self.std) if self.std else nn.initializers.zeros
        kernel = self.param("kernel", init,
                            (x.shape[-1], self.features), jnp.float32)
        use_bias = cfg.bias if self.use_bias is None else self.use_bias
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32) \
            if use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=cfg.compute_dtype)
        return kernels_of(cfg).dense(x, kernel, bias)


class Dropout(nn.Module):
    """Inverted dropout at config.dropout, on when the model is applied with a 'dropout' rng.

    Each Dropout draws its own rng, so every site has its own masks; the attention weights'
    dropout takes one (`rng`) and hands it to the attention kernel.
    """

    config: GPTConfig

    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        rng = self.rng(deterministic)
        return x if rng is None else kernels_of(self.config).dropout(x, self.config.dropout, rng)

    def rng(self, deterministic: bool) -> jax.Array | None:
        """Returns this site's dropout key, or None when dropout is off."""
        if deterministic or self.config.dropout == 0.0:
            return None
        return self.make_rng("dropout")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis (Zhang & Sennrich 2019), in float32."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps) * scale


def _norm(config: GPTConfig, name: str) -> nn.Module:
    """Returns the block's normalisation, config.norm, computing in float32."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.norm_eps, name=name)
    return nn.LayerNorm(epsilon=config.norm_eps, use_bias=config.bias, dtype=jnp.float32,
                        name=name)


def _residual_std(config: GPTConfig) -> float:
    # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer);
    # modded-nanogpt starts them at zero, so that every block starts as the identity.
    return 0.0 if config.zero_init_proj else 0.02 / math.sqrt(2 * config.n_layer)


def rotary(x_BTHK: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Returns x rotated by its positions (RoPE, Su et al. 2021) in Llama's half-split layout:
    dimensions i and i + K/2 form a pair that turns by angle position * theta^(-2i/K), so a
    query-key product depends only on the offset between their positions."""
    K = x_BTHK.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K)
    angles_BT1k = (positions_BT.astype(jnp.float32)[:, :, None] * inv_freq)[:, :, None]
    cos, sin = jnp.cos(angles_BT1k), jnp.sin(angles_BT1k)
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BTHK.dtype)


def sinusoidal_positions(block_size: int, n_embd: int) -> np.ndarray:
    """Returns the (block_size, n_embd) sine/cosine table of "Attention is all you need"."""
    pos_T1 = np.arange(block_size, dtype=np.float64)[:, None]
    freq_D = np.exp(-math.log(10000.0) * np.arange(0, n_embd, 2, dtype=np.float64) / n_embd)
    table_TD = np.zeros((block_size, n_embd), dtype=np.float64)
    table_TD[:, 0::2] = np.sin(pos_T1 * freq_D)
    table_TD[:, 1::2] = np.cos(pos_T1 * freq_D[: n_embd // 2])
    return table_TD.astype(np.float32)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and a causal mask.

    n_head query heads share n_kv_head key/value heads (grouped-query attention; query head h
    reads key/value head h // (n_head / n_kv_head)). Optionally each head's queries and keys are
    RMS-normalised (qk_norm) and rotated by their positions (rope).

    In decode mode the keys and values of every position seen so far live in the `cache`
    collection, (B, n_kv_head, block_size, K) each (heads before positions: XLA:CPU then reads
    them without a transposed copy): the new ones are written at `positions_BT` and each query
    attends to the cached positions up to its own.

    `documents` (with doc_sep) keeps each query within its own document: the row's document
    numbers (B, T), or in decode mode (the queries' (B, T), the cached positions' (B, S)).
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True,
                 positions_BT: jax.Array | None = None, documents=None) -> jax.Array:
        cfg = self.config
        B, T, D = x_BTD.shape
        H, N, K = cfg.n_head, cfg.kv_heads, D // cfg.n_head
        qkv = Dense(cfg, (H + 2 * N) * K, use_bias=cfg.bias and cfg.qkv_bias, name="c_attn")(x_BTD)
        q, k, v = jnp.split(qkv, [H * K, (H + N) * K], axis=-1)
        q_BTHK, k_BTNK, v_BTNK = q.reshape(B, T, H, K), k.reshape(B, T, N, K), v.reshape(B, T, N, K)
        if cfg.qk_norm:
            q_BTHK = RMSNorm(cfg.norm_eps, name="q_norm")(q_BTHK).astype(q_BTHK.dtype)
            k_BTNK = RMSNorm(cfg.norm_eps, name="k_norm")(k_BTNK).astype(k_BTNK.dtype)
        if cfg.pos_encoding == "rope":
            at_BT = jnp.arange(T)[None] if positions_BT is None else positions_BT
            q_BTHK = rotary(q_BTHK, at_BT, cfg.rope_theta)
            k_BTNK = rotary(k_BTNK, at_BT, cfg.rope_theta)
        weights = dict(dropout_rate=cfg.dropout, rng=Dropout(cfg).rng(deterministic),
                       dtype=cfg.compute_dtype)
        if positions_BT is None:  # each key/value head repeated for the queries that share it
            k_BTHK, v_BTHK = (jnp.repeat(a, H // N, axis=2) for a in (k_BTNK, v_BTNK))
            y_BTHK = kernels_of(cfg).causal_attention(q_BTHK, k_BTHK, v_BTHK, **weights,
                                                      segments_BT=documents)
        else:
            k_BNSK, v_BNSK = self._cached(k_BTNK, v_BTNK, positions_BT)
            y_BTHK = kernels_of(cfg).cached_attention(q_BTHK, k_BNSK, v_BNSK, positions_BT,
                                                      **weights, segments=documents)
        y_BTD = Dense(cfg, D, std=_residual_std(cfg), name="c_proj")(y_BTHK.reshape(B, T, D))
        return Dropout(cfg)(y_BTD, deterministic)

    def _cached(self, k_BTNK, v_BTNK, positions_BT):
        """Writes the new keys and values at their positions; returns the (B, N, S, K) cache.

        S is the length of the cache passed in (init_cache's `length`, block_size by default):
        a sampler may hold a shorter one while its rows are short, so that attention reads
        only S positions, and grow it as they lengthen."""
        B, _, N, K = k_BTNK.shape
        shape = (B, N, self.config.block_size, K)
        cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k_BTNK.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v_BTNK.dtype)
        at = (jnp.arange(B)[:, None, None], jnp.arange(N)[None, :, None], positions_BT[:, None, :])
        # Positions past block_size (padding beyond a full window) are dropped, not clamped.
        cached_k.value = cached_k.value.at[at].set(k_BTNK.transpose(0, 2, 1, 3), mode="drop")
        cached_v.value = cached_v.value.at[at].set(v_BTNK.transpose(0, 2, 1, 3), mode="drop")
        return cached_k.value, cached_v.value


_ACTIVATIONS = {
    "gelu": lambda h: nn.gelu(h, approximate=True),  # GPT-2's tanh approximation
    "relu": nn.relu,
    "relu2": lambda h: jnp.square(nn.relu(h)),  # So et al. 2021 (Primer); modded-nanogpt
}


class MLP(nn.Module):
    """Position-wise feed-forward network of width mlp_width (4 * n_embd): act(x W_fc) W_proj,
    or with swiglu (Shazeer 2020, Llama) (silu(x W_gate) * x W_up) W_proj, W_gate and W_up
    side by side in c_fc (gate first)."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        F = cfg.mlp_width
        if cfg.activation == "swiglu":
            gate_BTF, up_BTF = jnp.split(Dense(cfg, 2 * F, name="c_fc")(x_BTD), 2, axis=-1)
            h_BTF = nn.silu(gate_BTF) * up_BTF
        else:
            h_BTF = _ACTIVATIONS[cfg.activation](Dense(cfg, F, name="c_fc")(x_BTD))
        y_BTD = Dense(cfg, cfg.n_embd, std=_residual_std(cfg), name="c_proj")(h_BTF)
        return Dropout(cfg)(y_BTD, deterministic)


class Block(nn.Module):
    """One transformer block. Pre-LayerNorm (GPT-2): x + attn(ln(x)), then x + mlp(ln(x)).
    Post-LayerNorm ("Add & Norm", the original Transformer): ln(x + attn(x)), ln(x + mlp(x)).
    ln is model.norm: LayerNorm or RMSNorm."""

    config: GPTConfig
    scan_body: bool = False  # return (x, None), the carry and outputs of nn.scan's body

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True,
                 positions_BT: jax.Array | None = None, documents=None):
        x_BTD = self._residual(x_BTD, deterministic, positions_BT, documents)
        return (x_BTD, None) if self.scan_body else x_BTD

    def _residual(self, x_BTD, deterministic, positions_BT, documents) -> jax.Array:
        cfg = self.config
        attn, mlp = CausalSelfAttention(cfg, name="attn"), MLP(cfg, name="mlp")
        ln_1, ln_2 = _norm(cfg, "ln_1"), _norm(cfg, "ln_2")
        if cfg.norm_position == "post":
            x_BTD = ln_1(x_BTD + attn(x_BTD.astype(cfg.compute_dtype), deterministic,
                                      positions_BT, documents))
            return ln_2(x_BTD + mlp(x_BTD.astype(cfg.compute_dtype), deterministic))
        h_BTD = ln_1(x_BTD).astype(cfg.compute_dtype)
        x_BTD = x_BTD + attn(h_BTD, deterministic, positions_BT, documents)
        h_BTD = ln_2(x_BTD).astype(cfg.compute_dtype)
        return x_BTD + mlp(h_BTD, deterministic)


STACKED = "h"  # the blocks' parameters (and caches) under scan_layers, layer axis first

# model.remat's policies: what each block keeps for the backward pass (jax.checkpoint).
_REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,  # its input alone
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # and its matmul outputs
}


def _blocks(config: GPTConfig) -> type[nn.Module]:
    """Returns the block module as the stack applies it: Block, rematerialised under
    config.remat, and scanned over the layers under config.scan_layers (one body compiled once,
    parameters and caches stacked along a leading layer axis; every layer its own dropout)."""
    block = Block
    if config.remat != "none":
        # deterministic (argument 2, counting self) is a Python bool: static.
        block = nn.remat(block, policy=_REMAT_POLICIES[config.remat], static_argnums=(2,),
                         prevent_cse=not config.scan_layers)
    if config.scan_layers:
        block = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                        length=config.n_layer)
    return block


class GPT(nn.Module):
    """GPT-2 language model: token ids (B, T) -> next-token logits (B, T, vocab_size) in float32.

    Dropout is active only when the module is applied with a 'dropout' rng.

    With decode=True the same parameters run against the `cache` collection (see init_cache):
    row b of idx_BT sits at positions index[b], index[b] + 1, ... after the tokens already cached,
    and attends to all of them. index[b] then advances by lengths_B[b] (default T): the rest of
    the row is right padding, which no later token ever attends to.

    With last_only=True the logits are (B, 1, vocab_size): those of each row's last token (at
    lengths_B[b] - 1, default T - 1) alone, which is all a sampler needs from a prompt.

    With config.doc_sep, position t belongs to document (number of doc_sep tokens at or before
    t): a doc_sep token opens the document it begins. In decode mode the cache keeps each
    position's document number (`segment`), and new tokens continue from the row's last one.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, idx_BT: jax.Array, decode: bool = False,
                 lengths_B: jax.Array | None = None, last_only: bool = False) -> jax.Array:
        cfg = self.config
        B, T = idx_BT.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        deterministic = not self.has_rng("dropout")
        wte = nn.Embed(
            cfg.vocab_size, cfg.n_embd, embedding_init=nn.initializers.normal(0.02), name="wte"
        )
        x_BTD = wte(idx_BT)
        if cfg.token_scale != 1.0:
            x_BTD = x_BTD * cfg.token_scale
        if cfg.pos_encoding == "learned":
            wpe_SD = self.param("wpe", nn.initializers.normal(0.02), (cfg.block_size, cfg.n_embd))
        elif cfg.pos_encoding == "sinusoidal":
            wpe_SD = sinusoidal_positions(cfg.block_size, cfg.n_embd)
        else:  # none, or rope (which rotates q and k in attention): nothing added here
            wpe_SD = jnp.zeros((cfg.block_size, cfg.n_embd), jnp.float32)
        positions_BT = documents = None
        if cfg.doc_sep is not None:  # each row's document numbers, counted from its start
            documents = jnp.cumsum(idx_BT == cfg.doc_sep, axis=1, dtype=jnp.int32)
        if decode:
            index = self.variable("cache", "index", jnp.zeros, (B,), jnp.int32)
            positions_BT = index.value[:, None] + jnp.arange(T, dtype=jnp.int32)
            if documents is not None:
                documents = self._cached_documents(documents, index.value, positions_BT)
            index.value = index.value + (T if lengths_B is None else lengths_B)
            x_BTD = x_BTD + jnp.take(wpe_SD, positions_BT, axis=0, mode="clip")
        else:
            x_BTD = x_BTD + wpe_SD[:T]
        x_BTD = Dropout(cfg)(x_BTD, deterministic)
        if cfg.scan_layers:
            x_BTD, _ = _blocks(cfg)(cfg, scan_body=True, name=STACKED)(
                x_BTD, deterministic, positions_BT, documents)
        else:
            for i in range(cfg.n_layer):
                x_BTD = _blocks(cfg)(cfg, name=f"h_{i}")(x_BTD, deterministic, positions_BT,
                                                         documents)
        if cfg.has_final_norm:
            x_BTD = _norm(cfg, "ln_f")(x_BTD)
        x_BTD = x_BTD.astype(cfg.compute_dtype)
        if last_only:  # sampling: the head (vocab_size wide) on each row's last token alone
            last_B = jnp.full((B,), T - 1) if lengths_B is None else lengths_B - 1
            x_BTD = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)
        if cfg.tie_embeddings:
            logits_BTV = kernels_of(cfg).logits(*promote_dtype(x_BTD, wte.embedding))
        else:
            logits_BTV = Dense(cfg, cfg.vocab_size, use_bias=False, name="lm_head")(x_BTD)
        logits_BTV = logits_BTV.astype(jnp.float32)
        if cfg.logit_softcap:  # Gemma 2, modded-nanogpt: every logit within (-c, c)
            logits_BTV = cfg.logit_softcap * jnp.tanh(logits_BTV / cfg.logit_softcap)
        return logits_BTV

    def _cached_documents(self, new_BT, index_B, positions_BT):
        """Returns (the new tokens' document numbers, the cache's) after writing the new ones:
        they continue the document of the row's last cached token."""
        B = new_BT.shape[0]
        segment = self.variable("cache", "segment", jnp.zeros, (B, self.config.block_size),
                                jnp.int32)
        last_B = jnp.take_along_axis(segment.value, jnp.maximum(index_B - 1, 0)[:, None],
                                     axis=1, mode="clip")[:, 0]
        new_BT = new_BT + jnp.where(index_B > 0, last_B, 0)[:, None]
        segment.value = segment.value.at[jnp.arange(B)[:, None], positions_BT].set(
            new_BT, mode="drop")
        return new_BT, segment.value


def init_params(config: GPTConfig, rng: jax.Array):
    """Returns freshly initialised parameters (GPT-2 initialisation) for `config`: the same
    values in either layout, drawn per layer as the unrolled model draws them."""
    unrolled = dataclasses.replace(config, scan_layers=False, remat="none")
    dummy_11 = jnp.zeros((1, 1), dtype=jnp.int32)  # parameter shapes do not depend on length
    return jax.jit(lambda key: to_layout(GPT(unrolled).init(key, dummy_11)["params"],
                                         config))(rng)


def _is_params(tree) -> bool:
    # A parameter tree, or one shaped like it inside an optimizer state (AdamW's moments).
    return isinstance(tree, dict) and "wte" in tree


def to_layout(tree, config: GPTConfig):
    """Returns `tree` (parameters, or a train or optimizer state holding trees shaped like
    them) with every parameter tree in config's layout: the blocks under h_0 ... h_{L-1}, or
    with scan_layers stacked along a leading layer axis under "h". The values are the same."""
    names = [f"h_{i}" for i in range(config.n_layer)]

    def convert(params):
        if config.scan_layers and STACKED not in params:
            layers = [params[name] for name in names]
            rest = {k: v for k, v in params.items() if k not in names}
            return {**rest, STACKED: jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
        if not config.scan_layers and STACKED in params:
            rest = {k: v for k, v in params.items() if k != STACKED}
            layers = {name: jax.tree.map(lambda x, i=i: x[i], params[STACKED])
                      for i, name in enumerate(names)}
            return {**rest, **layers}
        return params

    return jax.tree.map(lambda t: convert(t) if _is_params(t) else t, tree, is_leaf=_is_params)


def layer_norms(params) -> dict[str, jax.Array]:
    """Returns the L2 norm of each top-level entry of a parameter tree (wte, h_0, ..., ln_f),
    the stacked blocks of scan_layers counted layer by layer as h_0, h_1, ..."""
    out = {}
    for name, sub in params.items():
        if name != STACKED:
            out[name] = optax.tree.norm(sub)
            continue
        squares_L = sum(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1)
                        for x in jax.tree.leaves(sub))
        out.update({f"h_{i}": jnp.sqrt(squares_L[i]) for i in range(squares_L.shape[0])})
    return out


def _positions_axis(path, x) -> int | None:
    """Returns the positions axis of a cache array: keys and values are (B, N, S, K) (with
    scan_layers, (L, B, N, S, K)), document numbers (B, S); the index, (B,), has none."""
    name = getattr(path[-1], "key", None)
    if name in ("cached_key", "cached_value"):
        return len(x.shape) - 2
    return 1 if name == "segment" else None


def cache_batch_axis(path) -> int:
    """Returns the rows axis of the cache array at `path`: 1 in the stacked blocks of
    scan_layers (their layer axis leads), else 0."""
    return 1 if getattr(path[0], "key", None) == STACKED else 0


def cache_length(cache) -> int:
    """Returns the positions a decode cache holds."""
    with_positions = [x.shape[axis] for path, x in jax.tree_util.tree_leaves_with_path(cache)
                      if (axis := _positions_axis(path, x)) is not None]
    return with_positions[0]


def init_cache(config: GPTConfig, batch_size: int, length: int | None = None):
    """Returns an empty decode cache: per-layer keys and values for `length` positions
    (default block_size; positions past it are dropped), and each row's length (0)."""
    dummy_B1 = jnp.zeros((batch_size, 1), dtype=jnp.int32)
    shapes = jax.eval_shape(
        lambda: GPT(config).init(jax.random.PRNGKey(0), dummy_B1, decode=True)["cache"])
    length = config.block_size if length is None else length

    def empty(path, s):
        shape = list(s.shape)
        if (axis := _positions_axis(path, s)) is not None:
            shape[axis] = length
        return jnp.zeros(shape, s.dtype)

    return jax.tree_util.tree_map_with_path(empty, shapes)


def grow_cache(cache, length: int):
    """Returns the cache with room for `length` positions: empty ones appended to each array
    that has a positions axis; the index stays."""
    def pad(path, x):
        axis = _positions_axis(path, x)
        if axis is None:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, length - x.shape[axis])
        return jnp.pad(x, widths)

    return jax.tree_util.tree_map_with_path(pad, cache)


def abstract_params(config: GPTConfig):
    """Returns the parameter tree as ShapeDtypeStructs, without allocating anything. The model
    is traced on one token: parameter shapes do not depend on the length, and a whole block
    takes seconds to trace (sample.py reads a checkpoint through this)."""
    dummy_11 = jnp.zeros((1, 1), dtype=jnp.int32)
    return jax.eval_shape(lambda: GPT(config).init(jax.random.PRNGKey(0), dummy_11)["params"])


def count_params(config: GPTConfig) -> dict:
    """Returns {"total": N, "non_embedding": N - position embeddings} (as GPT-2 quotes it)."""
    params = abstract_params(config)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    wpe = params["wpe"].size if "wpe" in params else 0
    return {"total": total, "non_embedding": total - wpe}


def size_report(config: GPTConfig) -> str:
    """Returns a few lines: parameter counts and the memory of params, grads and AdamW state."""
    counts = count_params(config)
    n = counts["total"]
    lines = [
        f"parameters: {n:,} total, {counts['non_embedding']:,} without position embeddings",
    ]
    for dtype, nbytes in (("float32", 4), ("bfloat16", 2)):
        params, grads, adam = n * nbytes, n * nbytes, 2 * n * nbytes
        lines.append(
            f"memory in {dtype}: params {_mib(params)}, grads {_mib(grads)}, "
            f"AdamW state {_mib(adam)}, total {_mib(params + grads + adam)}"
        )
    return "\n".join(lines)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"
