"""Scores a checkpoint on lm-evaluation-harness tasks: HellaSwag, MMLU, ..., or local YAML ones.

    python -m gpt_jax.lm_eval --checkpoint out/shakespeare \
        --tasks tests/data/lm_eval/local_hellaswag.yaml,tests/data/lm_eval/local_prose.yaml
    python -m gpt_jax.lm_eval --init_from hf:gpt2 --tasks hellaswag --batch_size 32

Prints the harness's results table; --output_path FILE writes its results as JSON. --tasks is a
comma-separated list of harness task names and paths to task YAML files (a file's directory is
searched for its task and the tasks it includes). The harness's built-in tasks download their
datasets from the Hugging Face hub on first use; a task found locally needs no network. Needs
the `eval` extra: pip install -e ".[eval]".

The model is the harness's causal LM, computed by gpt-jax: a context longer than block_size is
cut from the left (the HF backend's rule), documents are scored whole in windows of block_size
tokens conditioned on <|endoftext|> (a character-level model, which has none, on a newline),
and generation runs through gpt_jax.sampling's KV cache. Requests are sorted by length and
padded to --batch_size rows and a power-of-two length (16 up to block_size), so scoring
compiles at most once per length bucket: 7 times for block_size 1024, once for 16 (generation
compiles once per prompt bucket and max_gen_toks). A continuation longer than block_size
(character models) is scored in block_size pieces, each after the tokens before it.
"""

import collections
import contextlib
import functools
import json
import logging
import sys
import time
import unittest.mock
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gpt_jax import entry, inference, sampling, tokenization
from gpt_jax.errors import UserError
from gpt_jax.model import GPT, GPTConfig

PyTree = Any
Request = tuple[list[int], list[int]]  # (context tokens, continuation tokens)

DEFAULT_BATCH_SIZE = 16
MAX_GEN_TOKS = 256  # the harness's default when a generate_until task sets none

# Scoring-function traces per model config; each trace is one compilation.
_TRACES: collections.Counter = collections.Counter()


# --------------------------------------------------------------------------- scoring


@functools.cache
def score_fn(config: GPTConfig):
    """Returns the jitted (params, tokens_BT, targets_BT, last_B) -> (logp_BT, greedy_BT, last_BV).

    logp_BT is the float32 log-softmax of each target token; greedy_BT whether it is the argmax;
    last_BV the whole log-softmax at position last_B (a row's last real token), from which
    requests that share all but their final token are scored together.
    """
    model = GPT(config)

    def score(params, tokens_BT, targets_BT, last_B):
        _TRACES[config] += 1  # runs only while tracing: once per compiled shape
        logits_BTV = model.apply({"params": params}, tokens_BT).astype(jnp.float32)
        logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
        target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
        greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
        last_BV = jax.nn.log_softmax(logits_BTV[jnp.arange(tokens_BT.shape[0]), last_B], axis=-1)
        return target_BT - logz_BT, greedy_BT, last_BV

    return jax.jit(score)


