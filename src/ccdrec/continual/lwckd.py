"""LWC-KD: layer-wise contrastive knowledge distillation, with optional PIW (method.md 5.4).

LWC-KD (Wang et al., "Graph Structure Aware Contrastive Knowledge Distillation for Incremental
Learning in Recommender Systems", CIKM 2021; with personalised imitation weights in "Structure Aware
Incremental Learning with Personalized Imitation Weights for Recommender Systems", AAAI 2023) is the
main continual-learning competitor of CCD and the regulariser of its teacher update (method.md 5.3).

A frozen snapshot of the model of block k-1 (:class:`OldEmbeddings`) keeps its per-layer embeddings
E^l_old, l = 0..L (MF: l = 0 only). During the update on block k, for the users and positive items of
each minibatch that existed before (IDs < U_{k-1}, < I_{k-1}) and for every layer l, the *old*
embedding a_r of the batch entity r is contrasted against the *current* layer-l embeddings N of all
old entities of one side:

    L(a, N, M) = −mean_{r: Σ_j M_rj > 0}  Σ_j M_rj · log softmax_j(a_r · N_jᵀ / τ) / Σ_j M_rj

    UI: a = old users,  N = current old items,  M = R_{k-1}            (the user's old items)
    IU: a = old items,  N = current old users,  M = R_{k-1}ᵀ
    UU: a = old users,  N = current old users,  M = kNN graph of the rows of R_{k-1}
    II: a = old items,  N = current old items,  M = kNN graph of the columns of R_{k-1}

and LWCKD = λ_LWC · mean_l (UI_l + IU_l + UU_l + II_l)  (τ = 5, λ_LWC = 0.01; the *mean* over the L+1
layers keeps λ's meaning the same for MF and LightGCN). Gradients reach only the current embeddings N.

Option ``candidates`` = S (:class:`LWCKD`): a sampled-softmax approximation of the full softmax above,
a speed-up: per call and term, the softmax runs over the mask's columns P plus S uniform draws, the
draws outside P corrected by + log((N − |P|) / |R|); None (the default) keeps the exact softmax.

The kNN graphs come from cosine similarity of sparse rows, computed in row chunks with top-k per row
(:func:`knn_graph`); no dense |U|² or |I|² matrix is ever built.

PIW (personalised imitation weights, an option): a tiny network g maps features of a user's old and
current final representation (see :class:`PIWNet`) to a positive score s_u; the batch weights are
w_u = s_u / mean_{batch old users} s_v (mean 1, so PIW redistributes imitation across users without
changing its overall scale), and the UI and UU terms become mean_r w_r · ℓ_r, a per-user (B,) * (B,)
product taken *before* the mean. g is trained jointly on the same total loss, which moves weight
towards users whose old knowledge is still consistent with the current model and away from users whose
preference has shifted — the intent of PIW.

Two deviations of the authors' release are avoided (method.md 9):

* old embeddings are indexed **by entity ID** (row r of the snapshot = entity r), never by the
  position of an ID in a sorted list of old IDs (which misaligned rows for LightGCN teachers);
* PIW weights multiply per-user losses of shape (B,) by weights of shape (B,); the release multiplied
  (B,) losses by (B, 1) weights, broadcasting to (B, B) whose mean equals the unweighted mean because
  the weights are normalised to mean 1, so PIW had no effect at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ccdrec.arguments import check_int
from ccdrec.models.base import EmbeddingModel
from ccdrec.models.indexing import take_pairs, take_rows
from ccdrec.train.callbacks import Callback

TERMS = ("ui", "iu", "uu", "ii")

__all__ = [
    "LWCKD",
    "CandidateSet",
    "OldEmbeddings",
    "PIWNet",
    "contrastive",
    "contrastive_rows",
    "knn_graph",
    "sample_candidates",
]


# ---------------------------------------------------------------------------------------------
# kNN graph
# ---------------------------------------------------------------------------------------------


def knn_graph(matrix: sp.spmatrix, k: int = 10, chunk: int = 1024) -> sp.csr_matrix:
    """Binary (rows x rows) graph linking each row of ``matrix`` to its ``k`` most cosine-similar other rows.

    cos(r, s) = <x_r, x_s> / (‖x_r‖ ‖x_s‖) over the rows of ``matrix`` (method.md 5.4, UU / II).
    Computed sparsely: for each chunk of ``chunk`` rows, the (chunk x rows) sparse product of the
    normalised rows with all rows, then the top-k entries of each row. Only rows sharing at least one
    column are candidates (similarity > 0), the row itself is excluded, and ties are broken by the
    smaller column ID, so the result does not depend on ``chunk``. Rows without any interaction have no
    neighbours. No dense rows x rows matrix is built.
    """
    k, chunk = check_int("k", k), check_int("chunk", chunk)
    x = sp.csr_matrix(matrix, dtype=np.float64)
    n = x.shape[0]
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    with np.errstate(divide="ignore"):
        inv = np.where(norms > 0, 1.0 / norms, 0.0)
    x = sp.csr_matrix(sp.diags(inv) @ x)
    xt = x.T.tocsr()
    out_rows, out_cols = [], []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sim = sp.csr_matrix(x[start:stop] @ xt)
        sim.sort_indices()
        r = np.repeat(np.arange(stop - start), np.diff(sim.indptr))
        keep = (sim.data > 0) & (sim.indices != r + start)
        r, c, v = r[keep], sim.indices[keep].astype(np.int64), sim.data[keep]
        bounds = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=stop - start))])
        for row in range(stop - start):
            lo, hi = bounds[row], bounds[row + 1]
            if hi > lo:
                chosen = _top_k(v[lo:hi], c[lo:hi], k)
                out_rows.append(np.full(len(chosen), start + row, dtype=np.int64))
                out_cols.append(chosen)
    rows = np.concatenate(out_rows) if out_rows else np.zeros(0, dtype=np.int64)
    cols = np.concatenate(out_cols) if out_cols else np.zeros(0, dtype=np.int64)
    g = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, n))
    g.sort_indices()
    return g


def _top_k(values: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
    """The columns of the ``k`` largest ``values``, ties at the boundary going to smaller columns (``cols`` ascending)."""
    if len(values) <= k:
        return cols
    kth = np.partition(values, len(values) - k)[len(values) - k]
    above = cols[values > kth]
    tied = cols[values == kth]
    return np.concatenate([above, tied[: k - len(above)]])


# ---------------------------------------------------------------------------------------------
# the contrastive term
# ---------------------------------------------------------------------------------------------


def _mask_triplets(mask, shape: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(rows, cols, values) of a sparse mask (scipy or torch sparse); ``None`` for a dense one."""
    if sp.issparse(mask):
        m = sp.coo_matrix(mask)
        if m.shape != shape:
            raise ValueError(f"mask shape {m.shape} != {shape}")
        rows = torch.from_numpy(m.row.astype(np.int64)).to(device)
        cols = torch.from_numpy(m.col.astype(np.int64)).to(device)
        vals = torch.from_numpy(m.data.astype(np.float32)).to(device)
        return rows, cols, vals
    if isinstance(mask, torch.Tensor) and mask.layout != torch.strided:
        m = mask.to_sparse_coo().coalesce()
        if tuple(m.shape) != shape:
            raise ValueError(f"mask shape {tuple(m.shape)} != {shape}")
        idx = m.indices().to(device)
        return idx[0], idx[1], m.values().to(device=device, dtype=torch.float32)
    return None


