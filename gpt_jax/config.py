"""The full set of training settings with their defaults; recipes in configs/ override a few."""

import importlib.util

import jax
import ml_collections

from gpt_jax import data, optim, profile
from gpt_jax.errors import UserError
from gpt_jax.kernels import sets as kernels
from gpt_jax.model import GPTConfig


def base_config() -> ml_collections.ConfigDict:
    """Returns every field a run reads, set to GPT-2-style defaults."""
    c = ml_collections.ConfigDict()
    c.out_dir = "out/default"
    c.seed = 1337
    c.batch_size = 12  # sequences per optimizer step
    # Micro-batches per optimizer step (accumulated inside the compiled step); each has
    # batch_size / grad_accum_steps sequences.
    c.grad_accum_steps = 1
    # Train this many seeds (seed, seed + 1, ...) at once on one device, through jax.vmap in
    # one compiled step; each is a run of its own in out_dir/seed_<seed>/. For small models.
    c.vmap_seeds = 1
    # Start from pretrained weights: "" (GPT-2 init), or "hf:DIR" / "hf:gpt2" (a Hugging Face
    # GPT-2 model; it sets the model's shape, and block_size may crop its context). Only a run
    # without checkpoints reads it: a resume continues from out_dir.
    c.init_from = ""
    c.max_steps = 5000  # optimizer updates in the whole run
    c.eval_interval = 250
    # How train and val loss are measured every eval_interval steps. "fixed": over the same
    # windows in every run of a corpus (its non-overlapping block_size windows, evenly spread
    # when there are more than eval_tokens tokens), also giving val_bpb (bits per byte).
    # "random": nanoGPT's estimate, eval_iters random micro-batches per split.
    c.eval_mode = "fixed"
    c.eval_tokens = 1 << 20  # fixed: at most this many tokens scored per split
    c.eval_iters = 200  # random: batches per split in each loss estimate
    # lm-evaluation-harness tasks scored at every evaluation (needs the eval extra), comma-
    # separated: harness task names (hellaswag) or paths to task .yaml files. Results go to
    # metrics.jsonl and TensorBoard as eval/<task>/<metric>.
    c.eval_tasks = ""
    c.eval_tasks_limit = 0  # examples per task at each evaluation; 0: all
    c.log_interval = 10
    c.checkpoint_interval = 250
    c.keep_checkpoints = 3  # newest checkpoints kept in out_dir
    c.progress_bar = True  # a tqdm bar (steps, ETA, loss) when stderr is a terminal
    c.wandb_project = ""  # also log to this Weights & Biases project (needs wandb installed)
    # JAX's persistent compilation cache: a rerun of the same config skips compiling.
    # Empty: <cache root>/jax_compile (see data.cache_dir).
    c.compile_cache_dir = ""
    # Steps "A:B" (A < B) whose execution is captured with jax.profiler into out_dir/profile/
    # (TensorBoard's profile tab, or Perfetto): steps A+1 .. B. Empty: no profile.
    c.profile_steps = ""

    # Linear warmup, then lr_schedule: cosine (decay to min_lr at decay_steps, 0: max_steps),
    # wsd (constant, then down to min_lr over the last decay_fraction of decay_steps, along
    # decay_shape: linear | 1-sqrt), inverse_sqrt (the original Transformer's; min_lr unused)
    # or constant.
    c.lr_schedule = "cosine"
    c.learning_rate = 6e-4
    c.min_lr = 6e-5
    c.warmup_steps = 100
    c.decay_steps = 0
    c.decay_fraction = 0.2  # wsd: the share of the run spent cooling down
    c.decay_shape = "linear"  # wsd: linear | 1-sqrt
    # adamw: AdamW on every parameter. muon: Muon (momentum orthogonalised by Newton-Schulz,
    # optax.contrib.muon) on the blocks' 2-D kernels at muon_lr, AdamW on the embeddings, the
    # head, norms and biases at learning_rate; both on lr_schedule's shape.
    c.optimizer = "adamw"
    c.muon_lr = 0.02  # modded-nanogpt's and nanochat's
    c.muon_momentum = 0.95  # Nesterov momentum of Muon
    c.muon_weight_decay = 0.0  # decoupled, times the learning rate, on Muon's matrices
    c.weight_decay = 0.1
    c.beta1 = 0.9
    c.beta2 = 0.95
    c.grad_clip = 1.0  # global-norm clipping; 0 turns it off
    # A step whose loss or gradient norm is NaN/Inf never updates the parameters. False: the
    # run stops with an error naming that step; True: such steps are skipped and counted.
    c.skip_nonfinite = False

    # Devices: mesh.data x mesh.fsdp must equal the device count; -1 fills the rest. The batch
    # is split over both axes; fsdp also shards the large parameters and their AdamW state.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1

    c.data = ml_collections.ConfigDict()
    # A UTF-8 text file, or a directory prepared by nanoGPT (train.bin, val.bin, meta.pkl).
    # Empty: tiny-shakespeare, from $GPT_JAX_SHAKESPEARE or downloaded into cache_dir.
    c.data.path = ""
    c.data.cache_dir = ""  # empty: ~/.cache/gpt_jax (or $GPT_JAX_CACHE)
    c.data.val_fraction = 0.1
    # How a text corpus is tokenised: "char" (its sorted characters) or "gpt2" (tiktoken BPE).
    # Prepared directories carry their own tokenizer in meta.json and ignore this field.
    c.data.tokenizer = "char"
    # Documents (corpora whose documents are separated by <|endoftext|>: GPT-2 BPE, shards).
    # align: none (crops start anywhere) | bos (each training row starts at the start of the
    # document holding its drawn token, as nanochat's rows do). doc_mask: attention does not
    # cross <|endoftext|> within a row (sets model.doc_sep to its id).
    c.data.align = "none"
    c.data.doc_mask = False
    # Batches built (and put on the devices) ahead of the step that needs them, by a
    # background thread; still a pure function of (seed, step). 0: built between steps.
    c.data.prefetch = 2

    c.model = ml_collections.ConfigDict()
    c.model.block_size = 1024
    c.model.n_layer = 12
    c.model.n_head = 12
    c.model.n_embd = 768
    c.model.dropout = 0.0
    c.model.bias = True
    c.model.qkv_bias = True
    # learned | sinusoidal (added to the token embeddings) | rope (rotary: q and k turned by
    # their positions in attention, Llama's half-split layout) | none (the causal mask alone)
    c.model.pos_encoding = "learned"
    c.model.rope_theta = 10000.0  # rope's base: pair i turns by position * theta^(-2i/head_dim)
    c.model.norm_position = "pre"  # pre (GPT-2) | post (the original Transformer's Add & Norm)
    c.model.norm = "layernorm"  # layernorm (GPT-2) | rmsnorm (a learned scale; no mean, no bias)
    c.model.norm_eps = 1e-5  # epsilon of every LayerNorm / RMSNorm (GPT-2's)
    # gelu (tanh approximation) | relu | relu2: relu(x)^2 | swiglu: silu(x W_gate) * (x W_up)
    c.model.activation = "gelu"
    # The MLP's hidden width. None: 4 * n_embd, or with swiglu Llama's rule, 2/3 of 4 * n_embd
    # rounded up to a multiple of 64 (about the parameters of the 4 * n_embd MLP).
    c.model.mlp_hidden = ml_collections.config_dict.placeholder(int)
    c.model.qk_norm = False  # RMSNorm (a learned scale per head dim) on queries and keys
    # Key/value heads: grouped-query attention (1: multi-query); the KV cache holds this many.
    # None: n_head. Must divide n_head.
    c.model.n_kv_head = ml_collections.config_dict.placeholder(int)
    c.model.logit_softcap = 0.0  # logits = c * tanh(logits / c) (Gemma 2); 0: off
    c.model.zero_init_proj = False  # attention's and the MLP's output projections start at 0
    # The layers' implementations (gpt_jax/kernels/): reference (the textbook oracle) | cpu |
    # fused (jax.nn.dot_product_attention) | auto: cpu on a CPU, fused on GPU/TPU.
    c.model.kernels = "auto"
    c.model.attention = "auto"  # the older switch: fused | einsum overrides the attention kernel
    # None: the source's choice. embed_scale: sqrt(n_embd) with sinusoidal positions (the
    # Transformer's), else 1. final_norm: GPT-2's ln_f with pre-LN, none with post-LN.
    c.model.embed_scale = ml_collections.config_dict.placeholder(float)
    c.model.final_norm = ml_collections.config_dict.placeholder(bool)
    c.model.tie_embeddings = True
    # The token that begins a document, across which attention is masked: set by data.doc_mask
    # (None: off).
    c.model.doc_sep = ml_collections.config_dict.placeholder(int)
    c.model.dtype = "auto"  # compute dtype: auto is bfloat16 on GPU/TPU, float32 on CPU
    # The blocks as one nn.scan over parameters stacked along a layer axis ("h"): compile
    # time stops growing with n_layer. Checkpoints of either layout load in the other.
    c.model.scan_layers = False
    # Rematerialisation of each block's activations in the backward pass: none | block (keep
    # only each block's input) | dots (keep the matmul outputs without a batch dimension).
    c.model.remat = "none"
    return c


LR_SCHEDULES = ("cosine", "wsd", "inverse_sqrt", "constant")
OPTIMIZERS = ("adamw", "muon")
EVAL_MODES = ("fixed", "random")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_POSITIVE = ("batch_size", "grad_accum_steps", "vmap_seeds", "max_steps", "eval_interval",
             "eval_iters", "eval_tokens", "log_interval", "checkpoint_interval",
             "keep_checkpoints")


def compute_dtype(name: str, backend: str) -> str:
    """Returns the compute dtype `model.dtype` names on `backend` (resolving "auto")."""
    if name != "auto":
        return name
    return "bfloat16" if backend in ("gpu", "cuda", "rocm", "tpu") else "float32"


def resolve_backend_fields(config: ml_collections.ConfigDict, backend: str
                           ) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with model.dtype and model.kernels chosen for `backend`: the
    one place where a run asks which hardware it is on."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = compute_dtype(config.model.dtype, backend)
    config.model.kernels = kernels.resolve(config.model.kernels, backend)
    return config


def model_config(config: ml_collections.ConfigDict, vocab_size: int,
                 backend: str | None = None) -> GPTConfig:
    """Returns the GPTConfig of `config` on `backend` (default: JAX's), with model.dtype and
    model.kernels resolved for it."""
    backend = backend or jax.default_backend()
    return GPTConfig(vocab_size=vocab_size, **resolve_backend_fields(config, backend).model)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the first field that cannot work."""
    for name in _POSITIVE:
        if config[name] < 1:
            raise UserError(f"{name} must be at least 1, got {config[name]}: set --config.{name}=N")
    if config.batch_size % config.grad_accum_steps:
        raise UserError(
            f"batch_size={config.batch_size} is not divisible by grad_accum_steps="
            f"{config.grad_accum_steps}: make batch_size a multiple of grad_accum_steps")
    if config.init_from and not config.init_from.startswith("hf:"):
        raise UserError(f"init_from={config.init_from!r} is not understood: use hf:DIR (a "
                        "Hugging Face GPT-2 directory) or hf:gpt2, or leave it empty")
    for name in ("warmup_steps", "decay_steps"):
        if config[name] < 0:
            raise UserError(f"{name} must be >= 0, got {config[name]}")
    if config.learning_rate <= 0 or config.min_lr < 0 or config.min_lr > config.learning_rate:
        raise UserError(
            f"need 0 <= min_lr <= learning_rate and learning_rate > 0, got learning_rate="
            f"{config.learning_rate}, min_lr={config.min_lr}"
        )
    if config.eval_mode not in EVAL_MODES:
        raise UserError(f"eval_mode={config.eval_mode!r} is unknown: use one of "
                        f"{', '.join(EVAL_MODES)}")
    if config.eval_mode == "fixed" and config.eval_tokens < config.model.block_size:
        raise UserError(f"eval_tokens={config.eval_tokens} holds no block_size="
                        f"{config.model.block_size} window: raise --config.eval_tokens")
    if config.eval_tasks_limit < 0:
        raise UserError(f"eval_tasks_limit must be >= 0 (0: every example), got "
                        f"{config.eval_tasks_limit}")
    if config.eval_tasks and importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"eval_tasks={config.eval_tasks!r} needs lm-evaluation-harness: "
                        "pip install -e \".[eval]\" (or leave --config.eval_tasks empty)")
    if config.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"lr_schedule={config.lr_schedule!r} is unknown: use one of "
                        f"{', '.join(LR_SCHEDULES)}")
    if not 0.0 < config.decay_fraction <= 1.0:
        raise UserError(f"decay_fraction must be in (0, 1] (the share of the run wsd cools "
                        f"down over), got {config.decay_fraction}")
    if config.decay_shape not in optim.DECAY_SHAPES:
        raise UserError(f"decay_shape={config.decay_shape!r} is unknown: use one of "
                        f"{', '.join(optim.DECAY_SHAPES)}")
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer={config.optimizer!r} is unknown: use one of "
                        f"{', '.join(OPTIMIZERS)}")
    if not config.muon_lr > 0 or not 0.0 <= config.muon_momentum < 1.0:
        raise UserError(f"need muon_lr > 0 and 0 <= muon_momentum < 1, got muon_lr="
                        f"{config.muon_lr}, muon_momentum={config.muon_momentum}")
    if config.muon_weight_decay < 0:
        raise UserError(f"muon_weight_decay must be >= 0, got {config.muon_weight_decay}")
    if config.lr_schedule == "inverse_sqrt" and config.warmup_steps < 1:
        raise UserError("lr_schedule=inverse_sqrt needs warmup_steps >= 1 (it decays as "
                        "sqrt(warmup_steps / step)): set --config.warmup_steps")
    if config.model.dtype not in COMPUTE_DTYPES:
        raise UserError(f"model.dtype={config.model.dtype!r} is unknown: use one of "
                        f"{', '.join(COMPUTE_DTYPES)}")
    if config.data.align not in data.ALIGNS:
        raise UserError(f"data.align={config.data.align!r} is unknown: use one of "
                        f"{', '.join(data.ALIGNS)}")
    if not 0.0 < config.data.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in (0, 1), got {config.data.val_fraction}")
    if config.data.prefetch < 0:
        raise UserError(f"data.prefetch must be >= 0 (0: each batch built when its step "
                        f"starts), got {config.data.prefetch}")
    profile.parse_steps(config.profile_steps, config.max_steps)
    # The model's own checks (sizes, n_embd divisible by n_head, known switches) run here too,
    # before the corpus is read, so that its error is the first one a user sees.
    GPTConfig(vocab_size=1, **config.model.to_dict())
