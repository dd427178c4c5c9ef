"""The GPT model: GPTConfig plus small Flax linen modules, read top to bottom like GPT-2."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.dropout import Dropout
from gpt_jax.errors import UserError
from gpt_jax.matmul import dense_dot_general

POS_ENCODINGS = ("learned", "sinusoidal", "none")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu", "relu")
ATTENTIONS = ("auto", "fused", "einsum")


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
    pos_encoding: str = "learned"  # learned | sinusoidal | none (causal attention alone)
    norm_position: str = "pre"  # pre: x + f(ln(x)) (GPT-2); post: ln(x + f(x)) (Transformer)
    activation: str = "gelu"  # MLP nonlinearity: gelu (tanh approximation, GPT-2) | relu
    # Training-path attention: fused (jax.nn.dot_product_attention), einsum (written out), or
    # auto: fused on GPU/TPU, einsum on CPU. Same math; the fused op skips attention dropout.
    attention: str = "auto"
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    dtype: str = "float32"  # compute dtype; parameters stay float32

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
        for name, allowed in (("pos_encoding", POS_ENCODINGS),
                              ("norm_position", NORM_POSITIONS), ("activation", ACTIVATIONS),
                              ("attention", ATTENTIONS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"model.{name}={getattr(self, name)!r} is unknown: use one of "
                                f"{', '.join(allowed)}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


def _dense(config: GPTConfig, features: int, name: str, std: float = 0.02, use_bias=None):
    return nn.Dense(
        features,
        use_bias=config.bias if use_bias is None else use_bias,
        dtype=config.compute_dtype,
        kernel_init=nn.initializers.normal(std),
        bias_init=nn.initializers.zeros,
        dot_general=dense_dot_general,
        name=name,
    )


def _on_rows(layer, x_BTD: jax.Array) -> jax.Array:
    """Applies `layer` (a Dense, or wte.attend) to the (B*T, D) matrix view of x_BTD.

    Same math as layer(x_BTD), but XLA:CPU compiles the backward of a 2-D matmul far better:
    with the 3-D input the weight gradient contracts over two dims (B and T), and XLA
    materializes a transposed copy of the incoming gradient, re-fusing the whole GELU backward
    into that strided copy (~20% of the train step on a 2-core CPU).
    """
    y_ND = layer(x_BTD.reshape(-1, x_BTD.shape[-1]))
    return y_ND.reshape(*x_BTD.shape[:-1], y_ND.shape[-1])


def _attention_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """Returns jnp.einsum(spec, a, b), an einsum batched over the leading (batch) axis of both.

    On the CPU it runs as two einsums over the two halves of the batch: XLA:CPU runs each
    batched matmul on one thread, and smaller batches run faster per FLOP. Measured in-process
    A/B on the train step: baby GPT 1.03x (9.46 vs 9.70 s/step), CPU recipe 1.01x; four
    pieces were slower than two. Rows never mix, so the values are the same either way.
    """
    n = a.shape[0]
    if jax.default_backend() != "cpu" or n % 2:
        return jnp.einsum(spec, a, b)
    halves = zip(jnp.split(a, 2), jnp.split(b, 2), strict=True)
    return jnp.concatenate([jnp.einsum(spec, x, y) for x, y in halves])


def _masked_softmax(scores_BHTS: jax.Array, visible, dtype) -> jax.Array:
    """Returns the softmax over the last axis of the visible scores, in float32, cast to dtype."""
    scores_BHTS = jnp.where(visible, scores_BHTS.astype(jnp.float32), -jnp.inf)
    return jax.nn.softmax(scores_BHTS, axis=-1).astype(dtype)


ATTENTION_BLOCK = 128  # query/key block of the CPU's causal attention (see _causal)


def query_blocks(T: int) -> int:
    """Returns how many blocks of queries causal attention over T positions goes in: blocks of
    ATTENTION_BLOCK on the CPU when T is a multiple of it and at least twice it, else one.
    Measured at T = 256; blocks of 64 were slower (0.91x against blocks of 128)."""
    if jax.default_backend() != "cpu" or T % ATTENTION_BLOCK or T < 2 * ATTENTION_BLOCK:
        return 1
    return T // ATTENTION_BLOCK


def _layer_norm(config: GPTConfig, name: str) -> nn.LayerNorm:
    # GPT-2 uses eps 1e-5 (PyTorch's default), not Flax's 1e-6.
    return nn.LayerNorm(epsilon=1e-5, use_bias=config.bias, dtype=jnp.float32, name=name)


def _residual_std(config: GPTConfig) -> float:
    # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer).
    return 0.02 / math.sqrt(2 * config.n_layer)


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

    In decode mode the keys and values of every position seen so far live in the `cache`
    collection, (B, H, block_size, K) each (heads before positions: XLA:CPU then reads them
    without a transposed copy): the new ones are written at `positions_BT` and each query
    attends to the cached positions up to its own.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True,
                 positions_BT: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        B, T, D = x_BTD.shape
        H = cfg.n_head
        qkv_BT3D = _on_rows(_dense(cfg, 3 * D, "c_attn", use_bias=cfg.bias and cfg.qkv_bias), x_BTD)
        q_BTHK, k_BTHK, v_BTHK = (
            a.reshape(B, T, H, D // H) for a in jnp.split(qkv_BT3D, 3, axis=-1)
        )
        if positions_BT is None and self._fused(deterministic):
            # One fused op (cuDNN flash attention on GPUs); softmax statistics in float32.
            y_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True)
            y_BTD = _on_rows(_dense(cfg, D, "c_proj", std=_residual_std(cfg)),
                             y_BTHK.reshape(B, T, D))
            return Dropout(cfg.dropout)(y_BTD, deterministic=deterministic)
        if positions_BT is None:
            y_BTHK = self._causal(q_BTHK, k_BTHK, v_BTHK, deterministic)
        else:
            keys, values = self._cached(k_BTHK, v_BTHK, positions_BT)
            visible = (jnp.arange(cfg.block_size) <= positions_BT[:, :, None])[:, None]  # BHTS
            scores_BHTS = jnp.einsum("bthk,bhsk->bhts", q_BTHK, keys) / math.sqrt(D // H)
            probs_BHTS = _masked_softmax(scores_BHTS, visible, cfg.compute_dtype)
            probs_BHTS = Dropout(cfg.dropout)(probs_BHTS, deterministic=deterministic)
            y_BTHK = jnp.einsum("bhts,bhsk->bthk", probs_BHTS, values)
        y_BTD = _on_rows(_dense(cfg, D, "c_proj", std=_residual_std(cfg)), y_BTHK.reshape(B, T, D))
        return Dropout(cfg.dropout)(y_BTD, deterministic=deterministic)

    def _causal(self, q_BTHK, k_BTHK, v_BTHK, deterministic: bool) -> jax.Array:
        """Returns causal softmax attention, (B, T, H, K): each position attends to itself and
        the positions before it.

        The queries go in n = query_blocks(T) blocks, and block i scores only the key blocks
        0..i: the blocks above the diagonal are masked whole, so on the baby GPT (T = 256,
        two blocks) a quarter of the attention matmuls is skipped (train step 1.13x on 2 CPU
        cores, in-process A/B; 1.16x without dropout). Each row's softmax spans the same keys
        as the whole (T, T) matrix would, and dropout draws that matrix's masks, sliced.
        """
        cfg = self.config
        B, T, H, K = q_BTHK.shape
        n = query_blocks(T)
        Tb = T // n
        qs, ks, vs = (jnp.split(a, n, axis=1) for a in (q_BTHK, k_BTHK, v_BTHK))
        probs = []
        for i in range(n):
            scores_BHTS = jnp.concatenate([_attention_einsum("bthk,bshk->bhts", qs[i], k)
                                           for k in ks[:i + 1]], axis=-1) / math.sqrt(K)
            visible = jnp.arange((i + 1) * Tb)[None, :] <= (i * Tb + jnp.arange(Tb))[:, None]
            probs.append(_masked_softmax(scores_BHTS, visible, cfg.compute_dtype))
        probs = Dropout(cfg.dropout).windows(probs, (B, H, T, T),
                                             [(0, 0, i * Tb, 0) for i in range(n)], deterministic)
        ys = []
        for i, probs_BHTS in enumerate(probs):
            parts = jnp.split(probs_BHTS, i + 1, axis=-1)
            y_BTHK = _attention_einsum("bhts,bshk->bthk", parts[0], vs[0])
            for p_BHTS, v_BTHK in zip(parts[1:], vs[1:i + 1], strict=True):
                y_BTHK = y_BTHK + _attention_einsum("bhts,bshk->bthk", p_BHTS, v_BTHK)
            ys.append(y_BTHK)
        return ys[0] if n == 1 else jnp.concatenate(ys, axis=1)

    def _fused(self, deterministic: bool) -> bool:
        """Whether to use jax.nn.dot_product_attention: on accelerators (auto) or when asked,
        and never with attention dropout, which the fused op does not do. On XLA:CPU the
        written-out path is ~1.1x faster (measured on the CPU recipe), so auto keeps it there."""
        if not deterministic and self.config.dropout > 0:
            return False
        if self.config.attention == "auto":
            return jax.default_backend() != "cpu"
        return self.config.attention == "fused"

    def _cached(self, k_BTHK, v_BTHK, positions_BT):
        """Writes the new keys and values at their positions; returns the whole (B, H, S, K) cache."""
        B, _, H, K = k_BTHK.shape
        shape = (B, H, self.config.block_size, K)
        cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k_BTHK.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v_BTHK.dtype)
        at = (jnp.arange(B)[:, None, None], jnp.arange(H)[None, :, None], positions_BT[:, None, :])
        # Positions past block_size (padding beyond a full window) are dropped, not clamped.
        cached_k.value = cached_k.value.at[at].set(k_BTHK.transpose(0, 2, 1, 3), mode="drop")
        cached_v.value = cached_v.value.at[at].set(v_BTHK.transpose(0, 2, 1, 3), mode="drop")
        return cached_k.value, cached_v.value


class MLP(nn.Module):
    """Position-wise feed-forward network of width 4 * n_embd with tanh-approximated GELU."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        h_BTF = _on_rows(_dense(cfg, 4 * cfg.n_embd, "c_fc"), x_BTD)
        if cfg.activation == "gelu":
            h_BTF = nn.gelu(h_BTF, approximate=True)
        else:
            h_BTF = nn.relu(h_BTF)
        y_BTD = _on_rows(_dense(cfg, cfg.n_embd, "c_proj", std=_residual_std(cfg)), h_BTF)
        return Dropout(cfg.dropout)(y_BTD, deterministic=deterministic)


