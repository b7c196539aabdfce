"""Typed, validated configuration (pydantic). Every field is documented; unknown keys are errors."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ccdrec.errors import InvalidArgument


def validation_message(e: ValidationError) -> str:
    """The first problem of a pydantic validation error, as ``field.path: message``."""
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(err.get("input"), str) and err["input"].strip().lower() == "none":
        msg += " (no value is written null)"
    last = str(err["loc"][-1]) if err["loc"] else ""
    if err["type"] == "extra_forbidden" and "." in last:  # a dotted key in a file: student.model.dim: 16
        nested = last.split(".")
        msg += f" (a file nests fields: {': {'.join(nested[:-1])}: {{{nested[-1]}: ...}}{'}' * (len(nested) - 2)})"
    return f"{where}: {msg}" if where else msg


ReplayLabels = Literal["source", "rank"]
"""How replayed pairs are labelled: ``source`` = σ(s_X(u, i)) as method.md 5.1 / 5.3 write it;
``rank`` = σ of the current model's own score at the source's rank position (the teacher default:
on Yelp, validation H of a teacher member's update at block 2 is 0.0780 with rank labels against
0.0592 with source labels, 0.0751 without student-side replay)."""


class Strict(BaseModel):
    # unknown keys are errors; so are infinite and NaN numbers (a learning rate of inf trains to NaN weights)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value, info):
        """``true`` / ``false`` only where a field is a switch: pydantic would read ``max_steps=true`` as 1,
        ``lr=false`` as 0.0, ``ks=[20, true]`` as [20, 1] and a ``blocks`` key ``true`` (or ``1.0``) as block 1,
        which hides a mistyped key or value."""
        annotation = cls.model_fields[info.field_name].annotation
        if annotation is bool:
            return value
        if isinstance(value, bool):
            raise ValueError(f"takes a {_kind(annotation)}, not {str(value).lower()}")
        if isinstance(value, list | tuple):
            for pos, x in enumerate(value):
                if isinstance(x, bool):
                    raise ValueError(f"item {pos} takes a {_kind(annotation)}, not {str(x).lower()}")
        if isinstance(value, dict):
            for key in value:
                if isinstance(key, bool | float):
                    raise ValueError(f"key {key!r} is not a whole number or a name")
        return value

    def checked(self) -> Strict:
        """A copy of this configuration validated again, field by field and nested: ``model_copy(update=...)``
        and ``copy.copy`` skip pydantic's checks, so a value of the wrong type or out of range (``epochs=0``,
        ``lr="0.01"``, ``seed=-1``), or a field that does not exist, reaches the code that uses it. Each such
        mistake is an :class:`InvalidArgument` naming the field (``field.path: message``)."""
        for model, path in _nested(self, ""):
            extra = sorted(set(model.__dict__) - set(type(model).model_fields))
            if extra:
                raise InvalidArgument(f"{path}{extra[0]}: {type(model).__name__} has no such field")
        try:
            return type(self).model_validate(self.model_dump(warnings=False))
        except ValidationError as e:
            raise InvalidArgument(validation_message(e)) from None


def _nested(model: BaseModel, path: str):
    """``model`` and every configuration nested in it (fields, lists and mappings of them), with their dotted paths."""
    yield model, path
    for name in type(model).model_fields:
        value = model.__dict__.get(name)
        values = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else [(None, value)]
        for key, v in values:
            if isinstance(v, BaseModel):
                yield from _nested(v, f"{path}{name}." + ("" if key is None else f"{key}."))


def _kind(annotation) -> str:
    """What a field takes, in words, for an error message."""
    text = str(annotation)
    if "Literal" in text or annotation is str:
        return "name"
    return "number" if ("int" in text or "float" in text) else "value"


class ModelConfig(Strict):
    """One model's architecture."""

    kind: Literal["mf", "lightgcn", "vae"] = Field("lightgcn", description="model family")
    dim: int = Field(64, ge=1, description="embedding / latent dimension")
    layers: int = Field(2, ge=0, description="LightGCN propagation layers (ignored by MF and VAE)")
    dropout: float = Field(0.5, ge=0, lt=1, description="Mult-VAE input dropout")

    @model_validator(mode="after")
    def _fields_of_its_family(self):
        """``layers`` other than the default on an MF or Mult-VAE model (``dropout`` on an embedding model)
        is an error: the model has no such part, and the value was silently ignored (as ``train`` refuses
        ``--layers`` for ``--model mf``). The defaults stay valid: a stored configuration writes every field."""
        default = type(self).model_fields
        if self.kind != "lightgcn" and self.layers != default["layers"].default:
            raise ValueError(f"layers is the number of LightGCN propagation layers; kind {self.kind} has none")
        if self.kind != "vae" and self.dropout != default["dropout"].default:
            raise ValueError(f"dropout is the Mult-VAE's input dropout; kind {self.kind} has none")
        return self

    def kwargs(self) -> dict:
        if self.kind == "lightgcn":
            return {"dim": self.dim, "layers": self.layers}
        if self.kind == "vae":
            return {"dim": self.dim, "dropout": self.dropout}
        return {"dim": self.dim}


