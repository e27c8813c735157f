"""Evaluation of a model with a sparsity state: perplexity, multiple-choice accuracy,
measured sparsity and the fraction of linear weights read per token.

- Perplexity over a text in non-overlapping windows of `seq_len` tokens, the sparsity
  applied to every token of the window (as the CHESS and TEAL papers evaluate); the first
  token of each window is context only.
- Multiple-choice tasks scored as lm-evaluation-harness does: the continuation tokens of
  a choice are `tokens(context + choice)[len(tokens(context)):]` (trailing spaces of the
  context moved to the choice; an empty context becomes the EOS token), `acc` is the
  argmax of their summed log-likelihood, `acc_norm` the argmax of that sum divided by the
  choice's length in UTF-8 bytes. Sequences longer than `seq_len` keep their last tokens.
- Measured sparsity: the zero fraction after masking of each point, per layer, averaged
  over every evaluated token (perplexity windows and task sequences; padding excluded).
- `activated_params_fraction`: per token, exactly, the weights a sparse kernel reads over
  all linear weights of the blocks (embeddings, lm_head, norms and biases excluded):
  q_proj reads `d_q(x)` of its rows (d = density = 1 - zero fraction), k/v_proj
  `d_kv`, o_proj `d_o`, gate_proj `d_ffn_in`, up_proj `d_ffn_in * d_gate` (rows of zero
  inputs and columns of zero gate channels are both skipped), down_proj `d_down_in`;
  OPT: fc1 `d_ffn_in`, fc2 `d_down_in`. Deja Vu: gate_proj also skips the rows of
  predicted-inactive neurons, and the predictors' own weights count as read
  (`jaxsparse.sparsity.activated_params_fraction`). Averaged over the evaluated tokens.

Batches are spread over every local device (data parallel, `jaxsparse.sharding`), or over
the `data` axis of a given mesh whose `model` axis splits the params and the sparsity state
(tensor parallel, `Evaluator(mesh=...)`, `jaxsparse eval --mesh data=N,model=M`). One
jit-compiled forward per sequence length serves every method and sparsity: thresholds
are an argument. `jaxsparse eval` (`jaxsparse.cli.eval`) runs it from the command line.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from typing import Any

import numpy as np

from jaxsparse.io import write_json_atomic  # noqa: F401 - also imported from here
from jaxsparse.measure import POINTS as _POINTS
from jaxsparse.measure import make_forward

DEFAULTS = {"seq_len": 512, "batch_size": 8, "max_tokens": 8192, "num_tasks": 100}


def linear_sizes(config) -> dict[str, int]:
    """Weights of each linear layer of one block (kernels only;
    `jaxsparse.sparsity.linear_sizes`)."""
    from jaxsparse.sparsity import linear_sizes as sizes

    return sizes(config)


@dataclasses.dataclass
class SparsityMeter:
    """Accumulates the measured sparsity over batches (host, float64)."""

    num_layers: int
    zero_sums: np.ndarray = None
    read_sum: float = 0.0
    count: float = 0.0
    layer_read_sums: np.ndarray = None

    def __post_init__(self):
        self.zero_sums = np.zeros((self.num_layers, len(_POINTS)))
        self.layer_read_sums = np.zeros((self.num_layers,))

    def add(self, out: dict) -> None:
        self.zero_sums += np.asarray(out["zero_sums"], np.float64)
        self.read_sum += float(out["read_sum"])
        self.layer_read_sums += np.asarray(out["layer_read_sums"], np.float64)
        self.count += float(out["count"])

    def report(self) -> dict[str, Any]:
        z = self.zero_sums / max(self.count, 1.0)
        per_layer = {
            f"layers_{i}": {p: float(z[i, j]) for j, p in enumerate(_POINTS)}
            for i in range(self.num_layers)
        }
        per_point = {p: float(z[:, j].mean()) for j, p in enumerate(_POINTS)}
        return {
            "measured_sparsity": {
                "ffn": per_point["gate"],
                "per_point": per_point,
                "per_layer": per_layer,
            },
            "activated_params_fraction": self.read_sum / max(self.count, 1.0),
            "activated_params_per_layer": {
                f"layers_{i}": float(v / max(self.count, 1.0))
                for i, v in enumerate(self.layer_read_sums)
            },
            "tokens": round(self.count),
        }


class Evaluator:
    """Holds the model on the mesh and the compiled forward; evaluates states."""

    def __init__(
        self,
        config,
        params,
        tokenizer,
        seq_len: int = DEFAULTS["seq_len"],
        batch_size: int = DEFAULTS["batch_size"],
        mesh=None,
        progress: bool = True,
    ):
        """`mesh`: a `jax.sharding.Mesh`, a spec such as `"data=4,model=2"`
        (`jaxsparse.sharding.parse_mesh`), or None (every local device on `data`)."""
        from jaxsparse import sharding
        from jaxsparse.models import logical_axes

        self.config, self.tokenizer, self.seq_len = config, tokenizer, seq_len
        self.mesh = sharding.as_mesh(mesh)
        self.batch_size = sharding.round_batch(batch_size, self.mesh)
        self.params = sharding.shard_params(params, logical_axes(config), self.mesh)
        self.forward = make_forward(config)
        self.progress = progress

    def _put(self, x):
        from jaxsparse import sharding

        return sharding.put_batch(x, self.mesh)

    def _thresholds(self, state):
        from jaxsparse import sharding
        from jaxsparse.models import state_logical_axes
        from jaxsparse.sparsity import dense_state

        state = state or dense_state(self.config)
        state.check_model(self.config)
        tree = state.thresholds_for_model()
        return sharding.shard_tree(tree, state_logical_axes(tree), self.mesh)

    def _run(
        self, rows: list[np.ndarray], width: int, thresholds, meter: SparsityMeter, desc: str
    ) -> list[np.ndarray]:
        """Forward over token rows (each at most `width` long, right-padded); returns the
        per-row next-token log-likelihoods [len(row) - 1]. Batches hold `batch_size` rows,
        fewer when there are fewer rows in all (`jaxsparse.sharding.rows_per_batch`)."""
        from tqdm import tqdm

        from jaxsparse import sharding

        out_rows = []
        b = sharding.rows_per_batch(len(rows), self.batch_size, self.mesh)
        for start in tqdm(
            range(0, len(rows), b), desc=desc, unit="batch", disable=not self.progress
        ):
            chunk = rows[start : start + b]
            tokens = np.zeros((b, width), np.int32)
            valid = np.zeros((b, width), bool)
            for r, row in enumerate(chunk):
                tokens[r, : len(row)] = row
                valid[r, : len(row)] = True
            out = self.forward(self.params, self._put(tokens), self._put(valid), thresholds)
            meter.add(out)
            ll = np.asarray(out["next_ll"])
            out_rows.extend(ll[r, : len(row) - 1] for r, row in enumerate(chunk))
        return out_rows

    def window_log_likelihoods(self, token_ids: np.ndarray, thresholds, meter) -> list[np.ndarray]:
        """Per non-overlapping window of `seq_len` over `token_ids` (the last may be
        shorter), the log-likelihood of each next token: what `perplexity` sums."""
        L = self.seq_len
        rows = [token_ids[i : i + L] for i in range(0, len(token_ids), L)]
        rows = [r for r in rows if len(r) >= 2]
        if not rows:
            raise ValueError(f"perplexity needs at least 2 tokens, got {len(token_ids)}")
        return self._run(rows, L, thresholds, meter, "perplexity")

    def perplexity(self, token_ids: np.ndarray, thresholds, meter) -> dict[str, Any]:
        """Over the windows of `window_log_likelihoods`."""
        lls = self.window_log_likelihoods(token_ids, thresholds, meter)
        window_nll = [-float(x.sum(dtype=np.float64)) for x in lls]
        nll = sum(window_nll)
        n = sum(len(x) for x in lls)
        return {
            "perplexity": math.exp(nll / n),
            "nll": nll / n,
            "perplexity_tokens": n,
            "windows": len(lls),
            # per window: the summed negative log-likelihood and its predictions, for a
            # paired comparison of two results on the same text (`paired_difference`)
            "window_nll": window_nll,
            "window_tokens": [len(x) for x in lls],
        }

    def encode_task_choices(self, tasks) -> tuple[list[np.ndarray], list[int]]:
        """Token rows (context + continuation, last `seq_len` kept) and continuation
        lengths, harness-style, for every (task, choice) in order."""
        from jaxsparse.data import encode, eos_token_id

        eos = eos_token_id(self.config, self.tokenizer)
        rows, cont_lens = [], []
        for t in tasks:
            for choice in t.choices:
                ctx, cont = t.context, choice
                n_space = len(ctx) - len(ctx.rstrip())
                if n_space:
                    ctx, cont = ctx[:-n_space], ctx[-n_space:] + cont
                if ctx:
                    ctx_ids = encode(self.tokenizer, ctx)
                    whole = encode(self.tokenizer, ctx + cont)
                    cont_ids = whole[len(ctx_ids) :]
                    if not cont_ids or whole[: len(ctx_ids)] != ctx_ids:
                        cont_ids = encode(self.tokenizer, cont)  # a token crosses the seam
                else:
                    ctx_ids, cont_ids = [eos], encode(self.tokenizer, cont)
                seq = (ctx_ids + cont_ids)[-self.seq_len :]
                if len(cont_ids) >= len(seq):
                    raise ValueError(
                        f"a choice of {len(cont_ids)} tokens does not fit "
                        f"--seq-len {self.seq_len} with its context"
                    )
                rows.append(np.asarray(seq, np.int32))
                cont_lens.append(len(cont_ids))
        return rows, cont_lens

    def tasks(self, tasks, thresholds, meter) -> dict[str, Any]:
        rows, cont_lens = self.encode_task_choices(tasks)
        width = min(self.seq_len, -(-max(len(r) for r in rows) // 32) * 32)
        lls = self._run(rows, width, thresholds, meter, "tasks")
        acc = acc_norm = 0
        k = 0
        for t in tasks:
            scores, norms = [], []
            for choice in t.choices:
                ll = float(lls[k][-cont_lens[k] :].sum(dtype=np.float64))
                scores.append(ll)
                norms.append(ll / len(choice.encode("utf-8")))
                k += 1
            acc += int(np.argmax(scores) == t.gold)
            acc_norm += int(np.argmax(norms) == t.gold)
        n = len(tasks)
        return {
            "acc": acc / n,
            "acc_stderr": accuracy_stderr(acc / n, n),
            "acc_norm": acc_norm / n,
            "acc_norm_stderr": accuracy_stderr(acc_norm / n, n),
            "n": n,
            "task_tokens": int(sum(len(r) for r in rows)),
        }

    def evaluate(
        self, state=None, ppl_tokens: np.ndarray | None = None, tasks: list | None = None
    ) -> dict[str, Any]:
        """The result dict for one state (None: dense)."""
        import jax

        from jaxsparse import sharding

        t0 = time.time()
        thresholds = self._thresholds(state)
        meter = SparsityMeter(self.config.num_layers)
        result: dict[str, Any] = {
            "method": state.method if state is not None else "dense",
            "target_sparsity": state.target_sparsity if state is not None else 0.0,
        }
        if ppl_tokens is not None:
            result.update(self.perplexity(ppl_tokens, thresholds, meter))
        if tasks:
            result["tasks"] = self.tasks(tasks, thresholds, meter)
        result.update(meter.report())
        result.update(
            {
                "seq_len": self.seq_len,
                "batch_size": self.batch_size,
                "dtype": self.config.dtype,
                "devices": int(self.mesh.devices.size),
                "backend": jax.default_backend(),
                "mesh": sharding.describe(self.mesh),
                "jax_version": jax.__version__,
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "wall_s": round(time.time() - t0, 1),
                "activated_params_note": "kernels of q/k/v/o and FFN projections of every block; "
                "embeddings, lm_head, norms and biases excluded",
            }
        )
        if state is not None:
            result["state_provenance"] = state.meta.provenance
            result["state_details"] = state.meta.details
        return result


def paired_bootstrap(
    sums_a: np.ndarray,
    sums_b: np.ndarray,
    counts: np.ndarray,
    resamples: int = 10000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """A 95% interval of ppl(B) - ppl(A) from paired units of text (windows, or blocks
    of tokens): each unit's summed negative log-likelihood under A and B and its number
    of predictions, resampled with replacement. Returns (low, high, the share of
    resamples where B is below A)."""
    sums_a, sums_b = np.asarray(sums_a, np.float64), np.asarray(sums_b, np.float64)
    counts = np.asarray(counts, np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(counts), size=(resamples, len(counts)))
    n = counts[idx].sum(1)
    diff = np.exp(sums_b[idx].sum(1) / n) - np.exp(sums_a[idx].sum(1) / n)
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return float(lo), float(hi), float((diff < 0).mean())


def paired_difference(a: dict, b: dict, resamples: int = 10000, seed: int = 0) -> dict:
    """ppl(B) - ppl(A) for two `evaluate` results on the same perplexity text, with a 95%
    interval from resampling their windows together (`paired_bootstrap`). At 50%
    sparsity a difference of a few tenths can be noise: on SmolLM2, thresholds 2e-6
    apart moved perplexity by 0.29 on 8192 tokens
    (benchmarks/results/smollm2_cpu_wina/paired/README.md)."""
    for name, r in (("A", a), ("B", b)):
        if "window_nll" not in r:
            raise ValueError(
                f"result {name} ({r.get('method', '?')}) has no per-window perplexity "
                "(`window_nll`): it was evaluated without perplexity text, or by a jaxsparse "
                "older than results with windows; evaluate it again with perplexity text"
            )
    if a["window_tokens"] != b["window_tokens"]:
        raise ValueError(
            "the two results were not scored on the same windows "
            f"({len(a['window_tokens'])} windows, {sum(a['window_tokens'])} predictions "
            f"against {len(b['window_tokens'])}, {sum(b['window_tokens'])}): evaluate both "
            "with the same perplexity text, --max-tokens and --seq-len"
        )
    lo, hi, below = paired_bootstrap(
        a["window_nll"], b["window_nll"], a["window_tokens"], resamples, seed
    )
    return {
        "ppl_a": a["perplexity"],
        "ppl_b": b["perplexity"],
        "ppl_b_minus_a": b["perplexity"] - a["perplexity"],
        "interval95": [lo, hi],
        "share_b_below_a": below,
        "windows": len(a["window_tokens"]),
        "resamples": resamples,
    }


def accuracy_stderr(p: float, n: int) -> float:
    """Standard error of an accuracy `p` measured on `n` independent tasks:
    sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1.0 - p) / n)


def ppl_token_ids(config, tokenizer, paths: list[str] | None, max_tokens: int | None):
    """Token ids (documents + EOS) of the perplexity text, at most `max_tokens`."""
    from jaxsparse import data

    docs = data.load_documents(paths, "evaluation")
    eos = data.eos_token_id(config, tokenizer)
    ids: list[int] = []
    for doc in docs:
        ids.extend(data.encode(tokenizer, doc.text))
        ids.append(eos)
        if max_tokens and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens else ids
    if len(ids) < 2:
        raise data.DataError(
            f"{data.describe_sources(paths, 'evaluation')}: found "
            f"{len(ids)} tokens, perplexity needs at least 2"
        )
    return np.asarray(ids, np.int32)
