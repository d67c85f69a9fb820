"""Which teacher layers the student keeps, and what each student layer stands for.

A plan keeps an increasing list of teacher layers that starts at layer 0. Student layer `j` is
initialised from teacher layer `kept[j]` and stands for the teacher's contiguous span
`[kept[j], kept[j+1])` (the last one up to the end). The span is what replaces it when the
student is patched back toward the teacher, and the output of the span's last block is what
the student layer's output is aligned with during distillation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from boomerang.errors import BoomerangError, excerpt


@dataclass(frozen=True)
class PaperRule:
    """The paper's rule: keep the first `keep_first` layers, then every `every`-th, and the last `keep_last`."""

    keep_first: int = 1
    """Leading teacher layers kept one for one (at least 1: layer 0 must be kept)."""
    every: int = 2
    """After the first layers, keep one layer in `every`; each kept one stands for `every` teacher layers."""
    keep_last: int = 2
    """Trailing teacher layers kept one for one."""

    def __post_init__(self):
        if self.keep_first < 1:
            raise BoomerangError(f"--keep-first must be at least 1 (layer 0 is always kept), got {self.keep_first}")
        if self.every < 1:
            raise BoomerangError(f"--every must be at least 1, got {self.every}")
        if self.keep_last < 0:
            raise BoomerangError(f"--keep-last must be 0 or more, got {self.keep_last}")

    def kept(self, n_teacher: int) -> list[int]:
        """The kept teacher layers for a teacher of `n_teacher` layers."""
        if self.keep_first + self.keep_last > n_teacher:
            raise BoomerangError(
                f"--keep-first {self.keep_first} plus --keep-last {self.keep_last} is more than the "
                f"teacher's {n_teacher} layers; lower them"
            )
        tail_start = n_teacher - self.keep_last
        middle = range(self.keep_first - 1 + self.every, tail_start, self.every)
        return sorted(set(range(self.keep_first)) | set(middle) | set(range(tail_start, n_teacher)))


@dataclass(frozen=True)
class LayerPlan:
    """A validated choice of kept teacher layers, with the maps derived from it."""

    n_teacher: int
    """Number of decoder layers of the teacher."""
    kept: tuple[int, ...]
    """Teacher layers the student keeps, increasing, starting at 0."""
    spans: tuple[tuple[int, int], ...] = field(init=False)
    """For each student layer, the half-open range of teacher layers it stands for."""

    def __post_init__(self):
        kept = tuple(int(k) for k in self.kept)
        _validate(kept, self.n_teacher)
        object.__setattr__(self, "kept", kept)
        ends = (*kept[1:], self.n_teacher)
        object.__setattr__(self, "spans", tuple(zip(kept, ends, strict=False)))

    @classmethod
    def from_rule(cls, n_teacher: int, rule: PaperRule | None = None) -> "LayerPlan":
        return cls(n_teacher, tuple((rule or PaperRule()).kept(n_teacher)))

    @property
    def n_student(self) -> int:
        return len(self.kept)

    @property
    def patchable(self) -> tuple[int, ...]:
        """Student layers standing for more than one teacher layer: patching one grows the model."""
        return tuple(j for j, (a, b) in enumerate(self.spans) if b - a > 1)

    @property
    def alignment(self) -> tuple[tuple[int, int], ...]:
        """(student layer, teacher layer) pairs whose outputs are aligned: the last block of each span."""
        return tuple((j, b - 1) for j, (a, b) in enumerate(self.spans))

    def layers_after_patching(self, patched: set[int] | frozenset[int]) -> list[tuple[str, int]]:
        """The layer sequence, as ("teacher", i) / ("student", j), when the given student layers are patched."""
        out: list[tuple[str, int]] = []
        for j, (a, b) in enumerate(self.spans):
            out.extend([("teacher", i) for i in range(a, b)] if j in patched else [("student", j)])
        return out

    def n_layers(self, patched) -> int:
        return sum((b - a) if j in patched else 1 for j, (a, b) in enumerate(self.spans))

    def to_dict(self) -> dict:
        return {"n_teacher": self.n_teacher, "kept": list(self.kept), "spans": [list(s) for s in self.spans]}


