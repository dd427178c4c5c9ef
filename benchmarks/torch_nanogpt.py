"""nanoGPT's model and train step in PyTorch eager mode, the baseline of `bench.py --mode nanogpt`.

A transcription of nanoGPT's model.py (Andrej Karpathy, MIT licence): the same modules, the
same scaled_dot_product_attention call, nanoGPT's AdamW parameter groups (weight decay on
tensors of two or more dimensions) and its train step (backward, clip_grad_norm_, step,
zero_grad). GELU is nanoGPT's exact `nn.GELU()` unless `gelu="tanh"` (GPT-2's approximation,
which gpt-jax uses; the parity test needs it). `load_params` copies gpt-jax parameters in, as
nanoGPT's `from_pretrained` loads GPT-2: the test checks that both compute the same loss,
gradients and first AdamW update, so the benchmark times the same work on both sides.

Needs torch (the `parity` extra); nothing in gpt_jax/ imports this module. JAX is imported
only by `build` and `load_params`, so benchmarks/memory.py's nanoGPT process has none of it.
"""

import math

import numpy as np

from gpt_jax.errors import UserError


def require_torch():
    try:
        import torch
    except ImportError:
        raise UserError("the nanoGPT baseline needs PyTorch: pip install torch (the CPU build: "
                        "pip install torch --index-url https://download.pytorch.org/whl/cpu)"
                        ) from None
    return torch


def build(config, gelu: str = "none", seed: int = 0):
    """Returns nanoGPT's GPT (a torch.nn.Module, train mode) at a GPTConfig's shapes; raises
    UserError for a model nanoGPT has no equivalent of."""
    from gpt_jax import hf

    blockers = hf.export_blockers(config) + (
        [] if config.qkv_bias or not config.bias else ["qkv_bias=False (nanoGPT has one "
                                                       "bias switch)"])
    if blockers:
        raise UserError(f"nanoGPT has no equivalent of this model: {'; '.join(blockers)}")
    return nanogpt_model(config, gelu, seed)


def nanogpt_model(config, gelu: str = "none", seed: int = 0):
    """Returns nanoGPT's GPT (train mode) at the shapes of `config`, anything with GPTConfig's
    vocab_size, block_size, n_layer, n_head, n_embd, dropout and bias; nothing is checked."""
    torch = require_torch()
    nn, F = torch.nn, torch.nn.functional

    class LayerNorm(nn.Module):
        def __init__(self, ndim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(ndim))
            self.bias = nn.Parameter(torch.zeros(ndim)) if config.bias else None

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
            self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
            self.resid_dropout = nn.Dropout(config.dropout)

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(config.n_embd, dim=2)
            q, k, v = (a.view(B, T, config.n_head, C // config.n_head).transpose(1, 2)
                       for a in (q, k, v))
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=config.dropout if self.training else 0,
                is_causal=True)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.resid_dropout(self.c_proj(y))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
            self.gelu = nn.GELU(approximate=gelu)
            self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
            self.dropout = nn.Dropout(config.dropout)

        def forward(self, x):
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = LayerNorm(config.n_embd), CausalSelfAttention()
            self.ln_2, self.mlp = LayerNorm(config.n_embd), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block() for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd)))
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
            self.apply(self._init_weights)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

        def _init_weights(self, module):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)

        def forward(self, idx, targets):
            pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)

    torch.manual_seed(seed)
    return GPT().train()


def load_params(model, params: dict, config) -> None:
    """Copies gpt-jax `params` into `model` (nanoGPT's from_pretrained, from our tree; config
    is their GPTConfig)."""
    from gpt_jax import hf

    torch = require_torch()
    state = model.state_dict()
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")  # Conv1D (in, out) in GPT-2, Linear (out, in) here
    with torch.no_grad():
        for name, value in hf.tensors_from_params(params, config).items():
            if name not in state:  # a bias of a bias=False model: written as zeros
                continue
            value = value.T if name.endswith(transposed) else value
            state[name].copy_(torch.from_numpy(np.array(value, np.float32)))


def make_optimizer(model, config):
    """Returns nanoGPT's AdamW (decay on >= 2-D tensors) at the config's peak learning rate."""
    torch = require_torch()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                             eps=1e-8)


def train_step(model, optimizer, x, y, grad_clip: float):
    """One nanoGPT update on the batch (x, y); returns the loss tensor (not synchronised)."""
    torch = require_torch()
    loss = model(x, y)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss
