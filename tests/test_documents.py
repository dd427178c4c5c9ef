"""Documents: batches aligned to document starts (data.align=bos) and attention that does not
cross <|endoftext|> (data.doc_mask), through every kernel set and the KV-cache sampler."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import checkpoint, data, sampling, shards, trainer
from gpt_jax.errors import UserError
from gpt_jax.kernels import reference
from gpt_jax.kernels import sets as kernels
from gpt_jax.model import GPT, GPTConfig, init_params

EOT = 50256


def _corpus(n=20_000, seed=0, first_eot=False):
    """Returns GPT-2 ids: documents of 1 to 300 tokens, each ended by <|endoftext|> (as
    gpt_jax.prepare writes them), or begun by one (llm.c's layout) with first_eot."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, EOT, n).astype(np.uint16)
    ends = np.cumsum(rng.integers(1, 300, n // 2))
    tokens[ends[ends < n]] = EOT
    if first_eot:
        tokens[0] = EOT
    return tokens


@pytest.mark.parametrize("first_eot", [False, True], ids=["prepare's", "llm.c's"])
def test_every_aligned_row_starts_after_an_end_of_text(first_eot):
    tokens = _corpus(first_eot=first_eot)
    sep_at = np.flatnonzero(tokens == EOT)
    for step in range(40):
        kwargs = dict(batch_size=16, block_size=64, seed=3, step=step)
        inputs, targets = data.get_batch(tokens, align_to=EOT, **kwargs)
        starts = np.random.default_rng((3, 0, step)).integers(0, len(tokens) - 64, size=16)
        aligned = data.document_starts(tokens, starts, EOT)
        for s, at, row in zip(aligned, starts, inputs):
            # the start of the document holding the drawn token: no separator in between
            assert s <= at and not (tokens[s:at] == EOT).any()
            assert tokens[s - 1] == EOT if s else not first_eot
            np.testing.assert_array_equal(row, tokens[s:s + 64])
        np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
        again = data.get_batch(tokens, align_to=EOT, **kwargs)  # a pure function of the step
        np.testing.assert_array_equal(again[0], inputs)
        rows = data.get_batch(tokens, align_to=EOT, rows=slice(4, 12), **kwargs)
        np.testing.assert_array_equal(rows[0], inputs[4:12])  # one process's rows
    assert len(sep_at) > 100


def test_document_starts_search_back_past_a_window():
    tokens = np.full(3 * data.DOCUMENT_SEARCH, 7, np.uint16)
    tokens[10] = EOT
    at = np.array([5, 10, 11, 2 * data.DOCUMENT_SEARCH + 5, len(tokens) - 1])
    assert data.document_starts(tokens, at, EOT).tolist() == [0, 0, 11, 11, 11]


def test_aligned_batches_read_shards_as_the_concatenated_tokens(tmp_path):
    tokens = _corpus(first_eot=True)
    for i, part in enumerate(np.split(tokens, [4000, 4001, 11_000])):
        shards.write_shard(tmp_path / f"c_train_{i:06d}.bin", part)
    shards.write_shard(tmp_path / "c_val_000000.bin", tokens[:500])
    ds = data.read_prepared(tmp_path)
    for step in range(10):
        kwargs = dict(batch_size=8, block_size=128, seed=1, step=step, align_to=EOT)
        np.testing.assert_array_equal(data.get_batch(ds.train, **kwargs)[0],
                                      data.get_batch(tokens, **kwargs)[0])


def test_documents_need_an_end_of_text_token(tmp_path, tiny_config):
    tiny_config.data.align = "bos"
    with pytest.raises(UserError, match="data.align=bos needs documents separated by "):
        trainer.run(tiny_config)  # tiny-shakespeare by characters
    tiny_config.data.align, tiny_config.data.doc_mask = "none", True
    with pytest.raises(UserError, match="data.doc_mask needs documents separated by "):
        trainer.run(tiny_config)
    tiny_config.data.align = "eos"
    with pytest.raises(UserError, match="data.align='eos' is unknown: use one of none, bos"):
        trainer.run(tiny_config)
    for split in ("train", "val"):  # GPT-2 ids without a single separator
        shards.write_shard(tmp_path / f"c_{split}_0.bin", np.arange(3000, dtype=np.uint16))
    tiny_config.data.path, tiny_config.data.align = str(tmp_path), "bos"
    with pytest.raises(UserError, match=r"found no <\|endoftext\|> \(50256\) in the first 3,000"):
        trainer.run(tiny_config)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the mask

def _normal(shape, seed):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


@pytest.mark.parametrize("name", ["reference", "cpu", "fused"])
@pytest.mark.parametrize("T", [16, 256], ids=["one block", "two blocks"])
def test_masked_attention_is_attention_within_each_document(name, T):
    # The oracle: the reference kernel run on each document alone.
    q, k, v = (_normal((2, T, 2, 8), s) for s in range(3))
    cuts = [[0, 5, T // 2 + 3, T], [0, T]]  # row 0: three documents; row 1: one
    segments = np.zeros((2, T), np.int32)
    for d, (lo, hi) in enumerate(zip(cuts[0], cuts[0][1:])):
        segments[0, lo:hi] = d
    opts = dict(dropout_rate=0.0, rng=None, dtype=jnp.float32)
    got = jax.jit(lambda q, k, v, s: kernels.SETS[name].causal_attention(
        q, k, v, segments_BT=s, **opts))(q, k, v, jnp.asarray(segments))
    for b, row_cuts in enumerate(cuts):
        for lo, hi in zip(row_cuts, row_cuts[1:]):
            alone = reference.causal_attention(q[b:b + 1, lo:hi], k[b:b + 1, lo:hi],
                                               v[b:b + 1, lo:hi], **opts)
            np.testing.assert_allclose(got[b:b + 1, lo:hi], alone, rtol=1e-5, atol=1e-5)


def test_cpu_masked_attention_with_dropout_equals_the_reference():
    q, k, v = (_normal((2, 256, 2, 8), s) for s in range(3))
    segments = jnp.asarray(np.repeat(np.arange(4), 64)[None].repeat(2, 0), jnp.int32)
    opts = dict(dropout_rate=0.2, rng=jax.random.PRNGKey(4), dtype=jnp.float32,
                segments_BT=segments)

    def value_and_grads(kernel):
        return jax.jit(lambda *a: jax.value_and_grad(
            lambda q, k, v: (kernel(q, k, v, **opts) ** 2).sum(), argnums=(0, 1, 2))(*a))(q, k, v)

    for ours, ref in zip(jax.tree.leaves(value_and_grads(kernels.SETS["cpu"].causal_attention)),
                         jax.tree.leaves(value_and_grads(reference.causal_attention))):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_a_documents_logits_do_not_depend_on_the_document_before_it(pos_encoding):
    cfg = GPTConfig(vocab_size=64, block_size=48, n_layer=2, n_head=2, n_embd=32,
                    pos_encoding=pos_encoding, doc_sep=0)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    doc = np.concatenate([[0], rng.integers(1, 64, 20)])  # <sep> and its text
    # rope's logits depend on offsets only: a shorter first document may shift the second
    firsts = [rng.integers(1, 64, 27), rng.integers(1, 64, 27)]
    if pos_encoding == "rope":
        firsts.append(rng.integers(1, 64, 11))
    logits = []
    for first in firsts:
        row = jnp.asarray(np.concatenate([first, doc])[None], jnp.int32)
        logits.append(GPT(cfg).apply({"params": params}, row)[0, len(first):])
    for other in logits[1:]:
        np.testing.assert_allclose(other, logits[0], rtol=1e-4, atol=1e-4)
    # without the mask the document sees the text before it
    plain = dataclasses.replace(cfg, doc_sep=None)
    rows = [jnp.asarray(np.concatenate([f, doc])[None], jnp.int32) for f in firsts[:2]]
    a, b = (GPT(plain).apply({"params": params}, r)[0, 27:] for r in rows)
    assert np.abs(np.asarray(a - b)).max() > 1e-3


def test_cached_sampling_keeps_documents_apart_as_full_recompute_does():
    # A 6-token vocabulary whose separator (0) is often drawn; block 32 with 80 new tokens:
    # the cache grows, then the window slides, across document boundaries.
    cfg = GPTConfig(vocab_size=6, block_size=32, n_layer=2, n_head=2, n_embd=16, doc_sep=0)
    params = jax.tree.map(lambda p: 10 * p, init_params(cfg, jax.random.PRNGKey(2)))  # peaky
    prompts = [[3, 1, 0, 4, 1], [5, 0, 0, 2, 3, 4, 5, 1, 0, 2]]
    options = {"max_new_tokens": 80, "temperature": 1.5, "seed": 11}
    tokens = sampling.generate(params, cfg, prompts, **options)
    np.testing.assert_array_equal(
        sampling.generate(params, cfg, prompts, use_cache=False, **options), tokens)
    np.testing.assert_array_equal(
        np.stack(list(sampling.stream(params, cfg, prompts, **options)), axis=1), tokens)
    assert (tokens == 0).sum() > 5
    unmasked = sampling.generate(params, dataclasses.replace(cfg, doc_sep=None), prompts,
                                 **options)
    assert (unmasked != tokens).any()


def test_a_run_with_aligned_masked_documents_saves_its_separator(tmp_path, tiny_config):
    for split, seed in (("train", 0), ("val", 1)):  # GPT-2 BPE shards (no meta.json)
        shards.write_shard(tmp_path / f"c_{split}_000000.bin", _corpus(5000, seed))
    tiny_config.data.path, tiny_config.max_steps = str(tmp_path), 4
    tiny_config.data.align, tiny_config.data.doc_mask = "bos", True
    last = trainer.run(tiny_config)
    assert last["step"] == 4 and np.isfinite(last["val_loss"])
    _, config, _, _ = checkpoint.load_model(tiny_config.out_dir)
    assert config.doc_sep == EOT