# An epoch of an embedding model propagates its whole graph at every step, so with a fixed batch its cost
# grows as interactions^2 (benchmarks/scaling.py: slope 1.95). Bounding the steps per epoch makes it linear:
# past MAX_STEPS steps the batch grows instead. 512 is above every bundled preset's largest epoch (Gowalla
# D_0 distillation: 408 steps of 1,024 pairs), so their schedules and results are unchanged; it binds from
# about 2M pairs per epoch at batch 4,096.
MAX_STEPS = 512
SEED_MAX = 2**32 - 1  # the largest run seed (numpy's and torch's generators take it whole)
# The replay draw ranks every replayed user over every item (rank_W, method.md 5.1): users x items. Past
# RANK_SAMPLE items an embedding model's rank_W is estimated from that many sampled items instead; the
# bundled streams (12K and 41K items) and ml-100k stay below it and are ranked exactly.
RANK_SAMPLE = 65_536


def bounded_batch(n: int, batch_size: int, max_steps: int | None) -> int:
    """Minibatch size of an epoch over ``n`` examples: ``batch_size``, grown to ceil(n / max_steps) when
    the epoch would take more than ``max_steps`` steps (None: ``batch_size`` always)."""
    if max_steps is None:
        return batch_size
    return max(batch_size, -(-n // max_steps))


class TrainConfig(Strict):
    """One training run on one block: optimiser, sampling and early stopping (method.md 4)."""

    epochs: int = Field(100, ge=1, description="maximum number of epochs")
    batch_size: int = Field(2048, ge=1, description="positive pairs (BPR) or users (VAE) per step")
    max_steps: int | None = Field(
        MAX_STEPS,
        ge=1,
        description="at most this many steps per epoch; a larger epoch's batch (BPR pairs, Mult-VAE users) grows to "
        "ceil(size / max_steps), so that an epoch propagates the graph a bounded number of times (null: always batch_size)",
    )
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0, description="weight decay (Adam: L2 added to the gradient; AdamW: decoupled)")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="Adam (coupled weight decay) or AdamW (decoupled)")
    lr_decay: float = Field(1.0, gt=0, le=1, description="multiply the learning rate by this after every epoch")
    l2: float = Field(1e-4, ge=0, description="L2 weight on the batch's ego embeddings (BPR models)")
    negatives: int = Field(1, ge=1, description="sampled negatives per positive pair (BPR)")
    patience: int = Field(10, ge=1, description="evaluations without validation gain before stopping")
    eval_every: int = Field(1, ge=1, description="validate every this many epochs (and after the last)")
    min_epochs: int = Field(0, ge=0, description="never stop before this many epochs")
    beta_max: float = Field(0.2, ge=0, description="Mult-VAE: KL weight β after annealing")
    anneal_steps: int = Field(2000, ge=1, description="Mult-VAE: optimiser steps over which β rises to beta_max")
    eval_chunk: int = Field(1024, ge=1, description="users per chunk in full-ranking evaluation")
    select_metric: str = Field(
        "recall@20",
        pattern=r"^(recall|ndcg)@[1-9][0-9]*$",
        description="validation metric for model selection: recall@K or ndcg@K",
    )
    select_on: Literal["block", "stream"] = Field(
        "block",
        description=(
            "what model selection and early stopping read after block 0: block = the validation split of the block "
            "trained on (method.md 3); stream = the harmonic mean of that and the mean over every earlier block's "
            "validation split, the protocol's H_k (method.md 8) on validation, so that a training that forgets is "
            "stopped (beyond the paper)"
        ),
    )