def importance_plan(costs: list[float], n_keep: int, *, keep_first: int = 1, keep_last: int = 2,
                    max_run: int = 2) -> LayerPlan:
    """Keep `n_keep` of the teacher's layers, dropping those whose loss costs least.

    `costs[i]` is what dropping teacher layer i alone costs (e.g. `baselines.drop_one_costs`).
    Layers are dropped cheapest first, never one of the first `keep_first` or last `keep_last`, and
    never so that more than `max_run` consecutive layers go (a student layer then stands for at
    most `max_run + 1` teacher layers).
    """
    n = len(costs)
    n_drop = n - n_keep
    if not 0 <= n_drop <= n - keep_first - keep_last:
        raise BoomerangError(f"cannot keep {n_keep} of {n} layers with the first {keep_first} and last {keep_last} kept")
    dropped: set[int] = set()

    def run_through(i: int) -> int:
        left = right = i
        while left - 1 in dropped:
            left -= 1
        while right + 1 in dropped:
            right += 1
        return right - left + 1

    for i in sorted(range(keep_first, n - keep_last), key=lambda i: (costs[i], i)):
        if len(dropped) == n_drop:
            break
        dropped.add(i)
        if run_through(i) > max_run:
            dropped.remove(i)
    if len(dropped) < n_drop:
        raise BoomerangError(f"cannot drop {n_drop} of {n} layers with at most {max_run} in a row; keep more layers "
                             f"or allow longer runs (a larger --every)")
    return LayerPlan(n, tuple(i for i in range(n) if i not in dropped))


def _validate(kept: tuple[int, ...], n_teacher: int) -> None:
    if n_teacher < 2:
        raise BoomerangError(f"the teacher has {n_teacher} layer(s); a student needs a teacher of at least 2")
    if not kept:
        raise BoomerangError("the plan keeps no layers; keep at least layer 0")
    bad = [k for k in kept if not 0 <= k < n_teacher]
    if bad:
        raise BoomerangError(f"layers {excerpt(bad)} do not exist: the teacher has layers 0..{n_teacher - 1}")
    if list(kept) != sorted(set(kept)):
        raise BoomerangError(f"kept layers must be increasing with no repeats, got {excerpt(list(kept))}")
    if kept[0] != 0:
        raise BoomerangError(
            f"the plan must keep layer 0 (it stands for the teacher's first layers), got {excerpt(list(kept))}"
        )
    if len(kept) == n_teacher:
        raise BoomerangError(f"the plan keeps all {n_teacher} layers: there is nothing to distill; drop some")


MAX_LAYER = 100_000
"""No model has this many layers: a list naming more is refused before it is expanded."""


def parse_layer_list(text: str) -> list[int]:
    """Parse "0,2,4-10,29" into layer numbers; a `BoomerangError` naming the bad part otherwise.

    Bounded before any work: a text of more than 10,000 characters or a layer number of MAX_LAYER or more
    is refused (a range like 0-100000000 would otherwise be expanded in memory).
    """
    if len(text) > 10_000:
        raise BoomerangError(f"layer list too long ({len(text):,} characters): {excerpt(text)}")
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
            else:
                lo = hi = int(part)
        except ValueError:
            raise BoomerangError(f"cannot read {excerpt(part, 40)} in layer list {excerpt(text)}: use numbers and "
                                 "ranges like 0,2,4-10") from None
        if lo < 0 or hi >= MAX_LAYER:
            raise BoomerangError(f"layer {lo if lo < 0 else hi} in {excerpt(text)} is out of range: layers are numbered "
                                 f"from 0, and no model has {MAX_LAYER:,}")
        out.extend(range(lo, hi + 1))
    return out
