"""What is measured on one model: label-free metrics (held-out perplexity, KL to the teacher, top-1
agreement), an lm-eval task, and cost (memory, prefill latency, decode speed).

Label-free metrics need no labels and say how close each size stays to its teacher.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from boomerang.errors import BoomerangError
from boomerang.evaluation import items
from boomerang.family import Family
from boomerang.settings import Settings


@dataclass
class LabelFree:
    """Label-free metrics of one model on held-out token blocks."""

    n_layers: int
    perplexity: float
    """exp(mean next-token cross-entropy)."""
    kl_to_teacher: float
    """Mean over positions of KL(teacher || model), in nats."""
    top1_agreement: float
    """Fraction of positions where the model's most likely next token is the teacher's."""
    tokens: int
    """Predicted positions measured."""
    kl_stderr: float | None = None
    """Standard error of the KL, from its spread over the held-out blocks (positions within a block are
    not independent; blocks nearly are). None with one block."""
    top1_stderr: float | None = None
    """The same for the top-1 agreement."""

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def label_free(model, teacher, blocks: torch.Tensor, *, batch_size: int = 8, n_layers: int = 0) -> LabelFree:
    """Metrics of `model` on `blocks` (N, T) against `teacher`."""
    return label_free_many({0: model}, teacher, blocks, batch_size=batch_size, n_layers={0: n_layers})[0]


@torch.no_grad()
def label_free_many(models: dict, teacher, blocks: torch.Tensor, *, batch_size: int = 8,
                    n_layers: dict | None = None) -> dict:
    """`label_free` of several models (name -> model) on the same blocks, batch by batch: the teacher runs once
    per batch for all of them. Each model's numbers are those `label_free` gives it alone."""
    nll = dict.fromkeys(models, 0.0)
    kls: dict[str, list[float]] = {k: [] for k in models}  # per block: the spread over blocks gives the standard errors
    agrees: dict[str, list[float]] = {k: [] for k in models}
    count = 0
    device = next(teacher.parameters()).device
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)  # (B, T)
        t_logp = torch.log_softmax(teacher(ids).logits[:, :-1].float(), -1)  # (B, T-1, V)
        target = ids[:, 1:]
        for key, model in models.items():
            logp = t_logp if model is teacher else torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
            nll[key] += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
            kls[key] += (t_logp.exp() * (t_logp - logp)).sum(-1).mean(-1).tolist()
            agrees[key] += (logp.argmax(-1) == t_logp.argmax(-1)).float().mean(-1).tolist()
            del logp
        count += target.numel()
    return {k: LabelFree((n_layers or {}).get(k, 0), math.exp(nll[k] / count), _mean(kls[k]), _mean(agrees[k]),
                         int(count), _stderr(kls[k]), _stderr(agrees[k])) for k in models}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _stderr(xs: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def family_label_free(family: Family, blocks: torch.Tensor, *, batch_size: int = 8, on_size=None) -> list[LabelFree]:
    """Label-free metrics of every size, smallest first."""
    out = []
    for n in family.layer_counts:
        result = label_free(family.build(n), family.teacher, blocks, batch_size=batch_size, n_layers=n)
        out.append(result)
        if on_size:
            on_size(result)
    return out


# ----------------------------------------------------------------------------- lm-eval on models in memory


@dataclass(frozen=True)
class EvalSettings(Settings):
    """What an lm-eval run depends on besides the model; part of every result's identity."""

    num_fewshot: int = 0
    """Few-shot examples per item."""
    limit: int | None = None
    """At most this many items per task (None: all)."""
    batch_size: int = 8
    """Batch size of the model calls (does not change scores)."""
    seed: int = 0
    """Seed for few-shot sampling and everything random in lm-eval."""

    def __post_init__(self):
        self.check_types()
        if self.num_fewshot < 0:
            raise BoomerangError(f"num_fewshot must be 0 or more, got {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            raise BoomerangError(f"limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise BoomerangError(f"batch_size must be at least 1, got {self.batch_size}")


def lm_eval_task(model, tokenizer, task: dict | str, settings: EvalSettings, *, scorer=None, key: str | None = None) -> dict:
    """Run one lm-eval task on an in-memory model; returns lm-eval's own result for it, with settings.

    Log-likelihoods come from a `shared.SharedScorer`: `scorer` and `key` name the model in a group scored together
    (each shared computation once); without them the model is a group of one, scored by the same code."""
    from boomerang.evaluation.shared import SharedScorer, shared_lm

    if scorer is None or key is None:
        scorer, key = SharedScorer({"model": model}, batch_size=settings.batch_size), "model"
    return run_lm_eval(shared_lm(scorer, key, tokenizer, batch_size=settings.batch_size), task, settings)


def run_lm_eval(lm, task: dict | str, settings: EvalSettings, *, keep_items: bool = True) -> dict:
    """Run one lm-eval task on any lm-eval model object (in memory, or an API such as `local-completions`
    pointed at `boomerang serve`); returns lm-eval's own result for it, with settings, and every scored item
    (`items.compact`: what a size loses, item by item; what it costs: bench/bench_items.py)."""
    import lm_eval  # lm-eval takes seconds to import
    from lm_eval.tasks import TaskManager  # lm-eval takes seconds to import

    local = isinstance(task, dict)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task], num_fewshot=settings.num_fewshot, limit=settings.limit,
        task_manager=TaskManager(include_defaults=not local), bootstrap_iters=0, log_samples=keep_items,
        random_seed=settings.seed, numpy_random_seed=settings.seed, torch_random_seed=settings.seed,
        fewshot_random_seed=settings.seed,
    )
    name = task["task"] if isinstance(task, dict) else task
    return {
        "task": name,
        "results": out["results"][name],
        "versions": out["versions"].get(name),
        "n-shot": out["n-shot"].get(name),
        "n-samples": out["n-samples"].get(name),
        "higher_is_better": out["higher_is_better"].get(name),
        "lm_eval_version": out.get("lm_eval_version"),
        "settings": asdict(settings),
        **({"items": items.compact((out.get("samples") or {}).get(name, []))} if keep_items else {}),
    }