class Scorer:
    """Log-likelihoods of continuations under one model, in padded batches of few shapes.

    Counts the requests scored, their seconds (compilation excluded) and the compilations.
    """

    def __init__(self, params: PyTree, config: GPTConfig, batch_size: int = DEFAULT_BATCH_SIZE,
                 progress: bool = False):
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        self.params = jax.device_put(params)  # once, not on every call
        self.config, self.batch_size, self.progress = config, batch_size, progress
        self.requests, self.seconds, self.compile_seconds = 0, 0.0, 0.0
        self._traces_before = _TRACES[config]

    @property
    def compilations(self) -> int:
        """Returns the scoring function's compilations since this scorer was made."""
        return _TRACES[self.config] - self._traces_before

    def __call__(self, requests: Sequence[Request], desc: str = "loglikelihood"
                 ) -> list[tuple[float, bool]]:
        """Returns (log-likelihood, is_greedy) of each continuation given its context.

        The model sees the last block_size tokens of context + continuation, minus the final
        token (the harness's HF backend does the same). A continuation longer than block_size
        (character models) is scored in pieces of block_size tokens, each after the tokens
        before it, as rolling windows are. Requests equal but for their last token (answer
        letters after one question) share one forward pass.
        """
        start = time.perf_counter()
        L = self.config.block_size
        pieces, owners = [], []
        for i, (context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise UserError(f"cannot score a continuation of {len(continuation)} tokens "
                                f"after {len(context)}: both need at least one")
            for s in range(0, len(continuation), L):
                pieces.append((context + continuation[:s], continuation[s: s + L]))
                owners.append(i)
        logp, greedy = np.zeros(len(requests)), np.ones(len(requests), bool)
        with sampling.compile_watch() as compiling:
            scores = self._score(pieces, desc)
        for i, (piece_logp, piece_greedy) in zip(owners, scores):
            logp[i] += piece_logp
            greedy[i] &= piece_greedy
        self.requests += len(requests)
        self.seconds += time.perf_counter() - start - compiling.seconds
        self.compile_seconds += compiling.seconds
        return [(float(lp), bool(g)) for lp, g in zip(logp, greedy)]

    def _score(self, requests: Sequence[Request], desc: str) -> list[tuple[float, bool]]:
        """Returns (log-likelihood, is_greedy) of continuations of at most block_size tokens."""
        L = self.config.block_size
        groups: dict[tuple, list[int]] = {}
        for i, (context, continuation) in enumerate(requests):
            groups.setdefault(tuple(context + continuation[:-1]), []).append(i)
        # Longest first, as the HF backend sorts: batches hold rows of similar length.
        order = sorted(groups.values(), key=lambda g: (-len(requests[g[0]][0])
                                                       - len(requests[g[0]][1]), g[0]))
        results: list[tuple[float, bool]] = [None] * len(requests)  # type: ignore[list-item]
        bar = tqdm.tqdm(total=len(requests), desc=desc, file=sys.stderr, leave=False,
                        disable=None if self.progress else True)
        for b in range(0, len(order), self.batch_size):
            chunk = order[b: b + self.batch_size]
            rows = []
            for members in chunk:
                context, continuation = requests[max(members, key=lambda i: len(requests[i][1]))]
                rows.append((context + continuation)[-(L + 1):])
            T = sampling.prompt_bucket(max(len(r) - 1 for r in rows), L)
            tokens_BT = np.zeros((self.batch_size, T), np.int32)
            targets_BT = np.zeros((self.batch_size, T), np.int32)
            last_B = np.zeros(self.batch_size, np.int32)
            for i, row in enumerate(rows):
                tokens_BT[i, : len(row) - 1], targets_BT[i, : len(row) - 1] = row[:-1], row[1:]
                last_B[i] = len(row) - 2
            logp_BT, greedy_BT, last_BV = jax.device_get(
                score_fn(self.config)(self.params, tokens_BT, targets_BT, last_B))
            for i, members in enumerate(chunk):
                end = last_B[i]  # the position that predicts a member's final token
                for m in members:
                    continuation = requests[m][1]
                    span = slice(end + 1 - len(continuation), end)
                    logp = logp_BT[i, span].sum(dtype=np.float64) + last_BV[i, continuation[-1]]
                    greedy = greedy_BT[i, span].all() and np.argmax(last_BV[i]) == continuation[-1]
                    results[m] = (float(logp), bool(greedy))
            bar.update(sum(len(m) for m in chunk))
        bar.close()
        return results


def rolling_prefix(tokenizer) -> int:
    """Returns the token a document is conditioned on: <|endoftext|>, or for a character
    tokenizer (no such token) a newline, or token 0 when the vocabulary has no newline."""
    eot = tokenization.end_of_text(tokenizer)
    if eot is not None:
        return eot
    return tokenizer.encode("\n")[0] if "\n" in getattr(tokenizer, "chars", "") else 0


# --------------------------------------------------------------------------- the harness's LM


def _harness():
    try:
        import lm_eval
        import lm_eval.api.model
        import lm_eval.api.registry
        import lm_eval.models.utils
        import lm_eval.tasks
        import lm_eval.utils
    except ImportError:
        raise UserError("lm-evaluation-harness is not installed: pip install -e \".[eval]\" "
                        "(or pip install lm-eval)") from None
    return lm_eval


@functools.cache
def _model_class():
    """Returns the harness model class (built on first use: lm_eval is an optional extra)."""
    lm_eval = _harness()
    Collator = lm_eval.models.utils.Collator

    class GPTJaxLM(lm_eval.api.model.TemplateLM):
        """A gpt-jax model as the harness's causal LM: loglikelihood, rolling and generation."""

        def __init__(self, params, config: GPTConfig, tokenizer, *,
                     batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False, seed: int = 0):
            super().__init__()
            self.scorer = Scorer(params, config, batch_size, progress)
            self.config, self.tokenizer, self.seed = config, tokenizer, seed

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config=None):
            """Returns the model that `--model gpt-jax --model_args checkpoint=DIR` (or
            init_from=hf:DIR, step=N, batch_size=B) names, for the harness's own CLI."""
            args = {**lm_eval.utils.simple_parse_args_string(arg_string),
                    **{k: v for k, v in (additional_config or {}).items() if v is not None}}
            config, params, tokenizer, _ = inference.load_for_inference(
                args.get("checkpoint"), args.get("init_from", ""), args.get("step"))
            batch_size = args.get("batch_size", DEFAULT_BATCH_SIZE)
            return cls(params, config, tokenizer,
                       batch_size=DEFAULT_BATCH_SIZE if batch_size == "auto" else int(batch_size))

        @property
        def eot_token_id(self) -> int:
            return rolling_prefix(self.tokenizer)

        @property
        def max_length(self) -> int:
            return self.config.block_size

        @property
        def batch_size(self) -> int:
            return self.scorer.batch_size

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return self.tokenizer.encode(string)

        def tok_decode(self, tokens) -> str:
            return self.tokenizer.decode(tokens)

        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            results = self.scorer([(ctx, cont) for _, ctx, cont in requests])
            for (strings, _, _), answer in zip(requests, results, strict=True):
                if strings is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, answer)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owners = [], []
            for i, (text,) in enumerate(r.args for r in requests):
                for context, continuation in map(
                        lm_eval.utils.make_disjoint_window, lm_eval.utils.get_rolling_token_windows(
                            token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                            max_seq_len=self.max_length, context_len=1)):
                    windows.append((context, continuation))
                    owners.append(i)
            scores = self.scorer(windows, "loglikelihood_rolling windows")
            totals = [0.0] * len(requests)
            for i, (logp, _) in zip(owners, scores, strict=True):
                totals[i] += logp
            for request, total in zip(requests, totals, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            # One gen_kwargs per batch; longest prompts first; rows padded to batch_size so
            # that sampling.generate compiles once per (prompt bucket, max_gen_toks).
            collator = Collator([r.args for r in requests],
                                sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
                                group_by="gen_kwargs", group_fn=lambda args: args[1])
            stop_token = tokenization.end_of_text(self.tokenizer)
            out = []
            bar = tqdm.tqdm(total=len(requests), desc="generate_until", file=sys.stderr,
                            leave=False, disable=None if self.scorer.progress else True)
            for chunk in collator.get_batched(n=self.batch_size):
                contexts, kwargs = [c for c, _ in chunk], generation_options(chunk[0][1])
                until = kwargs.pop("until")
                prompts = [self._prompt(c, kwargs["max_new_tokens"]) for c in contexts]
                prompts += [prompts[0]] * (self.batch_size - len(prompts))
                tokens_BN = sampling.generate(self.scorer.params, self.config, prompts,
                                              seed=self.seed, stop_token=stop_token, **kwargs)
                for row, context in zip(tokens_BN, contexts):
                    text = sampling.truncate(row, self.tok_decode, until, stop_token)[1]
                    out.append(text)
                    self.cache_hook.add_partial("generate_until", (context, chunk[0][1]), text)
                bar.update(len(contexts))
            bar.close()
            return collator.get_original(out)

        def _prompt(self, context: str, max_new_tokens: int) -> list[int]:
            """Returns the prompt's tokens, cut from the left so that the generation fits the
            window (the HF backend's rule); past block_size the sampler's window slides."""
            tokens = self.tok_encode(context) or [self.prefix_token_id]
            room = self.max_length - max_new_tokens
            return tokens[-room:] if room > 0 else tokens

    # Named in the harness's registry too: lm_eval.simple_evaluate(model="gpt-jax",
    # model_args="checkpoint=out/run") works once this module has built the class.
    lm_eval.api.registry.register_model("gpt-jax")(GPTJaxLM)
    return GPTJaxLM


def harness_model(params: PyTree, config: GPTConfig, tokenizer, *,
                  batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False):
    """Returns an lm_eval.api.model.LM computed by gpt-jax, for lm_eval.simple_evaluate(model=...).

    Its .scorer counts the requests scored, their seconds and the scoring compilations.
    """
    return _model_class()(params, config, tokenizer, batch_size=batch_size, progress=progress)


def generation_options(gen_kwargs: dict) -> dict:
    """Returns sampling.generate's options (and `until`, the stop strings) for a task's
    generation_kwargs: greedy unless do_sample (or a temperature > 0 without do_sample)."""
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                    if kwargs.get(k) is not None), MAX_GEN_TOKS)
    temperature = float(kwargs.get("temperature") or 0.0)
    do_sample = kwargs.get("do_sample", temperature > 0)
    return {"until": until, "max_new_tokens": int(max_new),
            "temperature": temperature if do_sample else 0.0,
            "top_k": kwargs.get("top_k") or None, "top_p": kwargs.get("top_p")}