DevicePref = Literal["auto", "cpu", "cuda"]


# Default single-model schedules per model family (method.md 4: "faster schedules are welcome if they
# reach at least the same validation quality"). BPR models use large batches, a high Adam learning rate
# decayed by 3% per epoch, and L2 on the batch's ego embeddings instead of Adam's coupled weight decay:
# at these batch sizes coupled decay (the reference 1e-4) pulls rarely updated rows to zero faster than
# BPR moves them, and the model never leaves the popularity ranking (measured on Yelp D_0: validation
# Recall@20 stays at 0.086-0.090). Chosen on Yelp D_0 validation Recall@20 (LightGCN-128, best epoch in
# brackets): L2 1e-2 without decay 0.1159 (56); L2 1e-3 without decay 0.1214 (50, noisy from epoch to
# epoch); L2 1e-3 with decay 0.1245 (56); L2 3e-3 with decay 0.1277 (72).
BPR_SCHEDULE = TrainConfig(
    epochs=150, batch_size=4096, lr=1e-2, lr_decay=0.97, weight_decay=0.0, l2=3e-3, negatives=4, eval_every=2, patience=6
)
VAE_SCHEDULE = TrainConfig(epochs=100, batch_size=256, lr=1e-3, weight_decay=0.0, eval_every=2, patience=6, anneal_steps=2000)
DEFAULT_SCHEDULES = {"mf": BPR_SCHEDULE, "lightgcn": BPR_SCHEDULE, "vae": VAE_SCHEDULE}


def default_schedule(kind: str) -> TrainConfig:
    """The block-0 schedule of a model family (``mf``, ``lightgcn`` or ``vae``), a fresh copy; another
    ``kind`` is an :class:`~ccdrec.errors.InvalidArgument`."""
    if not isinstance(kind, str) or kind not in DEFAULT_SCHEDULES:
        raise InvalidArgument(f"no default schedule for {kind!r}: the model families are {', '.join(DEFAULT_SCHEDULES)}")
    return DEFAULT_SCHEDULES[kind].model_copy()


class MemberConfig(ModelConfig):
    """One teacher member: an architecture and its own seed."""

    seed: int = Field(0, ge=0, description="member seed (initialisation and sampling)")


class ReplayConfig(Strict):
    """Proxy-guided replay budget (method.md 5.1, 5.3)."""

    top_a: int = Field(50, ge=1, description="A: candidates = each source's top-A items per user")
    n_stability: int = Field(1, ge=0, description="n_S: items drawn per user from the stability proxy")
    n_plasticity: int = Field(0, ge=0, description="n_P: items drawn per user from the plasticity proxy")
    n_student: int = Field(0, ge=0, description="n_C: items drawn per user from the served student (teacher side)")
    eps: float = Field(1e-4, ge=0, description="ε: draw probability ∝ exp(ε · rank disparity)")
    scale: float = Field(0.5, ge=0, description="replay weight λ_e = scale · exp(-e / decay)")
    decay: float = Field(10.0, gt=0, description="replay weight decay (10 student, 5 teacher)")
    resample_every: int = Field(1, ge=1, description="re-draw the replay set every this many epochs, as the model moves")
    batch_size: int = Field(8192, ge=1, description="replayed pairs per step of the replay pass")
    max_steps: int | None = Field(
        MAX_STEPS, ge=1, description="at most this many steps per replay pass; a larger pass's batch grows (None: no bound)"
    )
    labels: ReplayLabels = Field(
        "source", description="replay labels: source = σ(s_X); rank = σ(own score at the source's rank position)"
    )
    momentum: Literal["shared", "own"] = Field(
        "shared",
        description=(
            "Adam's first moment in the replay pass: shared = the epoch's, so the replay steps carry the BPR pass's "
            "momentum on and move every row in its direction; own = one of the replay pass's own, kept from pass to "
            "pass, swapped in for the pass (the second moment stays shared; beyond the paper)"
        ),
    )
    rank_sample: int | None = Field(
        RANK_SAMPLE,
        ge=1,
        description=(
            "rank_W of an embedding model estimated from this many uniformly sampled items per user chunk when the "
            "universe has more items (the draw's cost then stays linear in the users, not users x items); "
            "None: always the exact full ranking (beyond the paper)"
        ),
    )