MEAN_OF_HITS = ("acc", "acc_norm", "exact_match")
"""Metrics that are a mean of 0/1 scores per item: their standard error is binomial."""


def metrics_of(result: dict) -> dict[str, tuple[float, float | None]]:
    """{metric: (value, stderr)} from an lm-eval result; "N/A" stderr becomes None.

    lm-eval runs with bootstrap_iters=0 here (bootstrapping perplexity is slow), which leaves every
    stderr "N/A"; for a mean of 0/1 hits it is sqrt(p(1 - p) / (n - 1)) in closed form (what lm-eval's
    own `mean_stderr` gives), so it is filled in from the effective number of items.
    """
    samples = result.get("n-samples") or {}
    n = samples.get("effective") if isinstance(samples, dict) else None
    out = {}
    for key, value in result["results"].items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric = key.split(",")[0]
        stderr = result["results"].get(key.replace(",", "_stderr,", 1))
        stderr = float(stderr) if isinstance(stderr, (int, float)) else None
        if stderr is None and metric in MEAN_OF_HITS and isinstance(n, int) and n > 1 and 0 <= value <= 1:
            stderr = math.sqrt(value * (1 - value) / (n - 1))
        out[metric] = (float(value), stderr)
    return out


# ----------------------------------------------------------------------------- cost


@torch.no_grad()
def measure_cost(model, *, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3, vocab: int | None = None) -> dict:
    """Weights, peak memory (CUDA), prefill latency and decode speed at a fixed, recorded setting."""

    device = next(model.parameters()).device
    vocab = vocab or model.config.vocab_size
    ids = torch.randint(10, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill, decode = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model(ids)
        sync()
        t1 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
        sync()
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append(max(1e-9, (t2 - t1) - (t1 - t0)))
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return {
        "metrics": {
            "weights_mb": (weights / 2**20, None),
            "peak_mb": ((torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else float("nan"), None),
            "prefill_ms": (statistics.median(prefill) * 1e3, None),
            "decode_tokens_per_s": (new_tokens / statistics.median(decode), None),
        },
        "setting": {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch": 1, "repeats": repeats,
                    "device": str(device), "dtype": str(next(model.parameters()).dtype),
                    "threads": torch.get_num_threads()},
    }