# --------------------------------------------------------------------------- tasks


def resolve_tasks(tasks: Sequence[str], include_path: str | None = None):
    """Returns (TaskManager, task names): a .yaml path becomes the task (or group) it names,
    with its directory searched. The harness's ~15,000 built-in tasks are indexed (about 20 s)
    only when a name is not found in the local directories."""
    lm_eval = _harness()
    import yaml

    class Loader(yaml.SafeLoader):  # reads the `task:` name; leaves !function tags unresolved
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    paths, names = [include_path] if include_path else [], []
    for task in tasks:
        if task.endswith((".yaml", ".yml")):
            path = Path(task).expanduser()
            if not path.is_file():
                raise UserError(f"task file {task} does not exist")
            config = yaml.load(path.read_text(), Loader=Loader)
            config = config if isinstance(config, dict) else {}
            # A task file names its task; a group file its group (and lists its tasks).
            name = config.get("task") if isinstance(config.get("task"), str) \
                else config.get("group")
            if not isinstance(name, str):
                raise UserError(f"{task} names no task or group: it is not a harness task file")
            if str(path.parent.absolute()) not in paths:
                paths.append(str(path.parent.absolute()))
            names.append(name)
        else:
            names.append(task)
    if paths:
        local = lm_eval.tasks.TaskManager(include_path=paths, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local, names
    manager = lm_eval.tasks.TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown task {unknown[0]!r}{hint}: use a harness task name (lm-eval "
                        "ls tasks) or a path to a task .yaml file")
    return manager, names


@contextlib.contextmanager
def quiet():
    """Turns the harness's and datasets' INFO logs and progress bars off inside the block."""
    import datasets

    loggers = [logging.getLogger(n)
               for n in ("lm_eval", "lm-eval", "datasets", "huggingface_hub", "absl")]
    levels = [logger.level for logger in loggers]
    bars = datasets.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        with contextlib.ExitStack() as stack:
            task_module = sys.modules.get("lm_eval.api.task")
            if hasattr(task_module, "tqdm"):  # its bar over documents has no switch
                stack.enter_context(unittest.mock.patch.object(
                    task_module, "tqdm", functools.partial(tqdm.tqdm, disable=True)))
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def run_tasks(lm, tasks: Sequence[str], *, include_path: str | None = None,
              limit: float | None = None, num_fewshot: int | None = None,
              bootstrap_iters: int = 100_000, log_samples: bool = False,
              task_manager=None) -> dict:
    """Returns lm_eval.simple_evaluate's results of `lm` (any harness LM) on `tasks`.

    With task_manager (from resolve_tasks), tasks are the names it returned.
    """
    lm_eval = _harness()
    with quiet():
        if task_manager is None:
            task_manager, tasks = resolve_tasks(tasks, include_path)
        try:
            return lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit,
                batch_size=getattr(lm, "batch_size", None),  # recorded in the results' config
                num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                log_samples=log_samples,
                verbosity="ERROR")  # lm-eval < 0.4.9 sets its logger's level from it
        except ConnectionError as err:  # datasets' word for a hub it cannot reach
            raise UserError(f"a task's dataset could not be fetched ({err}): offline, use tasks "
                            "whose data is on disk (a task .yaml over local files)") from None