class TeacherConfig(Strict):
    """The teacher system: ensemble members and how they are trained and updated (method.md 4, 5.3)."""

    members: list[MemberConfig] = Field(
        default_factory=lambda: [MemberConfig(kind="lightgcn", dim=128, seed=s) for s in range(5)],
        min_length=1,
        description="ensemble members",
    )
    base: TrainConfig = Field(default_factory=lambda: default_schedule("lightgcn"), description="block-0 schedule of BPR members")
    base_vae: TrainConfig = Field(
        default_factory=lambda: default_schedule("vae"), description="block-0 schedule of Mult-VAE members"
    )
    update: TrainConfig = Field(
        # lr tuned on validation H of block 1 (Yelp, one member): 5e-4 0.061, 1e-3 0.069, 2e-3 0.078, 5e-3 0.084, 1e-2 0.082
        # (finetune's update, the competitors' schedule too, with the same trials: 0.0610 0.0695 0.0804 0.0892 0.0865)
        # The 10-epoch cap is a stability budget, chosen on validation: early stopping on block k's validation
        # split (40 epochs, patience 3) lets the update forget. ml-100k, 5 blocks, 3 seeds, teacher H-mean
        # 0.2687 +- 0.0006 capped, 0.2561 +- 0.0048 with early stopping (RA 0.2448 -> 0.2163).
        # validated every other epoch (and after the last): a teacher's full-ranking validation costs
        # about as much as an epoch of its update
        default_factory=lambda: TrainConfig(epochs=10, patience=10, lr=5e-3, l2=1e-2, batch_size=2048, eval_every=2),
        description="stage-3 schedule (BPR members)",
    )
    update_vae: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=10, patience=10, batch_size=256, lr=1e-3, weight_decay=0.0, eval_every=2),
        description="stage-3 schedule (Mult-VAE members)",
    )
    lwc_weight: float = Field(0.01, ge=0, description="λ_LWC: weight of LWC-KD in the teacher update")
    tau: float = Field(5.0, gt=0, description="LWC-KD temperature τ")
    knn: int = Field(10, ge=1, description="neighbours per node of the LWC-KD UU / II graphs")
    lwc_candidates: int | None = Field(
        1024, ge=1, description="LWC-KD softmax over the positives plus this many sampled entities (None: all old entities)"
    )
    lwc_entities: int | None = Field(
        256, ge=1, description="LWC-KD: contrast at most this many of a batch's old users (and items) per step (None: all)"
    )
    ensemble_exact_top: int | None = Field(
        None, ge=1, description="rank ensemble: exact ranks for each member's top-N only, sketched below (None: exact)"
    )
    replay: ReplayConfig = Field(
        default_factory=lambda: ReplayConfig(
            top_a=100, n_stability=5, n_plasticity=0, n_student=5, decay=5.0, resample_every=5, labels="rank"
        ),
        description="replay from SP, PP and CL_k into every member",
    )
    vae_replay_value: float = Field(0.1, ge=0, le=1, description="Mult-VAE: input/target value of replayed pairs")
    vae_kl_weight: float = Field(1.0, ge=0, description="Mult-VAE: weight of KL(previous output ‖ current)")
    student_knowledge: bool = Field(True, description="replay student-side knowledge (SP, PP, CL_k) into the teacher")
    avoid_top: int = Field(
        0,
        ge=0,
        description="BPR negatives of old users in a teacher update avoid the top-N of E (as last distilled), SP, PP and "
        "CL_k (the authors' code: 40; 0: off, method.md 5.3 names none)",
    )
    update_every: int = Field(
        1,
        ge=1,
        description=(
            "teacher update cycle CT in student cycles (blocks): the teacher system is updated at blocks m, 2m, ... on "
            "the train pairs of every block since its last update; the student at every block (1: every block)"
        ),
    )

    @field_validator("members")
    @classmethod
    def _distinct_members(cls, members: list[MemberConfig]) -> list[MemberConfig]:
        """Two members of the same architecture and seed train the same model: the ensemble would count one
        model twice at twice the cost (a copied line in a configuration, or a seed left out)."""
        seen: dict[str, int] = {}
        for i, m in enumerate(members):
            key = m.model_dump_json()
            if key in seen:
                raise ValueError(
                    f"members {seen[key]} and {i} are the same model ({m.kind}, dim {m.dim}, seed {m.seed}): "
                    "give each member its own seed"
                )
            seen[key] = i
        return members

    def is_teacher_cycle(self, k: int) -> bool:
        """Whether block k >= 1 updates the teacher system (block 0 trains it)."""
        return k % self.update_every == 0

    def last_cycle(self, k: int) -> int:
        """The block of the last teacher update at or before block k (0: the teacher system trained on block 0)."""
        return k - k % self.update_every

    def span_start(self, k: int) -> int:
        """The first block of the train pairs the teacher update of teacher cycle k learns from."""
        return k - self.update_every + 1


