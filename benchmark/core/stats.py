"""Uncertainty of evaluation results: per-example evidence, bootstrap intervals, paired differences.

Every task keeps what a paired comparison needs, compactly (`Evidence`): per-example correctness
(classification), per-image reciprocal ranks (MRR), per-image intersection and union pixel counts
per class (segmentation). From it the headline metric is recomputed on bootstrap resamples of the
val examples: a 95% percentile interval for one run, and for two runs evaluated on the same
examples a paired interval of their difference. Resamples are drawn as multinomial weights, so
every metric is a weighted sum and a resample never materialises the data.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np

# Bootstrap resamples and the generator seed: fixed, so a record's interval is reproducible.
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
KINDS = ("correct", "reciprocal_rank", "iou_counts")


@dataclass
class Evidence:
    """What one evaluation saw, example by example, and which examples those were.

    kind:
      correct          arrays["correct"] [n] bool          -> top-1 in percent
      reciprocal_rank  arrays["reciprocal_rank"] [n]       -> MRR
      iou_counts       arrays["intersection"], arrays["union"] [n, C] pixel counts -> mIoU in percent
    `fingerprint` names the examples (files, labels, order, draws): two runs pair only when equal.
    """

    kind: str
    arrays: dict[str, np.ndarray]
    fingerprint: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown evidence kind {self.kind!r} (known: {', '.join(KINDS)})")

    @property
    def n(self) -> int:
        return len(next(iter(self.arrays.values())))

    def metric(self, weights: np.ndarray | None = None) -> np.ndarray | float:
        """The headline over the examples, or over each resample given as weights [B, n]."""
        w = np.ones((1, self.n)) if weights is None else np.asarray(weights, dtype=np.float64)
        if self.kind == "correct":
            out = 100.0 * (w @ self.arrays["correct"].astype(np.float64)) / w.sum(1)
        elif self.kind == "reciprocal_rank":
            out = (w @ self.arrays["reciprocal_rank"].astype(np.float64)) / w.sum(1)
        else:
            inter = w @ self.arrays["intersection"].astype(np.float64)
            union = w @ self.arrays["union"].astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
            out = 100.0 * np.nanmean(iou, axis=1)
        return float(out[0]) if weights is None else out

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        packed = {k: np.packbits(v) if v.dtype == bool else v for k, v in self.arrays.items()}
        np.savez_compressed(buf, kind=self.kind, fingerprint=self.fingerprint, n=self.n, **packed)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Evidence:
        with np.load(io.BytesIO(data)) as z:
            kind, n = str(z["kind"]), int(z["n"])
            arrays = {k: z[k] for k in z.files if k not in ("kind", "fingerprint", "n")}
            if kind == "correct":
                arrays["correct"] = np.unpackbits(arrays["correct"])[:n].astype(bool)
            return cls(kind, arrays, str(z["fingerprint"]))


def fingerprint(*parts) -> str:
    """A short stable name for the examples an evaluation used."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def resample_weights(n: int, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[resamples, n] multinomial counts: how often each example is drawn in each resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap values (NaNs, from resamples with nothing defined, dropped)."""
    values = values[~np.isnan(values)]
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def bootstrap_ci(evidence: Evidence, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% bootstrap interval of one run's headline over its val examples."""
    return interval(evidence.metric(resample_weights(evidence.n, resamples, seed)))


@dataclass
class Difference:
    """A - B of a headline, with its interval and what it says."""

    mean: float
    low: float
    high: float
    pairs: int  # runs paired (seeds)
    examples: int

    def verdict(self, lower_is_better: bool = False) -> str:
        if self.low > 0 or self.high < 0:
            a_higher = self.low > 0
            return "A better" if a_higher != lower_is_better else "B better"
        return "not distinguishable"


def paired_difference(
    pairs: list[tuple[Evidence, Evidence]], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> Difference:
    """Mean over pairs of metric(A) - metric(B), with a 95% interval.

    Each pair is two runs evaluated on the same examples (one seed of each side). One resample
    draws the pairs with replacement (the spread over seeds) and, within each, the examples with
    replacement, the same ones for A and B (the paired bootstrap). With one pair this is the plain
    paired bootstrap over the val examples.
    """
    if not pairs:
        raise ValueError("no runs to pair")
    for a, b in pairs:
        if a.kind != b.kind or a.fingerprint != b.fingerprint or a.n != b.n:
            raise ValueError(
                f"cannot pair runs evaluated on different val examples ({a.kind} {a.fingerprint}, n={a.n} vs "
                f"{b.kind} {b.fingerprint}, n={b.n})"
            )
    rng = np.random.default_rng(seed)
    per_pair = []
    for i, (a, b) in enumerate(pairs):
        w = resample_weights(a.n, resamples, seed + 1 + i)
        per_pair.append(a.metric(w) - b.metric(w))
    per_pair = np.stack(per_pair)  # [pairs, resamples]
    if len(pairs) == 1:
        values = per_pair[0]
    else:
        pick = rng.integers(0, len(pairs), size=(resamples, len(pairs)))
        values = np.nanmean(per_pair[pick, np.arange(resamples)[:, None]], axis=1)
    observed = float(np.mean([a.metric() - b.metric() for a, b in pairs]))
    low, high = interval(values)
    return Difference(observed, low, high, len(pairs), pairs[0][0].n)


# Student-t 97.5% quantiles by degrees of freedom (a 95% two-sided interval); 1.96 beyond.
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
    60: 2.000,
    120: 1.980,
}


def t_quantile(df: int) -> float:
    """The 97.5% Student-t quantile, from the table (the nearest tabulated df at or below)."""
    return 1.96 if df > 120 else T975[max(k for k in T975 if k <= df)]


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): 95% Student-t interval of the mean over seeds (low = high = mean for one)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean, mean
    half = t_quantile(len(x) - 1) * float(x.std(ddof=1)) / float(np.sqrt(len(x)))
    return mean, mean - half, mean + half