def metrics_of(results: dict) -> dict[str, dict[str, float]]:
    """Returns {task: {metric: value}} of the harness's results: numeric metrics, no stderr;
    "acc,none" becomes "acc", a metric under another filter "exact_match/strict-match"."""
    out = {}
    for task, values in results["results"].items():
        out[task] = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or "_stderr" in metric or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            out[task][metric if filter_name == "none" else f"{metric}/{filter_name}"] = \
                float(value)
    return out


def evaluate(params: PyTree, model_config: GPTConfig, tokenizer, tasks: list[str], *,
             limit: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             include_path: str | None = None) -> dict[str, dict[str, float]]:
    """Returns {task: {metric: value}} of the model on harness tasks, e.g. for the training loop.

    Args:
      tasks: harness task names (hellaswag, ...) or paths to task .yaml files.
      limit: examples per task (a fraction below 1: that share of them); None: all.
      batch_size: rows per scoring call. The compiled scoring function is kept per model
        config, so later calls with new params do not compile again.
      include_path: a directory of task YAML files searched before the harness's own.
    Stderrs are not computed (no bootstrap); metric names are metrics_of's.
    """
    lm = harness_model(params, model_config, tokenizer, batch_size=batch_size)
    results = run_tasks(lm, tasks, include_path=include_path, limit=limit, bootstrap_iters=0)
    return metrics_of(results)