class StudentConfig(Strict):
    """The served student: distillation (stage 1) and continual update (stage 2)."""

    model: ModelConfig = Field(default_factory=lambda: ModelConfig(kind="lightgcn", dim=8), description="architecture")

    @field_validator("model", mode="before")
    @classmethod
    def _embedding_student(cls, model):
        """The student is distilled by ranking (RRD, method.md 4) and replays through its embeddings: MF or
        LightGCN; another kind (``vae``, a typo) is named with the two it can be, not the teachers' three."""
        if not isinstance(model, dict | ModelConfig):
            raise ValueError(
                f"takes a mapping such as {{kind: mf, dim: 16}}, not {model!r:.40}; one field is set as student.model.kind=mf"
            )
        kind = model.get("kind", "lightgcn") if isinstance(model, dict) else model.kind
        if kind not in ("mf", "lightgcn"):
            raise ValueError(
                f"the student is an embedding model: kind mf or lightgcn, not {kind!r} (a Mult-VAE can be a teacher member)"
            )
        return model

    distill: TrainConfig = Field(
        # 10 epochs, chosen on validation: early stopping instead (40 epochs, patience 3) gave the served student
        # -0.0061, +0.0097, +0.0162 (ml-100k, 5 blocks, seeds 0-2, validation H-mean; not a gain on every seed),
        # the teacher -0.0007, -0.0026, -0.0036, at 1.6x the distillation time
        default_factory=lambda: TrainConfig(epochs=10, batch_size=1024, lr=5e-3, patience=10),
        description="stage-1 schedule (BPR + RRD + IR-RRD)",
    )
    topn: int = Field(40, ge=1, description="length of the teacher's interesting lists (capped at the items, users they rank)")
    user_samples: int = Field(1000, ge=1, description="uninteresting items sampled per user (RRD)")
    item_samples: int = Field(1000, ge=1, description="uninteresting users sampled per item (IR-RRD)")
    rrd_weight: float = Field(0.01, ge=0, description="weight of RRD and of IR-RRD")
    update: TrainConfig = Field(
        # lr on validation H of block 1 (Yelp): 1e-3 0.0879, 5e-3 0.0893 (finetune's student update: 0.0742, 0.0792)
        default_factory=lambda: TrainConfig(epochs=10, patience=10, lr=5e-3),
        description="stage-2 schedule",
    )
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="replay from SP and PP into the student")
    w_stability: float = Field(1.0, ge=0, le=1, description="w_S: EMA weight of the stability proxy")
    w_plasticity: float = Field(0.0, ge=0, le=1, description="w_P: EMA weight of the plasticity proxy")
    init: Literal["entity", "one_hop", "random"] = Field("entity", description="initialisation of new rows")
    avoid_top: int = Field(40, ge=0, description="BPR negatives of old users avoid the top-N of E, D, SP, PP")
    redistill: bool = Field(True, description="distil a fresh student D_k from E_k after every block")
    # Beyond the paper, chosen on validation (ml-100k, 5 blocks, 3 seeds, served student H-mean of Recall@20):
    # update (then named served) 0.2325 +- 0.0041, scratch 0.2149 +- 0.0089 (finetune 0.2286 +- 0.0036); D_k
    # keeps 0.89-0.99 of E_k's RA instead of 0.49-0.77. The paper's choice, scratch, stays one switch away (and in
    # the paper-yelp preset).
    distill_from: Literal["scratch", "update"] = Field(
        "update",
        description=(
            "where D_k (k >= 1) starts: update = the student cycle's CL_k, so D_k keeps what CL_k knows of old "
            "users (beyond the paper; the default, chosen on validation); scratch = fresh random weights (the paper, "
            "method.md 7). `served`, its name before D_k could be served, is read as update"
        ),
    )

    @field_validator("distill_from", mode="before")
    @classmethod
    def _distill_from_old_name(cls, value):
        """``served`` named CL_k when CL_k was always the student served; it is read as ``update``, so that
        stored configurations and run directories written with it keep their meaning."""
        return "update" if value == "served" else value

    # Beyond the paper, chosen on validation (stream H-mean of Recall@20, D_k against CL_k, every seed higher):
    # Yelp 0.0762 +- 0.0004 vs 0.0711 +- 0.0006 (3 seeds), Gowalla 0.1400 vs 0.1231 (3 seeds), ml-100k 5 blocks
    # 0.2369 +- 0.0017 vs 0.2340 +- 0.0047 (3 seeds); finetune's student 0.0685, 0.1230, 0.2286. D_k learns the
    # block far better (LA 0.10 vs 0.08 Yelp, 0.146 vs 0.106 Gowalla) at about CL_k's RA.
    serve: Literal["update", "distilled"] = Field(
        "distilled",
        description=(
            "the student served after a teacher cycle: distilled = the new D_k, as soon as the cycle has distilled "
            "it, until the next student cycle updates it (beyond the paper; the default, chosen on validation); "
            "update = the student cycle's CL_k (the paper, method.md 8). Between teacher cycles CL_k is served either way"
        ),
    )
    distill_cover: bool = Field(
        False,
        description=(
            "every distillation epoch distils every user and item with a teacher list once (RRD rows per step = "
            "rows / steps), so an old user's share does not shrink with block k's size; off: as many rows per step "
            "as the minibatch has distinct users (beyond the paper)"
        ),
    )
    distill_select: Literal["valid", "retention"] = Field(
        "valid",
        description=(
            "model selection of D_k (k >= 1): valid = block k's validation split alone (the paper); retention = "
            "its harmonic mean with D_k's agreement with E_k's top lists on old users (beyond the paper)"
        ),
    )
    continual: bool = Field(
        True,
        description=(
            "update the served student at every student cycle (stage 2); off: serve the last distilled student, "
            "grown untrained to each block's universe (the kd-only / kd-once baselines)"
        ),
    )