class Block(nn.Module):
    """One transformer block. Pre-LayerNorm (GPT-2): x + attn(ln(x)), then x + mlp(ln(x)).
    Post-LayerNorm ("Add & Norm", the original Transformer): ln(x + attn(x)), ln(x + mlp(x))."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True,
                 positions_BT: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        attn, mlp = CausalSelfAttention(cfg, name="attn"), MLP(cfg, name="mlp")
        ln_1, ln_2 = _layer_norm(cfg, "ln_1"), _layer_norm(cfg, "ln_2")
        if cfg.norm_position == "post":
            x_BTD = ln_1(x_BTD + attn(x_BTD.astype(cfg.compute_dtype), deterministic,
                                      positions_BT))
            return ln_2(x_BTD + mlp(x_BTD.astype(cfg.compute_dtype), deterministic))
        h_BTD = ln_1(x_BTD).astype(cfg.compute_dtype)
        x_BTD = x_BTD + attn(h_BTD, deterministic, positions_BT)
        h_BTD = ln_2(x_BTD).astype(cfg.compute_dtype)
        return x_BTD + mlp(h_BTD, deterministic)


class GPT(nn.Module):
    """GPT-2 language model: token ids (B, T) -> next-token logits (B, T, vocab_size) in float32.

    Dropout is active only when the module is applied with a 'dropout' rng.

    With decode=True the same parameters run against the `cache` collection (see init_cache):
    row b of idx_BT sits at positions index[b], index[b] + 1, ... after the tokens already cached,
    and attends to all of them. index[b] then advances by lengths_B[b] (default T): the rest of
    the row is right padding, which no later token ever attends to.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, idx_BT: jax.Array, decode: bool = False,
                 lengths_B: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        B, T = idx_BT.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        deterministic = not self.has_rng("dropout")
        wte = nn.Embed(
            cfg.vocab_size, cfg.n_embd, embedding_init=nn.initializers.normal(0.02), name="wte"
        )
        x_BTD = wte(idx_BT)
        if cfg.pos_encoding == "learned":
            wpe_SD = self.param("wpe", nn.initializers.normal(0.02), (cfg.block_size, cfg.n_embd))
        elif cfg.pos_encoding == "sinusoidal":
            wpe_SD = sinusoidal_positions(cfg.block_size, cfg.n_embd)
        else:  # no position signal: the causal mask alone tells positions apart
            wpe_SD = jnp.zeros((cfg.block_size, cfg.n_embd), jnp.float32)
        positions_BT = None
        if decode:
            index = self.variable("cache", "index", jnp.zeros, (B,), jnp.int32)
            positions_BT = index.value[:, None] + jnp.arange(T, dtype=jnp.int32)
            index.value = index.value + (T if lengths_B is None else lengths_B)
            x_BTD = x_BTD + jnp.take(wpe_SD, positions_BT, axis=0, mode="clip")
        else:
            x_BTD = x_BTD + wpe_SD[:T]
        x_BTD = Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
        for i in range(cfg.n_layer):
            x_BTD = Block(cfg, name=f"h_{i}")(x_BTD, deterministic, positions_BT)
        x_BTD = _layer_norm(cfg, "ln_f")(x_BTD).astype(cfg.compute_dtype)
        if cfg.tie_embeddings:
            logits_BTV = _on_rows(wte.attend, x_BTD)
        else:
            logits_BTV = _on_rows(_dense(cfg, cfg.vocab_size, "lm_head", use_bias=False), x_BTD)
        return logits_BTV.astype(jnp.float32)


def init_params(config: GPTConfig, rng: jax.Array):
    """Returns freshly initialised parameters (GPT-2 initialisation) for `config`."""
    dummy_BT = jnp.zeros((1, config.block_size), dtype=jnp.int32)
    return jax.jit(lambda key: GPT(config).init(key, dummy_BT)["params"])(rng)


def init_cache(config: GPTConfig, batch_size: int):
    """Returns an empty decode cache: per-layer keys and values, and each row's length (0)."""
    dummy_B1 = jnp.zeros((batch_size, 1), dtype=jnp.int32)
    shapes = jax.eval_shape(
        lambda: GPT(config).init(jax.random.PRNGKey(0), dummy_B1, decode=True)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def abstract_params(config: GPTConfig):
    """Returns the parameter tree as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


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