@dataclass(frozen=True)
class CandidateSet:
    """A sampled candidate set C = P ∪ R for one contrastive term, and the mask re-indexed onto C.

    ``index`` (|C|,): entity IDs of the candidates, first the mask columns P (sorted), then the
    sampled columns R outside P; ``offset`` (|C|,): the sampled-softmax correction added to the logits
    (0 on P, log((N − |P|) / |R|) on R); ``rows`` / ``cols`` / ``vals``: the mask's non-zeros with
    ``cols`` indexing C; ``n_rows``: B; ``n_mask_cols``: |P| (the first |P| entries of ``index``).
    Built by :func:`sample_candidates`.
    """

    index: torch.Tensor
    offset: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    n_rows: int
    n_mask_cols: int


def sample_candidates(
    mask, n: int, size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> CandidateSet | None:
    """Sample a candidate set of ``size`` + mask columns among ``n`` entities; ``None`` when size >= n (exact).

    P = the union of the non-zero columns of ``mask`` (B x n; scipy sparse, torch sparse or dense) over
    all its rows; S = ``size`` entities are drawn uniformly without replacement from all n (with
    ``generator``, on the CPU, so a seeded generator gives the same draw on every device); R = the drawn
    entities outside P. The logits of R get the correction log((n − |P|) / |R|): given |R|, R is a
    uniform |R|-subset of the n − |P| columns outside P, so (n − |P|)/|R| · Σ_{j∈R} exp(s_rj) is an
    unbiased estimate of Σ_{j∉P} exp(s_rj), and Σ_{j∈C} exp(s_rj + offset_j) an unbiased estimate of
    each row's full partition function (its log is biased low by Jensen, little for moderate S). With
    |R| = 0 (every draw hit P) nothing outside P is represented and the softmax runs over P alone.
    """
    if size < 1:
        raise ValueError(f"candidates must be >= 1, not {size}")
    if size >= n:
        return None
    b = mask.shape[0]
    trip = _mask_triplets(mask, (b, n), torch.device(device))
    if trip is None:
        m = torch.as_tensor(mask, device=device)
        if tuple(m.shape) != (b, n):
            raise ValueError(f"mask shape {tuple(m.shape)} != {(b, n)}")
        rows, cols = torch.nonzero(m, as_tuple=True)
        vals = m[rows, cols].to(torch.float32)
    else:
        rows, cols, vals = trip
    pos = torch.unique(cols.cpu())  # sorted
    drawn = torch.randperm(n, generator=generator)[:size]
    rest = drawn[~torch.isin(drawn, pos)]
    rest = rest.sort().values
    index = torch.cat([pos, rest]).to(device)
    offset = torch.zeros(len(index), dtype=torch.float32)
    if len(rest):
        offset[len(pos) :] = math.log((n - len(pos)) / len(rest))
    cols_c = torch.searchsorted(pos.to(device), cols)
    return CandidateSet(index, offset.to(device), rows, cols_c, vals, b, len(pos))


def contrastive_rows(
    a: torch.Tensor,
    cand: torch.Tensor,
    mask,
    tau: float = 5.0,
    candidates: int | None = None,
    generator: torch.Generator | None = None,
    candidate_set: CandidateSet | None = None,
    candidate_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row contrastive losses ℓ_r and the boolean mask of rows with Σ_j M_rj > 0.

    ℓ_r = −Σ_j M_rj · log softmax_j(a_r · cand_jᵀ / τ) / Σ_j M_rj   (0 for rows without any weight).

    ``a``: (B, d) anchors; ``cand``: (N, d) candidates; ``mask``: (B, N) non-negative weights, dense
    (tensor or array) or sparse (scipy, torch sparse). With a sparse mask only its non-zeros are
    gathered: ℓ_r = logsumexp_j(s_rj) − Σ_j M_rj s_rj / Σ_j M_rj.

    Sampled softmax (a speed-up, an approximation of method.md 5.4's full softmax over all N): with
    ``candidates`` = S < N, the softmax runs over C = (mask columns P) ∪ (S uniform draws, see
    :func:`sample_candidates`, with ``generator``) only, with the correction log((N − |P|)/|R|) on the
    logits of the drawn columns R outside P; the cost is O(B · |C|) instead of O(B · N). A prepared
    ``candidate_set`` (to share one draw across layers) takes precedence over ``candidates``; ``mask``
    is then ignored (the set holds it, re-indexed). ``candidates`` None or >= N: the exact softmax.
    ``candidate_rows`` (|C|, d): ``cand[candidate_set.index]`` when the caller has gathered it already.
    """
    if candidate_set is None and candidates is not None:
        candidate_set = sample_candidates(mask, cand.shape[0], candidates, generator, a.device)
    if candidate_set is not None:
        cs = candidate_set
        if cs.n_rows != a.shape[0]:
            raise ValueError(f"candidate set has {cs.n_rows} rows, anchors {a.shape[0]}")
        rows_c = take_rows(cand, cs.index) if candidate_rows is None else candidate_rows
        logits = a @ rows_c.T / tau + cs.offset.to(a.dtype)
        vals = cs.vals.to(logits.dtype)
        msum = logits.new_zeros(cs.n_rows).index_add(0, cs.rows, vals)
        pos = logits.new_zeros(cs.n_rows).index_add(0, cs.rows, vals * take_pairs(logits, cs.rows, cs.cols))
        weighted = msum * torch.logsumexp(logits, dim=1) - pos
        valid = msum > 0
        losses = torch.where(valid, weighted / msum.clamp_min(torch.finfo(logits.dtype).tiny), torch.zeros_like(weighted))
        return losses, valid
    shape = (a.shape[0], cand.shape[0])
    logits = a @ cand.T / tau
    trip = _mask_triplets(mask, shape, logits.device)
    if trip is None:
        m = torch.as_tensor(mask, dtype=logits.dtype, device=logits.device)
        if tuple(m.shape) != shape:
            raise ValueError(f"mask shape {tuple(m.shape)} != {shape}")
        msum = m.sum(1)
        weighted = -(m * F.log_softmax(logits, dim=1)).sum(1)
    else:
        rows, cols, vals = trip
        vals = vals.to(logits.dtype)
        msum = logits.new_zeros(shape[0]).index_add(0, rows, vals)
        pos = logits.new_zeros(shape[0]).index_add(0, rows, vals * take_pairs(logits, rows, cols))
        weighted = msum * torch.logsumexp(logits, dim=1) - pos
    valid = msum > 0
    losses = torch.where(valid, weighted / msum.clamp_min(torch.finfo(logits.dtype).tiny), torch.zeros_like(weighted))
    return losses, valid


def contrastive(
    a: torch.Tensor,
    cand: torch.Tensor,
    mask,
    tau: float = 5.0,
    row_weights: torch.Tensor | None = None,
    candidates: int | None = None,
    generator: torch.Generator | None = None,
    candidate_set: CandidateSet | None = None,
    candidate_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """L(a, N, M) = −mean_{r: Σ_j M_rj > 0} Σ_j M_rj · log softmax_j(a_r · N_jᵀ / τ) / Σ_j M_rj (method.md 5.4).

    ``row_weights`` (B,): optional per-row weights (PIW) multiplying each row's loss before the mean,
    a (B,) * (B,) product. ``candidates`` / ``generator`` / ``candidate_set`` / ``candidate_rows``: the
    sampled-softmax approximation of :func:`contrastive_rows` (None: exact). Returns a scalar; 0 when no
    row has weight.
    """
    losses, valid = contrastive_rows(a, cand, mask, tau, candidates, generator, candidate_set, candidate_rows)
    if row_weights is not None:
        if row_weights.shape != losses.shape:
            raise ValueError(f"row_weights shape {tuple(row_weights.shape)} != per-row losses {tuple(losses.shape)}")
        losses = losses * row_weights
    n = valid.sum()
    if n == 0:
        return losses.sum() * 0.0
    return losses[valid].sum() / n


# ---------------------------------------------------------------------------------------------
# the frozen old model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OldEmbeddings:
    """Per-layer (users, items) embeddings of the block k-1 model, frozen and indexed by entity ID.

    ``users[l]`` is a (U_{k-1}, d) tensor whose row r is user r's layer-l embedding (items likewise);
    layer 0 = ego tables. Look-ups are ``users[l][ids]`` with entity IDs, never positions in a list of
    old IDs (method.md 9).
    """

    users: tuple[torch.Tensor, ...]
    items: tuple[torch.Tensor, ...]

    def __post_init__(self):
        if len(self.users) != len(self.items) or not self.users:
            raise ValueError("OldEmbeddings needs the same non-zero number of user and item layers")

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: EmbeddingModel, train_matrix: sp.spmatrix | None = None) -> OldEmbeddings:
        """Snapshot ``model``'s per-layer embeddings with its block k-1 graph (detached copies).

        ``train_matrix``: R_{k-1}; if given, it is first set as the model's graph, otherwise the graph
        the model already holds is used (after :func:`ccdrec.train.loop.fit` on block k-1 it is R_{k-1}).
        """
        if not isinstance(model, EmbeddingModel):
            raise TypeError(f"LWC-KD needs an embedding model (MF, LightGCN), not {type(model).__name__}")
        if train_matrix is not None:
            model.set_graph(sp.csr_matrix(train_matrix))
        layers = model.layer_embeddings()
        users = tuple(u.detach().clone() for u, _ in layers)
        items = tuple(i.detach().clone() for _, i in layers)
        return cls(users, items)

    @property
    def n_users(self) -> int:
        return self.users[0].shape[0]

    @property
    def n_items(self) -> int:
        return self.items[0].shape[0]

    @property
    def n_layers(self) -> int:
        return len(self.users)

    def final_users(self) -> torch.Tensor:
        """The old final user representation: the mean of layers 0..L (LightGCN; MF: the ego table)."""
        return torch.stack(self.users).mean(0)

    def to(self, device: torch.device | str) -> OldEmbeddings:
        return OldEmbeddings(tuple(u.to(device) for u in self.users), tuple(i.to(device) for i in self.items))


# ---------------------------------------------------------------------------------------------
# personalised imitation weights
# ---------------------------------------------------------------------------------------------


class PIWNet(nn.Module):
    """s_u = softplus(MLP([ô_u, ĉ_u, ô_u ⊙ ĉ_u])) > 0, the raw personalised imitation weight of a user.

    ô_u, ĉ_u: the user's old and current final representations, L2-normalised (so the weights do not
    depend on the embeddings' overall scale, which grows during training) and detached (PIW must not
    move the embeddings to change its own weights). The authors' release used soft cluster assignments
    of the old and current embeddings as the "state vector"; the embeddings and their product carry
    the same preference-shift information without the extra clustering loss.
    """

    def __init__(self, dim: int, hidden: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Softplus())

    def forward(self, old: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        o = F.normalize(old.detach(), dim=-1)
        c = F.normalize(current.detach(), dim=-1)
        return self.mlp(torch.cat([o, c, o * c], dim=-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# the regulariser
# ---------------------------------------------------------------------------------------------


class LWCKD(Callback):
    """LWC-KD regulariser, a training-loop callback whose batch loss this is (method.md 5.3-5.4).

    ``old``: the block k-1 snapshot; ``old_matrix``: R_{k-1}, the block k-1 train matrix
    (U_{k-1} x I_{k-1}); ``tau``: temperature τ; ``weight``: λ_LWC; ``knn``: neighbours per node of the
    UU / II graphs; ``piw``: personalised imitation weights on UI and UU; ``terms``: which of
    ``ui, iu, uu, ii`` to use; ``piw_hidden`` / ``piw_lr``: the PIW network's width and Adam rate;
    ``knn_graphs``: precomputed (user, item) kNN graphs of R_{k-1} (``(lwc.user_knn, lwc.item_knn)`` of
    another member's LWCKD), so that several teacher members share one computation;
    ``candidates`` / ``seed``: the sampled softmax below. ``max_entities``: contrast at most this many
    of the batch's distinct old users (and old items) per call, a random subset (a speed-up: the term
    is a mean over entities, so a subset is an unbiased estimate of it).

    Sampled softmax (``candidates`` = S, an option; default None = method.md 5.4's exact full softmax).
    The full softmax costs O(B · N) per term and layer (B distinct batch entities, N old entities of
    the other side: ~700 x 11K-40K, 4 terms, all layers, forward and backward), too slow on a CPU for
    the CCD stream's thousands of teacher-update steps. With S, each call draws, per term, one
    candidate set C = P ∪ R shared by all layers (so the layers stay comparable): P = the union of the
    term's mask columns over the batch rows, and S entities drawn uniformly without replacement from
    the N old entities with a ``torch.Generator`` seeded by ``seed`` (runs are deterministic; the
    generator advances with every call); R = the draws outside P. Logits are computed against
    ``cand[C]`` only and the mask is re-indexed onto C, so time and memory are O(B · (|P| + S)).
    Correction (standard sampled softmax): the logits of R get + log((N − |P|) / |R|), which makes
    each row's partition estimate Σ_{j∈P} e^{s_j} + (N − |P|)/|R| · Σ_{j∈R} e^{s_j} unbiased (given
    |R|, R is a uniform subset of the N − |P| columns outside P); the log-partition, and so the loss, is
    then biased slightly low (Jensen), less as S grows. It is an approximation of method.md 5.4, a
    speed-up of the kind method.md allows when it keeps quality (tests: mean loss over seeds close to
    the exact one, gradient aligned with the exact gradient). S >= N uses the exact softmax.

    ``lwc(model, reps, users, pos_items, epoch)`` returns λ_LWC · mean_l Σ_terms L_term,l for the
    batch's *distinct* old users (ID < U_{k-1}) and old positive items (ID < I_{k-1}); new entities are
    ignored. Current layer embeddings come from the step's ``reps.layers`` (``propagate(with_layers=True)``),
    else from ``model.layer_embeddings()`` (MF: ``reps`` itself).

    PIW training: the network's parameters live here, not in the model, so fit()'s optimiser does not
    see them. The loss this call returns depends on them, so fit()'s ``backward()`` fills their
    gradients; the next call applies them with the network's own Adam step and clears them. The
    network thus trains jointly on the same total loss, lagging one minibatch.
    """

    uses_layers = True  # reads the step's per-layer embeddings (Callback.uses_layers)

    def __init__(
        self,
        old: OldEmbeddings,
        old_matrix: sp.spmatrix,
        tau: float = 5.0,
        weight: float = 0.01,
        knn: int = 10,
        piw: bool = False,
        terms: Sequence[str] = TERMS,
        piw_hidden: int = 16,
        piw_lr: float = 1e-3,
        knn_chunk: int = 1024,
        knn_graphs: tuple[sp.csr_matrix, sp.csr_matrix] | None = None,
        candidates: int | None = None,
        seed: int = 0,
        max_entities: int | None = None,
    ):
        unknown = set(terms) - set(TERMS)
        if unknown or not terms:
            raise ValueError(f"terms must be a non-empty subset of {TERMS}, got {tuple(terms)}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, not {tau}")
        if candidates is not None and candidates < 1:
            raise ValueError(f"candidates must be None or >= 1, not {candidates}")
        r = sp.csr_matrix(old_matrix, dtype=np.float32)
        if r.shape != (old.n_users, old.n_items):
            raise ValueError(f"old_matrix shape {r.shape} != old model universe {(old.n_users, old.n_items)}")
        self.old = old
        self.tau = float(tau)
        self.weight = float(weight)
        self.terms = tuple(terms)
        self.candidates = None if candidates is None else int(candidates)
        self.max_entities = None if max_entities is None else int(max_entities)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.r = r
        self.rt = r.T.tocsr()
        if knn_graphs is not None:
            self.user_knn, self.item_knn = (sp.csr_matrix(g) for g in knn_graphs)
            if self.user_knn.shape != (old.n_users, old.n_users) or self.item_knn.shape != (old.n_items, old.n_items):
                raise ValueError("knn_graphs must be (U_{k-1} x U_{k-1}, I_{k-1} x I_{k-1})")
        else:
            self.user_knn = knn_graph(r, knn, knn_chunk) if "uu" in self.terms else None
            self.item_knn = knn_graph(self.rt, knn, knn_chunk) if "ii" in self.terms else None
        self.piw = piw
        self.piw_net: PIWNet | None = None
        self.piw_opt: torch.optim.Optimizer | None = None
        if piw:
            self.piw_net = PIWNet(old.users[0].shape[1], piw_hidden)
            self.piw_opt = torch.optim.Adam(self.piw_net.parameters(), lr=piw_lr)
        self.last_terms: dict[str, torch.Tensor] = {}
        self.last_piw: torch.Tensor | None = None
        self._old_final: torch.Tensor | None = None

    @property
    def n_old_users(self) -> int:
        return self.old.n_users

    @property
    def n_old_items(self) -> int:
        return self.old.n_items

    def parameters(self):
        """The PIW network's parameters (empty without PIW); they are trained by this object's own optimiser."""
        return iter(()) if self.piw_net is None else self.piw_net.parameters()

    def __call__(self, model: EmbeddingModel, reps, users: np.ndarray, pos_items: np.ndarray, epoch: int = 0) -> torch.Tensor:
        if not isinstance(model, EmbeddingModel):
            raise TypeError(f"LWC-KD needs an embedding model (MF, LightGCN), not {type(model).__name__}")
        self.step_piw()
        if self.old.n_layers == 1 and reps is not None and getattr(model, "layers", 0) == 0:
            layers = [tuple(reps)]
        elif getattr(reps, "layers", None) is not None:
            layers = reps.layers  # the step's own propagation (Representations): no second pass over the graph
        else:
            layers = model.layer_embeddings()
        final_users = reps[0] if reps is not None else None
        return self.loss_from_layers(layers, users, pos_items, final_users)

    batch_loss = __call__

    def step_piw(self) -> None:
        """Apply the PIW gradients left by the last backward pass (no-op without PIW or gradients)."""
        if self.piw_net is None or self.piw_opt is None:
            return
        if any(p.grad is not None for p in self.piw_net.parameters()):
            self.piw_opt.step()
            self.piw_opt.zero_grad(set_to_none=True)

    def piw_weights(self, users: torch.Tensor, current_final_users: torch.Tensor) -> torch.Tensor:
        """w_u = s_u / mean_v s_v over ``users`` (IDs), from old vs current final representations; (B,)."""
        assert self.piw_net is not None
        dev = current_final_users.device
        if next(self.piw_net.parameters()).device != dev:
            self.piw_net.to(dev)
        if self._old_final is None or self._old_final.device != dev:
            self._old_final = self.old.final_users().to(dev)
        old_final = self._old_final[users]
        s = self.piw_net(old_final, take_rows(current_final_users, users))
        return s / s.mean().clamp_min(1e-12)

    def _subsample(self, ids: np.ndarray, n_old: int) -> np.ndarray:
        """The batch's old entities, at most ``max_entities`` of them (drawn with the object's generator)."""
        ids = ids[ids < n_old]
        if self.max_entities is not None and len(ids) > self.max_entities:
            keep = torch.randperm(len(ids), generator=self.generator)[: self.max_entities].numpy()
            ids = np.sort(ids[keep])
        return ids

    def loss_from_layers(
        self,
        layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
        users: np.ndarray,
        pos_items: np.ndarray,
        current_final_users: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """λ_LWC · mean_l Σ_terms L_term,l for the current per-layer ``layers`` (IDs in ``users`` / ``pos_items``).

        ``current_final_users``: the current final user representation for PIW (default: mean of layers).
        """
        if len(layers) != self.old.n_layers:
            raise ValueError(f"current model has {len(layers)} layers, the old snapshot {self.old.n_layers}")
        dev = layers[0][0].device
        if self.old.users[0].device != dev:
            self.old = self.old.to(dev)
        u_old, i_old = self.n_old_users, self.n_old_items
        users = self._subsample(np.unique(np.asarray(users, dtype=np.int64)), u_old)
        items = self._subsample(np.unique(np.asarray(pos_items, dtype=np.int64)), i_old)
        u_t = torch.from_numpy(users).to(dev)
        i_t = torch.from_numpy(items).to(dev)

        # Row masks, sliced by ID: row r of each mask belongs to entity users[r] / items[r].
        masks = {
            "ui": self.r[users] if "ui" in self.terms else None,
            "iu": self.rt[items] if "iu" in self.terms else None,
            "uu": self.user_knn[users] if "uu" in self.terms else None,
            "ii": self.item_knn[items] if "ii" in self.terms else None,
        }
        w = None
        self.last_piw = None
        if self.piw_net is not None and len(users) and ({"ui", "uu"} & set(self.terms)):
            has_items = np.diff(self.r[users].indptr) > 0
            if has_items.any():
                if current_final_users is None:
                    current_final_users = torch.stack([u for u, _ in layers]).mean(0)
                w = torch.zeros(len(users), device=dev)
                keep = torch.from_numpy(has_items).to(dev)
                w[keep] = self.piw_weights(u_t[keep], current_final_users)
                self.last_piw = w.detach()

        # Sampled softmax: one candidate set per term and call, shared by all layers (None: exact).
        sets: dict[str, CandidateSet | None] = dict.fromkeys(TERMS)
        if self.candidates is not None:
            n_side = {"ui": i_old, "iu": u_old, "uu": u_old, "ii": i_old}
            n_rows = {"ui": len(users), "iu": len(items), "uu": len(users), "ii": len(items)}
            for t in TERMS:  # fixed order: the generator's draws do not depend on the terms' order
                if t in self.terms and n_rows[t]:
                    sets[t] = sample_candidates(masks[t], n_side[t], self.candidates, self.generator, dev)

        # Per term: the side of its anchors (old embeddings) and of its candidates (current embeddings).
        anchor_side = {"ui": "users", "uu": "users", "iu": "items", "ii": "items"}
        cand_side = {"ui": "items", "ii": "items", "iu": "users", "uu": "users"}
        n_old = {"users": u_old, "items": i_old}
        n_anchors = {"users": len(users), "items": len(items)}
        # The sampled terms of one candidate side gather their candidates' rows of a layer together, once,
        # from the union of their candidate sets: the backward pass then scatters into each layer's table
        # once per side, not once per term.
        union: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # term -> (its side's union U, positions in U)
        for same in (("ui", "ii"), ("iu", "uu")):
            present = [t for t in same if sets[t] is not None]
            if present:
                ids = torch.unique(torch.cat([sets[t].index for t in present]))  # sorted
                union.update({t: (ids, torch.searchsorted(ids, sets[t].index)) for t in present})

        sums = {t: torch.zeros((), device=dev) for t in self.terms}
        for layer, (cur_u, cur_i) in enumerate(layers):
            current = {"users": cur_u, "items": cur_i}
            anchors = {"users": self.old.users[layer][u_t], "items": self.old.items[layer][i_t]}
            gathered: dict[str, torch.Tensor] = {}  # candidate side -> rows of its union
            for t in self.terms:
                a_side, c_side = anchor_side[t], cand_side[t]
                if not n_anchors[a_side]:
                    continue
                rows = None
                if t in union:
                    ids, positions = union[t]
                    if c_side not in gathered:
                        gathered[c_side] = take_rows(current[c_side], ids)
                    rows = take_rows(gathered[c_side], positions)
                cand = current[c_side][: n_old[c_side]]
                weights = w if a_side == "users" else None
                loss = contrastive(anchors[a_side], cand, masks[t], self.tau, weights, candidate_set=sets[t], candidate_rows=rows)
                sums[t] = sums[t] + loss
        n_layers = len(layers)
        self.last_terms = {t: (v / n_layers).detach() for t, v in sums.items()}
        total = sum(sums.values()) / n_layers
        return self.weight * total