DECIMAL = re.compile(r"[0-9]+")  # a block number: ASCII digits only ('²'.isdigit() is True, and int('²') fails)


def block_numbers(blocks: dict) -> dict:
    """``blocks`` (per-block overrides) keyed by block number: ``1``, ``"1"``, ``" 01"`` are block 1; a key that
    is no number is kept for the validation to name. ValueError for a key ``true`` or ``1.0`` (which a dict
    takes for the key 1) and for two keys of one block."""
    out: dict = {}
    named: dict[object, object] = {}
    for key, value in blocks.items():
        if isinstance(key, bool | float):
            raise ValueError(f"the blocks key {str(key).lower()} is not a block number (write 1, 2, ...)")
        text = str(key).strip()
        block = int(text) if DECIMAL.fullmatch(text) else key
        if block in out:
            raise ValueError(f"block {block} is given twice (keys {named[block]!r} and {key!r})")
        out[block], named[block] = value, key
    return out


class BlockOverride(Strict):
    """Per-block overrides (the authors tuned these per block; method.md 5.1, 5.3).

    A replay override names only the fields that change in block k; the others are taken from
    ``student.replay`` / ``teacher.replay`` when the configuration is validated.
    """

    student_replay: ReplayConfig | None = None
    teacher_replay: ReplayConfig | None = None
    w_stability: float | None = Field(None, ge=0, le=1)
    w_plasticity: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data):
        """A field a block cannot override (``student``, ``seed``, ...) is named with the ones it can."""
        if isinstance(data, dict):
            unknown = [str(k) for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError(
                    f"a per-block override takes {', '.join(cls.model_fields)}; not {', '.join(map(repr, unknown))} "
                    "(the other fields apply to every block)"
                )
        return data


class RunConfig(Strict):
    """A whole CCD run over a stream."""

    dataset: str = Field("yelp", description="bundled dataset (yelp, gowalla) or a stream directory")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="base seed; every stage derives its own seed from it")
    device: DevicePref = Field("auto", description="auto, cpu or cuda")
    max_blocks: int | None = Field(None, ge=0, description="stop after this incremental block (default: all)")
    workers: int = Field(
        1,
        ge=1,
        description=(
            "processes that train a block's teacher members side by side (each with threads/workers CPU "
            "threads); 2 on a 2-core CPU nearly doubles the throughput of the MF members, whose training "
            "does not gain from a second thread"
        ),
    )
    executor: Literal["local", "ray"] = Field(
        "local",
        description=(
            "where a block's teacher members train: local (this process, or `workers` local processes) or ray "
            "(Ray tasks on the cluster at ray_address, the run directory on storage every node reaches; "
            "pip install 'ccdrec[ray]')"
        ),
    )
    ray_address: str | None = Field(
        None, description="the Ray cluster of executor ray: HOST:PORT of its head or auto (default: RAY_ADDRESS, else local)"
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    blocks: dict[int, BlockOverride] = Field(default_factory=dict, description="per-block overrides")
    ks: list[int] = Field(
        default_factory=lambda: [20, 50],
        min_length=1,
        description="cut-offs K of Recall@K / NDCG@K, each >= 1; the smallest is the one reports lead with",
    )
    competitors: CompetitorConfig = Field(
        default_factory=lambda: CompetitorConfig(), description="the continual-learning competitors (ccdrec compare)"
    )

    @field_validator("blocks", mode="before")
    @classmethod
    def _one_key_per_block(cls, blocks):
        """Two keys of one block (``1`` and ``"01"``, ``"1"`` and ``" 1"``) are an error: pydantic would keep
        the last one's override and silently drop the other's (:func:`block_numbers`)."""
        return block_numbers(blocks) if isinstance(blocks, dict) else blocks

    @field_validator("blocks")
    @classmethod
    def _incremental_blocks(cls, blocks: dict) -> dict:
        bad = sorted(k for k in blocks if k < 1)
        if bad:
            raise ValueError(f"per-block overrides are for incremental blocks k >= 1, got {bad}")
        return blocks

    @field_validator("ks")
    @classmethod
    def _cutoffs(cls, ks: list[int]) -> list[int]:
        if any(k < 1 for k in ks):
            raise ValueError(f"every cut-off must be at least 1, got {ks}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"cut-offs must differ, got {ks}")
        return sorted(ks)

    @model_validator(mode="after")
    def _selection_among_cutoffs(self) -> RunConfig:
        """Every ``select_metric`` of a schedule the run uses names a configured cut-off (checked before any work)."""
        kinds = {m.kind for m in self.teacher.members}
        schedules = {"student.distill": self.student.distill, "student.update": self.student.update}
        if kinds - {"vae"}:
            schedules |= {"teacher.base": self.teacher.base, "teacher.update": self.teacher.update}
        if "vae" in kinds:
            schedules |= {"teacher.base_vae": self.teacher.base_vae, "teacher.update_vae": self.teacher.update_vae}
        bad = {w: sch.select_metric for w, sch in schedules.items() if int(sch.select_metric.split("@")[1]) not in self.ks}
        if bad:
            raise ValueError(
                f"{', '.join(f'{w}.select_metric' for w in bad)} ({', '.join(sorted(set(bad.values())))}) not among the "
                f"cut-offs ks={self.ks}: add the cut-off to ks or select on recall@{self.ks[0]}"
            )
        return self

    @property
    def metrics(self) -> tuple[str, str]:
        """The metrics reports lead with: Recall@K and NDCG@K at the smallest cut-off."""
        return f"recall@{self.ks[0]}", f"ndcg@{self.ks[0]}"

    @model_validator(mode="after")
    def _complete_block_overrides(self) -> RunConfig:
        """Fill the fields a per-block replay override leaves out from the block-independent config."""
        for o in self.blocks.values():
            for side, base in (("student_replay", self.student.replay), ("teacher_replay", self.teacher.replay)):
                given = getattr(o, side)
                if given is not None and given.model_fields_set != set(ReplayConfig.model_fields):
                    setattr(o, side, base.model_copy(update={f: getattr(given, f) for f in given.model_fields_set}))
        return self

    def student_replay(self, k: int) -> ReplayConfig:
        o = self.blocks.get(k)
        return o.student_replay if o and o.student_replay else self.student.replay

    def teacher_replay(self, k: int) -> ReplayConfig:
        o = self.blocks.get(k)
        return o.teacher_replay if o and o.teacher_replay else self.teacher.replay

    def proxy_weights(self, k: int) -> tuple[float, float]:
        o = self.blocks.get(k)
        ws = o.w_stability if o and o.w_stability is not None else self.student.w_stability
        wp = o.w_plasticity if o and o.w_plasticity is not None else self.student.w_plasticity
        return ws, wp


class CompetitorConfig(Strict):
    """The continual-learning competitors of CCD (method.md 8; :mod:`ccdrec.pipeline.competitors`).

    Their models are the student-size model (``student.model``) and the teacher members
    (``teacher.members``), each updated block by block by the CL method alone with the stage schedules
    ``student.update`` / ``teacher.update`` / ``teacher.update_vae`` (full retraining: ``teacher.base`` /
    ``teacher.base_vae``). LWC-KD uses ``teacher.tau``, ``teacher.knn``, ``teacher.lwc_candidates`` and
    ``teacher.lwc_entities``. Mult-VAE members get CCD's KL towards their previous outputs (``vae_kl``), so
    CCD's teacher gain is the student side's knowledge; ``start`` picks the student-size model's block 0.
    """

    lwc_weight: float | None = Field(None, ge=0, description="λ of LWC-KD in the competitors (None: teacher.lwc_weight)")
    piw_hidden: int = Field(16, ge=1, description="LWC-KD + PIW: hidden width of the imitation-weight network")
    piw_lr: float = Field(1e-3, gt=0, description="LWC-KD + PIW: Adam learning rate of the imitation-weight network")
    vae_kl: bool = Field(
        True,
        description="Mult-VAE members: CCD's teacher.vae_kl_weight·KL(previous output ‖ current) in every CL update "
        "(False: plainly fine-tuned)",
    )
    start: Literal["distilled", "plain"] = Field(
        "distilled",
        description="the student-size model's block 0: CCD's distilled D_0, or (plain) BPR alone on Tr_0 with teacher.base",
    )


RunConfig.model_rebuild()
