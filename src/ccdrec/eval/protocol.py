"""The continual evaluation protocol over a stream (method.md 8).

After block k a model is evaluated on the test split of every block j <= k: r_{k,j}. Per block k >= 1:
LA_k = r_{k,k} (learning), RA_k = mean_{j<k} r_{k,j} (retention), H_k = 2·LA_k·RA_k/(LA_k+RA_k).
Over the stream: LA = mean_k LA_k, RA = mean_k RA_k, H-mean = harmonic(LA, RA), k = 1..K.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


@dataclass
class StreamScores:
    """The r_{k,j} matrix of one metric for one model, with its LA/RA/H summaries."""

    r: dict[tuple[int, int], float] = field(default_factory=dict)

    def add(self, k: int, j: int, value: float) -> None:
        if j > k:
            raise ValueError(f"r_(k,j) needs j <= k, got k={k}, j={j}")
        self.r[(k, j)] = value

    @property
    def blocks(self) -> list[int]:
        return sorted({k for k, _ in self.r})

    def la(self, k: int) -> float:
        return self.r[(k, k)]

    def ra(self, k: int) -> float:
        past = [self.r[(k, j)] for j in range(k) if (k, j) in self.r]
        return sum(past) / len(past) if past else float("nan")

    def h(self, k: int) -> float:
        return harmonic(self.la(k), self.ra(k))

    def summary(self) -> dict[str, float]:
        """Stream LA, RA and H-mean over the incremental blocks k >= 1."""
        ks = [k for k in self.blocks if k >= 1]
        if not ks:
            return {"LA": float("nan"), "RA": float("nan"), "H": float("nan")}
        la = sum(self.la(k) for k in ks) / len(ks)
        ra = sum(self.ra(k) for k in ks) / len(ks)
        return {"LA": la, "RA": ra, "H": harmonic(la, ra)}