# --------------------------------------------------------------------------- command line


def positive_limit(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(text)
    return int(value) if value >= 1 else value


def run(args) -> None:
    """Evaluates the model args name on args.tasks; prints the table, writes --output_path."""
    lm_eval = _harness()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks names no task: give harness names or .yaml paths, "
                        "comma-separated")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    with quiet():  # before loading the model: a task that is not found fails fast
        manager, names = resolve_tasks(tasks, args.include_path)
    config, params, tokenizer, description = inference.load_for_inference(
        args.checkpoint, args.init_from, args.step)
    print(f"loaded {description}", file=sys.stderr)
    lm = harness_model(params, config, tokenizer, batch_size=args.batch_size, progress=True)
    start = time.perf_counter()
    results = run_tasks(lm, names, limit=args.limit, num_fewshot=args.num_fewshot,
                        task_manager=manager)
    seconds = time.perf_counter() - start
    scorer = lm.scorer
    rate = scorer.requests / scorer.seconds if scorer.seconds else float("nan")
    results["gpt_jax"] = {"model": description, "batch_size": args.batch_size,
                          "loglikelihood_requests": scorer.requests,
                          "loglikelihood_seconds": round(scorer.seconds, 3),
                          "compilations": scorer.compilations,
                          "compile_seconds": round(scorer.compile_seconds, 3),
                          "seconds": round(seconds, 3)}
    results.pop("samples", None)
    print(lm_eval.utils.make_table(results))
    if results.get("groups"):
        print(lm_eval.utils.make_table(results, "groups"))
    n = scorer.compilations
    print(f"scored {scorer.requests} loglikelihood requests (rolling windows included) in "
          f"{scorer.seconds:.1f} s: {rate:.1f} requests/s, after {n} compilation{'s' * (n != 1)} "
          f"of the scoring function ({scorer.compile_seconds:.1f} s); {seconds:.1f} s in all",
          file=sys.stderr)
    if args.output_path:
        path = Path(args.output_path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=lm_eval.utils.handle_non_serializable,
                                   ensure_ascii=False) + "\n")
        print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str]) -> None:
    p = entry.ArgumentParser(command="python -m gpt_jax.lm_eval", description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="out_dir of a training run")
    source.add_argument("--init_from",
                        help="hf:DIR (a Hugging Face GPT-2 or Llama directory) or hf:gpt2")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--tasks", required=True,
                   help="comma-separated harness task names or paths to task .yaml files")
    p.add_argument("--include_path", help="a directory of task .yaml files to search first")
    p.add_argument("--limit", type=positive_limit, default=None,
                   help="examples per task (below 1: that fraction of them)")
    p.add_argument("--num_fewshot", type=int, default=None, help="examples in each prompt")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="rows per compiled scoring call")
    p.add_argument("--output_path", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    entry.main(lambda: run(args), keep_freed_memory=True)


if __name__ == "__main__":
    main(sys.argv[1:])
