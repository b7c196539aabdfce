"""The continual evaluation protocol over a stream (method.md 8).

After block k a model is evaluated on the test split of every block j <= k: r_{k,j}. Per block k >= 1:
LA_k = r_{k,k} (learning), RA_k = mean_{j<k} r_{k,j} (retention), H_k = 2·LA_k·RA_k/(LA_k+RA_k).
Over the stream: LA = mean_k LA_k, RA = mean_k RA_k, H-mean = harmonic(LA, RA), k = 1..K.

A metric over no users (a block without test users; block k's new users when it has none) is
*missing*, not 0: it is stored as nothing, left out of every mean, and every summary that depends
only on missing values is NaN (shown as "—" in reports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real

from ccdrec.errors import InvalidArgument, WrongArgumentType


def harmonic(a: float, b: float) -> float:
    """H = 2ab / (a + b), the harmonic mean of two metric values (method.md 8); 0 when both are 0, NaN
    when either is NaN (a missing value, above). Values that are not real numbers are a
    :class:`~ccdrec.errors.WrongArgumentType`."""
    for name, v in (("a", a), ("b", b)):
        if isinstance(v, bool) or not isinstance(v, Real):
            raise WrongArgumentType(f"harmonic takes two numbers; {name} is {type(v).__name__} {v!r:.40}")
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if a < 0 or b < 0:
        raise InvalidArgument(f"harmonic takes metric values of at least 0, not {a} and {b}")
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


@dataclass
class StreamScores:
    """The r_{k,j} matrix of one metric for one model, with its LA/RA/H summaries."""

    r: dict[tuple[int, int], float] = field(default_factory=dict)

    def add(self, k: int, j: int, value: float | None) -> None:
        """Record r_(k,j); ``None`` or NaN (a metric over no users) is missing and not recorded."""
        if j > k:
            raise ValueError(f"r_(k,j) needs j <= k, got k={k}, j={j}")
        if value is not None and not math.isnan(value):
            self.r[(k, j)] = value

    @property
    def blocks(self) -> list[int]:
        return sorted({k for k, _ in self.r})

    def la(self, k: int) -> float:
        """LA_k = r_(k,k); NaN when missing."""
        return self.r.get((k, k), math.nan)

    def ra(self, k: int) -> float:
        """RA_k: the mean of the r_(k,j), j < k, that are not missing; NaN when none is."""
        past = [self.r[(k, j)] for j in range(k) if (k, j) in self.r]
        return sum(past) / len(past) if past else math.nan

    def h(self, k: int) -> float:
        la, ra = self.la(k), self.ra(k)
        return math.nan if math.isnan(la) or math.isnan(ra) else harmonic(la, ra)

    def summary(self) -> dict[str, float]:
        """Stream LA, RA and H-mean over the incremental blocks k >= 1 (missing values left out)."""
        ks = [k for k in self.blocks if k >= 1]
        la = _mean([self.la(k) for k in ks])
        ra = _mean([self.ra(k) for k in ks])
        return {"LA": la, "RA": ra, "H": math.nan if math.isnan(la) or math.isnan(ra) else harmonic(la, ra)}


def _mean(values: list[float]) -> float:
    """The mean of the values that are not NaN; NaN when there are none."""
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan
