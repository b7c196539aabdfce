"""Mistakes in calls of the Python API are one-line ``TypeError`` / ``ValueError`` naming the argument and what
was expected, never a NumPy, SciPy or torch message from deep inside, and never a silent wrong answer."""

import json
import shutil

import numpy as np
import pytest
import torch

from ccdrec.config import TrainConfig, default_schedule
from ccdrec.data import load_stream
from ccdrec.data.synthetic import synthetic_stream
from ccdrec.errors import CcdrecError
from ccdrec.eval import evaluate_block, rank_metrics
from ccdrec.eval.metrics import block_target, evaluate_many
from ccdrec.models import MF, LightGCN, MultVAE, build_model
from ccdrec.serve import load_run, top_k
from ccdrec.train import fit
from ccdrec.train.loop import make_optimizer, stream_validation

OVERRIDES = ["student.topn=10", "teacher.members=[{kind: mf, dim: 8, seed: 0}, {kind: lightgcn, dim: 8, seed: 1}]"]


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text, text
    return text


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, finished_run):
    """A finished two-block CCD run (a few seconds)."""
    return finished_run(tmp_path_factory.mktemp("api"), synthetic_stream(n_blocks=2, seed=4), OVERRIDES)


@pytest.fixture(scope="module")
def served(run_dir):
    return load_run(run_dir)


@pytest.fixture(scope="module")
def block0_run(run_dir, tmp_path_factory):
    """A copy of the run that serves block 0's student: the users of block 1 are of a block it has not reached."""
    dst = tmp_path_factory.mktemp("api0") / "run"
    shutil.copytree(run_dir, dst)
    state = json.loads((dst / "state.json").read_text())
    state["block"] = 0
    state["pointers"].update(served="b0_student", student="b0_student")
    (dst / "state.json").write_text(json.dumps(state))
    return dst


# --- 1. a sequence of IDs -----------------------------------------------------------------------
@pytest.mark.parametrize("items", ["242", b"242", bytearray(b"242"), None, 242, np.array([["1"]]), {"242": 1}])
def test_recommend_for_items_wants_a_list_of_ids_not_one_string(served, items):
    with pytest.raises(TypeError, match="^items must be a list of item IDs") as e:
        served.recommend_for_items(items, k=3)
    if isinstance(items, str):
        assert "not one string" in one_line(e)


@pytest.mark.parametrize("element", [None, 2.5, b"1", ["1"]])
def test_recommend_for_items_wants_ids_as_elements(served, element):
    with pytest.raises(TypeError, match="^items must hold item IDs"):
        served.recommend_for_items([str(served.item_ids[0]), element], k=3)


def test_recommend_for_items_takes_any_list_of_ids(served):
    given = [str(x) for x in served.item_ids[[3, 10]]]
    want = [r.item for r in served.recommend_for_items(given, k=5).items]
    assert len(want) == 5
    for same in (tuple(given), np.array(given), iter(given), [np.str_(g) for g in given]):
        assert [r.item for r in served.recommend_for_items(same, k=5).items] == want


def test_cold_start_scores_want_item_indices(served):
    with pytest.raises(TypeError, match="^item_idx must be an array of item indices"):
        served.cold_start_scores("242")
    with pytest.raises(TypeError, match="^item_idx must be a 1-D array of integer"):
        served.cold_start_scores([1.5])
    with pytest.raises(ValueError, match=f"^item_idx: item indices must be in 0..{served.model.n_items - 1}, not"):
        served.cold_start_scores([served.model.n_items])


@pytest.mark.parametrize("user", [None, ["3"], 2.0, b"3"])
def test_recommend_wants_one_user_id(served, user):
    with pytest.raises(TypeError, match="^user must be one user ID"):
        served.recommend(user, k=2)


def test_load_run_wants_a_path_and_a_device_there_is(run_dir):
    with pytest.raises(TypeError, match="^run_dir must be the path of a run directory"):
        load_run(None)
    with pytest.raises(CcdrecError, match="^run_dir is an empty path"):  # never read as '.', as the CLI refuses it
        load_run(" ")
    with pytest.raises(CcdrecError, match="^unknown device 'gpu'; expected auto, cpu, cuda or cuda:N$"):
        load_run(run_dir, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(CcdrecError, match="no CUDA device is available"):
            load_run(run_dir, device="cuda")


def test_a_stream_is_indexed_by_block_numbers_that_it_has(stream):
    last = len(stream) - 1
    assert stream[-1] is stream[last] and stream[np.int64(0)] is stream[0] and stream[0:2] == stream.blocks[:2]
    for k in (last + 1, -(last + 2)):
        with pytest.raises(IndexError, match=rf"^block {k} is out of range: synthetic has blocks 0\.\.{last}$") as e:
            stream[k]
        assert isinstance(e.value, CcdrecError)
    for k in ("0", True, 1.0, None):  # stream[True] was block 1
        with pytest.raises(TypeError, match=r"^a block is indexed by a whole number \(stream\[0\]\)") as e:
            stream[k]
        assert isinstance(e.value, CcdrecError)
    with pytest.raises(TypeError, match="^source must be a bundled stream's name"):
        load_stream(None)


def test_evaluation_names_what_is_wrong_with_its_model_split_and_users(stream):
    b0 = stream[0]
    fresh = LightGCN(b0.n_users, b0.n_items, dim=8)  # never trained: no graph set
    with pytest.raises(CcdrecError, match=r"no graph to propagate over: call model.set_graph\(block.train_matrix\)") as e:
        evaluate_block(fresh, b0, "test")
    assert isinstance(e.value, RuntimeError)
    fresh.set_graph(b0.train_matrix)
    assert evaluate_block(fresh, b0, "test")["users"] > 0
    vae = MultVAE(b0.n_users, b0.n_items, 8)
    with pytest.raises(CcdrecError, match=r"no input rows: call model.set_graph\(block.train_matrix\)"):
        vae.scorer()(torch.tensor([0]))
    for split in (None, "tst", 0):
        with pytest.raises(ValueError, match=f"^evaluation split must be 'valid' or 'test', not {split!r}$"):
            evaluate_block(fresh, b0, split)
    with pytest.raises(TypeError, match="^model must be a ccdrec model"):
        evaluate_block(None, b0, "test")
    for users in (np.array([b0.n_users]), np.array([99999])):  # were left out silently (0 users, every metric missing)
        with pytest.raises(ValueError, match=rf"^users: user indices must be in 0\.\.{b0.n_users - 1}, not {users[0]}$"):
            evaluate_block(fresh, b0, "test", users=users)
        with pytest.raises(ValueError, match="user indices must be in"):
            evaluate_many(fresh, [(b0, "test", users)])


def test_fit_names_the_figures_it_can_select_on_and_the_schedules_there_are(stream):
    b0 = stream[0]
    for select in ("bogus", "users"):  # 'users' is a count the validation gives, not a quality to select on
        with pytest.raises(ValueError, match=r"^select='.*' is not a figure the validation gives; it gives 'recall@20'.*50'$"):
            fit(MF(b0.n_users, b0.n_items, 8), b0, TrainConfig(epochs=1), select=select)
    with pytest.raises(ValueError, match="^no default schedule for 'bogus': the model families are mf, lightgcn, vae$"):
        default_schedule("bogus")


def test_a_user_index_out_of_range_is_named(served):
    for uid in (-1, served.model.n_users):
        with pytest.raises(ValueError, match=f"^uid must be a user index in 0..{served.model.n_users - 1}"):
            served.top(uid, 3)
    with pytest.raises(TypeError, match="^uid must be a user index"):
        served.scores("3")


# --- 2. k and other counts ----------------------------------------------------------------------
BAD_K = [(2.5, TypeError), ("5", TypeError), (True, TypeError), (None, TypeError), (0, ValueError), (-3, ValueError)]


@pytest.mark.parametrize(("k", "error"), BAD_K)
def test_k_must_be_a_positive_int_everywhere(served, k, error):
    item = str(served.item_ids[0])
    calls = {
        "recommend": lambda: served.recommend("3", k=k),
        "recommend_for_items": lambda: served.recommend_for_items([item], k=k),
        "top": lambda: served.top(0, k),
        "top_k": lambda: top_k(np.zeros(5, dtype=np.float32), np.empty(0, dtype=np.int64), k),
    }
    for name, call in calls.items():
        with pytest.raises(error, match="^k must be") as e:
            call()
        assert "k" in one_line(e), name
        assert isinstance(e.value, CcdrecError), name  # one line in the CLI too


def test_numpy_integers_are_fine_for_k(served):
    assert [r.item for r in served.recommend("3", k=np.int64(4))] == [r.item for r in served.recommend("3", k=4)]
    assert len(served.recommend_for_items([str(served.item_ids[0])], k=np.int32(2)).items) == 2


def test_evaluation_counts_are_checked(stream):
    b = stream[0]
    model = MF(b.n_users, b.n_items, 4)
    model.set_graph(b.train_matrix)
    with pytest.raises(TypeError, match=r"^ks must be a non-empty tuple of ints, e\.g\. \(20, 50\)"):
        evaluate_block(model, b, "test", ks=20)
    with pytest.raises(TypeError, match="^ks must be"):
        evaluate_block(model, b, "test", ks=())
    with pytest.raises(ValueError, match=r"^ks\[1\] must be at least 1, not 0"):
        evaluate_block(model, b, "test", ks=(20, 0))
    with pytest.raises(TypeError, match=r"^ks\[0\] must be an int"):
        evaluate_many(model, [(b, "test", None)], ks=(2.5,))
    with pytest.raises(ValueError, match="^chunk must be at least 1, not 0"):
        evaluate_block(model, b, "test", chunk=0)
    with pytest.raises(TypeError, match="^chunk must be an int"):
        rank_metrics(model.scorer(), b.matrix("test"), None, b.n_items, chunk=1.5)
    with pytest.raises(TypeError, match="^users must be an array of user indices"):
        evaluate_block(model, b, "test", users="12")
    with pytest.raises(ValueError, match=r"^users: user indices must be in 0\.\.199, not -1"):
        evaluate_block(model, b, "test", users=[3, -1])
    with pytest.raises(TypeError, match="^block must be a ccdrec.data.stream.Block"):
        evaluate_block(model, b.matrix("test"), "test")
    assert evaluate_block(model, b, "test", ks=[20], chunk=np.int64(64)) == evaluate_block(model, b, "test", ks=(20,))


# --- 3. the model's universe against the block's ------------------------------------------------
def test_fit_refuses_a_model_of_another_size(stream):
    b = stream[0]
    with pytest.raises(
        ValueError, match=rf"^cannot train on block 0: the model has 5 x 5 .* block 0's universe is {b.n_users:,} x"
    ):
        fit(LightGCN(5, 5, 4), b, TrainConfig(epochs=1))
    model = LightGCN(b.n_users, b.n_items, 4)
    with pytest.raises(ValueError, match=r"block 1's universe is .*; grow the model to the block first.*model\.grow\(") as e:
        fit(model, stream[1], TrainConfig(epochs=1))
    assert "\n" not in one_line(e)
    with pytest.raises(ValueError, match="but block 0's universe is"):  # larger than the block: train a model of its size
        fit(LightGCN(stream[1].n_users, stream[1].n_items, 4), b, TrainConfig(epochs=1))


def test_evaluating_a_model_on_a_block_past_its_universe_says_grow(stream):
    b0, b3 = stream[0], stream[3]
    model = LightGCN(b0.n_users, b0.n_items, 4)
    model.set_graph(b0.train_matrix)
    want = (
        rf"^cannot evaluate on block 3: the model has {b0.n_users:,} x {b0.n_items:,} .* "
        rf"block 3's universe is {b3.n_users:,} x {b3.n_items:,}; grow"
    )
    with pytest.raises(ValueError, match=want):
        evaluate_block(model, b3, "test")
    with pytest.raises(ValueError, match=want):
        evaluate_many(model, [(b0, "test", None), (b3, "valid", None)])
    with pytest.raises(ValueError, match=want):
        block_target(model, b3, "test")
    # grown to block 3, it scores block 3 and still every earlier block
    model.grow(b3.n_users, b3.n_items, b3.train_matrix)
    assert evaluate_block(model, b3, "test")["users"] > 0
    assert evaluate_block(model, b0, "test")["users"] > 0


def test_grow_checks_its_arguments(stream):
    b0, b1 = stream[0], stream[1]
    for model in (LightGCN(b1.n_users, b1.n_items, 4), MultVAE(b1.n_users, b1.n_items, 4)):
        with pytest.raises(ValueError, match="^grow: a model of .* cannot shrink"):
            model.grow(b0.n_users, b0.n_items, b0.train_matrix)
        with pytest.raises(ValueError, match=rf"^train_matrix is {b0.n_users:,} x {b0.n_items:,} but the grown universe is"):
            model.grow(stream[2].n_users, stream[2].n_items, b0.train_matrix)
        with pytest.raises(ValueError, match="^init must be one of entity, one_hop, random"):
            model.grow(stream[2].n_users, stream[2].n_items, stream[2].train_matrix, "bogus")
        with pytest.raises(TypeError, match="^n_users must be an int"):
            model.grow(float(stream[2].n_users), stream[2].n_items, stream[2].train_matrix)
        assert (model.n_users, model.n_items) == (b1.n_users, b1.n_items)  # nothing changed


# --- 4. constructors ----------------------------------------------------------------------------
BAD_ARGS = [
    ({"n_users": 0}, ValueError, "n_users must be at least 1, not 0"),
    ({"n_items": -2}, ValueError, "n_items must be at least 1, not -2"),
    ({"dim": 0}, ValueError, "dim must be at least 1, not 0"),
    ({"dim": 2.5}, TypeError, "dim must be an int of at least 1, not float 2.5"),
    ({"dim": True}, TypeError, "dim must be an int"),
    ({"n_users": "10"}, TypeError, "n_users must be an int"),
]
EXTRA = {
    LightGCN: [
        ({"layers": -1}, ValueError, "layers must be at least 0, not -1"),
        ({"layers": 1.0}, TypeError, "layers must be an int"),
    ],
    MF: [({"layers": 2}, ValueError, "layers must be 0 for MF")],
    MultVAE: [
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), not 1.0"),
        ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"dropout": "0.5"}, TypeError, r"dropout must be a number in \[0, 1\)"),
    ],
}


@pytest.mark.parametrize("cls", [LightGCN, MF, MultVAE])
def test_constructors_refuse_non_positive_sizes_and_out_of_range_settings(cls):
    for change, error, message in BAD_ARGS + EXTRA[cls]:
        args = {"n_users": 10, "n_items": 8, "dim": 4, **change}
        with pytest.raises(error, match="^" + message) as e:
            cls(**args)
        one_line(e)
    model = cls(np.int64(10), 8, dim=4)  # NumPy integers are fine
    assert (model.n_users, model.n_items) == (10, 8) and isinstance(model.config()["n_users"], int)
    assert type(model.clone()) is cls


def test_build_model_refuses_the_same(stream):
    with pytest.raises(ValueError, match="^dim must be at least 1"):
        build_model("vae", 10, 8, dim=-3)
    with pytest.raises(ValueError, match="^n_users must be at least 1"):
        build_model("lightgcn", 0, 8)


# --- 5. configuration objects -------------------------------------------------------------------
def test_fit_wants_a_train_config_and_says_how_to_make_one(stream):
    b = stream[0]
    model = MF(b.n_users, b.n_items, 4)
    for cfg in ({"epochs": 1}, None, "bpr"):
        want = r"^cfg must be a ccdrec.config.TrainConfig, not .*TrainConfig\(\*\*settings\).*default_schedule"
        with pytest.raises(TypeError, match=want) as e:
            fit(model, b, cfg)
        one_line(e)
    with pytest.raises(TypeError, match="^cfg must be a ccdrec.config.TrainConfig"):
        make_optimizer(model, {"lr": 1e-3})
    with pytest.raises(TypeError, match="^cfg must be a ccdrec.config.TrainConfig"):
        stream_validation(model, [b], {}, {"select_metric": "recall@20"})
    with pytest.raises(TypeError, match=r"^past must be a list of Blocks \(e\.g\. stream\.blocks\[:k\]\), not Block"):
        fit(model, stream[0], TrainConfig(epochs=1), past=stream[0])
    with pytest.raises(ValueError, match="^seed must be at least 0, not -1"):
        fit(model, b, TrainConfig(epochs=1), seed=-1)
    with pytest.raises(TypeError, match="^block must be a ccdrec.data.stream.Block"):
        fit(model, stream, TrainConfig(epochs=1))
    # what the message suggests works
    cfg = default_schedule("mf").model_copy(update={"epochs": 1})
    assert fit(model, b, cfg).epochs_run == 1
    assert fit(model, b, TrainConfig(**{"epochs": 1, "batch_size": 512})).epochs_run == 1


# --- the served student's unknown users ---------------------------------------------------------
def test_a_user_of_a_later_block_is_named_as_such(block0_run):
    served = load_run(block0_run)
    stream = served.stream
    assert served.block == 0 and served.model.n_users == stream[0].n_users
    later = str(stream.user_vocab[stream[0].n_users]) if stream.user_vocab is not None else str(stream[0].n_users)
    with pytest.raises(
        CcdrecError, match="first appears in block 1 of the stream, and the served student has reached block 0"
    ) as e:
        served.recommend(later)
    assert str(e.value).startswith(f"unknown user {later!r}: not in the served student's universe")
    assert served.first_block(later) == 1 and served.first_block("nobody") is None and served.first_block("3") is None
    with pytest.raises(CcdrecError) as e:
        served.recommend("nobody")
    assert "first appears" not in str(e.value)
    torch.manual_seed(0)  # the student of block 0 still serves its own users
    assert len(served.recommend("3", k=3)) == 3


# --- a library user's second round (session 19's probe): each kind of mistake is one line, nothing silently wrong


def small_stream():
    return synthetic_stream(n_blocks=2, base_users=60, base_items=40, seed=1)


def test_save_model_refuses_meta_json_cannot_hold_before_writing_and_writes_numpy_numbers(tmp_path):
    from ccdrec.checkpoint import load_model, save_model

    a, b = LightGCN(60, 40, dim=8), LightGCN(60, 40, dim=8)
    save_model(a, tmp_path / "x", meta={"epoch": 1})
    with pytest.raises(CcdrecError, match="cannot be written as JSON") as e:
        save_model(b, tmp_path / "x", meta={"weights": torch.zeros(2)})
    one_line(e)
    model, meta = load_model(tmp_path / "x")  # the old pair is whole: a's weights with a's meta
    assert meta == {"epoch": 1} and torch.equal(model.user_emb, a.user_emb)
    save_model(b, tmp_path / "x", meta={"epoch": np.int64(2), "h": np.float32(0.5)})
    model, meta = load_model(tmp_path / "x")
    assert meta == {"epoch": 2, "h": 0.5} and torch.equal(model.user_emb, b.user_emb)
    with pytest.raises(CcdrecError, match="model must be a ccdrec model"):
        save_model("not a model", tmp_path / "y")
    assert not (tmp_path / "y.pt").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "not a ccdrec model checkpoint"),
        ('{"format": 1, "model": "x"}', "not a ccdrec model checkpoint"),
        ('{"format": 1, "model": {"n_users": 60, "n_items": 40, "dim": 8, "layers": 2}}', "no 'kind'"),
        ('{"format": 1, "model": {"kind": "lightgcn", "n_users": 60, "n_items": 40, "dim": 8, "foo": 1}}', "takes .*not foo"),
    ],
)
def test_load_model_names_a_damaged_json_in_one_line(tmp_path, content, message):
    from ccdrec.checkpoint import load_model, save_model

    save_model(LightGCN(60, 40, dim=8), tmp_path / "x")
    (tmp_path / "x.json").write_text(content)
    with pytest.raises(CcdrecError, match=message) as e:
        load_model(tmp_path / "x")
    one_line(e)


def test_load_model_checks_the_device_and_the_path(tmp_path):
    from ccdrec.checkpoint import load_model, save_model

    save_model(LightGCN(60, 40, dim=8), tmp_path / "x")
    with pytest.raises(CcdrecError, match="unknown device 'gpu'"):
        load_model(tmp_path / "x", device="gpu")
    with pytest.raises(CcdrecError, match="stem must be a path"):
        load_model(None)
    (tmp_path / "d.json").mkdir()
    with pytest.raises(CcdrecError, match="is a directory"):
        load_model(tmp_path / "d")
    model, _ = load_model(tmp_path / "x", device=torch.device("cpu"))
    assert model.device.type == "cpu"
    assert load_model(tmp_path / "x", device="CPU")[0].device.type == "cpu"


def test_fit_takes_avoid_as_pairs_or_a_sparse_matrix_and_never_reads_a_dense_one_as_either():
    from ccdrec.train.objectives import objective_for

    block = small_stream()[0]
    model = LightGCN(block.n_users, block.n_items, dim=8)
    pairs = np.array([[0, 5], [1, 7]])
    keys = set(objective_for(model, block, TrainConfig(), avoid=None).sampler.keys.tolist())
    # the loop converts pairs before the objective sees them: check through fit's own conversion
    from ccdrec.models.checks import check_matrix

    avoid = check_matrix("avoid", pairs, (block.n_users, block.n_items), at_most=True, pairs=True)
    with_pairs = set(objective_for(model, block, TrainConfig(), avoid=avoid).sampler.keys.tolist())
    assert with_pairs - keys <= {0 * block.n_items + 5, 1 * block.n_items + 7}
    assert {0 * block.n_items + 5, 1 * block.n_items + 7} <= with_pairs
    assert fit(model, block, TrainConfig(epochs=1, eval_every=1), avoid=pairs).epochs_run == 1
    with pytest.raises(CcdrecError, match="must be a scipy.sparse .* not a dense 2-D array of shape \\(60, 40\\)") as e:
        fit(model, block, TrainConfig(epochs=1), avoid=np.zeros((block.n_users, block.n_items)))
    one_line(e)
    with pytest.raises(CcdrecError, match="item IDs must be in 0..39, not 40"):
        fit(model, block, TrainConfig(epochs=1), avoid=np.array([[0, 40]]))
    with pytest.raises(CcdrecError, match="not at most 60 x 40"):
        fit(model, block, TrainConfig(epochs=1), avoid=small_stream()[1].train_matrix)


def test_a_mult_vae_refuses_input_rows_of_another_shape_or_type_as_lightgcn_does():
    s = small_stream()
    b0, b1 = s[0], s[1]
    for model in (MultVAE(b0.n_users, b0.n_items, dim=8), LightGCN(b0.n_users, b0.n_items, dim=8)):
        with pytest.raises(CcdrecError, match="is 40 x 60 .*not 60 x 40"):
            model.set_graph(b0.train_matrix.T.tocsr())
        with pytest.raises(CcdrecError, match="must be a scipy.sparse .*not None"):
            model.set_graph(None)
    vae = MultVAE(b0.n_users, b0.n_items, dim=8)
    with pytest.raises(CcdrecError, match="inputs is 100 x 60"):
        fit(vae, b0, TrainConfig(epochs=1, batch_size=32), inputs=b1.train_matrix)
    with pytest.raises(CcdrecError, match="inputs must be a scipy.sparse .*dense 2-D array"):
        fit(vae, b0, TrainConfig(epochs=1, batch_size=32), inputs=b0.train_matrix.toarray())


def test_a_block_checks_its_sizes_and_pairs_when_made():
    from ccdrec.data import Block

    tr = np.array([[u, i] for u in range(20) for i in range(5)])
    va = te = np.array([[u, 6] for u in range(20)])

    def make(**changes):
        return Block(
            **{**dict(index=0, n_users=20, n_items=15, prev_users=0, prev_items=0, train=tr, valid=va, test=te), **changes}
        )

    for changes, message in [
        ({"train": np.vstack([tr, [[25, 1]]])}, "train has user ID 25, outside the universe 0..19"),
        ({"train": np.vstack([tr, [[-1, 1]]])}, "train has user ID -1"),
        ({"valid": np.array([[0, 15]])}, "valid has item ID 15, outside the universe 0..14"),
        ({"train": tr.astype(float)}, "must hold integer IDs, not float64"),
        ({"train": np.hstack([tr, tr[:, :1]])}, "not shape \\(100, 3\\)"),
        ({"prev_users": 30}, "prev_users \\(30\\) is larger than n_users \\(20\\)"),
        ({"n_users": 2.0}, "n_users must be an int"),
        ({"train": "pairs"}, "must be an \\(n, 2\\) array"),
    ]:
        with pytest.raises(CcdrecError, match=message) as e:
            make(**changes)
        one_line(e)
    block = make(train=tr.tolist(), valid=np.zeros((0, 2)))
    assert block.train.dtype == np.int64 and block.train.shape == (100, 2) and block.valid.shape == (0, 2)
    with pytest.raises(CcdrecError, match="n_users 10 is smaller than block 0's universe"):
        block.matrix("train", 10, 10)


def test_stream_spans_take_block_numbers_as_stream_indexing_does():
    s = small_stream()
    with pytest.raises(CcdrecError, match="from block 1 to 0"):
        s.span(1, 0)
    for call in (lambda: s.span(0, 7), lambda: s.union_block(9), lambda: s.train_until(5)):
        with pytest.raises(CcdrecError, match="out of range: synthetic has blocks 0..1"):
            call()
    assert np.array_equal(s.train_until(-1), s.train_until(1))
    assert s.union_block(-1).index == 1


def test_synthetic_stream_checks_its_arguments():
    for kwargs, message in [
        ({"n_blocks": 0}, "n_blocks must be at least 1"),
        ({"base_users": 0}, "base_users must be at least 1"),
        ({"n_blocks": 1.5}, "n_blocks must be an int"),
        ({"clusters": 0}, "clusters must be at least 1"),
        ({"affinity": 2}, "affinity must be in \\[0, 1\\]"),
        ({"base_items": 3}, "at least clusters"),
    ]:
        with pytest.raises(CcdrecError, match=message):
            synthetic_stream(**kwargs)
    assert len(synthetic_stream(n_blocks=1, affinity=1.0, base_users=30)) == 1


def test_prepare_stream_writes_numpy_numbers_and_names_a_dataframe(tmp_path):
    import pandas as pd

    from ccdrec.data.prepare import prepare_stream

    rng = np.random.default_rng(0)
    log = pd.DataFrame({"user": rng.integers(0, 40, 2000), "item": rng.integers(0, 30, 2000), "timestamp": np.arange(2000)})
    log.to_csv(tmp_path / "log.csv", index=False)
    stream = prepare_stream(tmp_path / "log.csv", tmp_path / "out", min_user=np.int64(5), seed=np.int64(1), n_blocks=np.int32(2))
    assert len(stream) == 3
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["min_user"] == 5
    with pytest.raises(CcdrecError, match="the log must be a path .*df.to_parquet") as e:
        prepare_stream(log, tmp_path / "out2")
    one_line(e)


def test_harmonic_keeps_a_missing_value_missing():
    import math

    from ccdrec.eval import harmonic

    assert math.isnan(harmonic(float("nan"), 0.5)) and harmonic(0.0, 0.0) == 0.0
    assert harmonic(0.2, 0.1) == pytest.approx(2 * 0.02 / 0.3)
    with pytest.raises(CcdrecError, match="a is NoneType"):
        harmonic(None, 0.5)


def test_evaluation_names_a_scorer_of_the_wrong_shape_and_takes_a_dense_mask():
    block = small_stream()[0]
    model = LightGCN(block.n_users, block.n_items, dim=8)
    with pytest.raises(CcdrecError, match="scores of shape \\(60, 3\\) for 60 users; expected \\(60, 40\\)") as e:
        evaluate_block(model, block, "test", scorer=lambda u: torch.zeros(len(u), 3))
    one_line(e)
    with pytest.raises(CcdrecError, match="scorer must be a function"):
        evaluate_block(model, block, "test", scorer=5)
    t = block_target(model, block, "test")
    model.set_graph(block.train_matrix)
    scorer = model.scorer()
    dense = rank_metrics(scorer, t.target, t.exclude.toarray(), block.n_items)
    assert dense == rank_metrics(scorer, t.target, t.exclude, block.n_items)
    with pytest.raises(CcdrecError, match="user index 999 is outside the model's universe 0..59"):
        scorer(torch.tensor([999]))
    vae = MultVAE(block.n_users, block.n_items, dim=8)
    vae.set_graph(block.train_matrix)
    with pytest.raises(CcdrecError, match="user index 60 is outside"):
        vae.scorer()(torch.tensor([60]))


def test_build_model_and_run_stream_name_their_arguments(tmp_path):
    from ccdrec.pipeline.ccd import run_stream

    with pytest.raises(CcdrecError, match="kind must be a string"):
        build_model(["mf"], 5, 4)
    with pytest.raises(CcdrecError, match="a vae model takes dim, dropout, not layers"):
        build_model("vae", 5, 4, layers=2)
    with pytest.raises(CcdrecError, match="cfg must be a ccdrec.config.RunConfig, not dict"):
        run_stream({"dataset": "yelp"}, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_fit_checks_a_config_that_skipped_validation():
    block = small_stream()[0]
    cfg = TrainConfig(epochs=1).model_copy(update={"epochs": 0})
    with pytest.raises(CcdrecError, match="cfg.epochs: Input should be greater than or equal to 1") as e:
        fit(LightGCN(block.n_users, block.n_items, dim=8), block, cfg)
    one_line(e)
    with pytest.raises(CcdrecError, match="callbacks must be a list"):
        fit(LightGCN(block.n_users, block.n_items, dim=8), block, TrainConfig(epochs=1), callbacks=None)


def test_a_stream_checks_its_blocks_follow_one_another():
    from ccdrec.data import Block
    from ccdrec.data.stream import Stream

    s = small_stream()
    b0, b1 = s[0], s[1]
    assert len(Stream("mine", (b0, b1))) == 2
    moved = Block(1, b1.n_users, b1.n_items, b1.prev_users - 1, b1.prev_items, b1.train, b1.valid, b1.test)
    for blocks, message in [
        ([], "at least one block"),
        ([b1], "block 0 in the list has index 1"),
        ([b0, b0], "block 1 in the list has index 0"),
        ([b0, moved], "block 1 starts from a universe of 59 x 40 .*block 0's is 60 x 40"),
        ([b0, "b1"], "blocks must be a list of Block objects"),
    ]:
        with pytest.raises(CcdrecError, match=message) as e:
            Stream("mine", blocks)
        one_line(e)
    with pytest.raises(CcdrecError, match="the user vocabulary has 3 IDs for 100 users"):
        Stream("mine", [b0, b1], user_vocab=np.array(["a", "b", "c"]))


# --- the third round (a probe of the second round's checks)


def test_run_stream_checks_a_copied_configuration_before_it_creates_anything(tmp_path):
    from ccdrec.data.stream import save_stream
    from ccdrec.pipeline.ccd import run_stream
    from ccdrec.presets import load_config

    save_stream(small_stream(), tmp_path / "st")
    cfg = load_config(str(tmp_path / "st"), preset="quick", overrides=["max_blocks=1"])
    for update, message in [
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"max_blocks": -3}, "max_blocks: Input should be greater than or equal to 0"),
        ({"ks": [0]}, "ks: every cut-off must be at least 1"),
        ({"sed": 1}, "sed: RunConfig has no such field"),
    ]:
        with pytest.raises(CcdrecError, match=message) as e:
            run_stream(cfg.model_copy(update=update), tmp_path / "r", progress=False)
        one_line(e)
    for kwargs, message in [
        ({"stop_after": "bogus"}, "stop_after must name a stage"),
        ({"workers": "2"}, "workers must be an int"),
        ({"workers": 1.5}, "workers must be an int"),
    ]:
        with pytest.raises(CcdrecError, match=message):
            run_stream(cfg, tmp_path / "r", progress=False, **kwargs)
    with pytest.raises(CcdrecError, match="run_dir must be a path"):
        run_stream(cfg, 5)
    assert not (tmp_path / "r").exists()


def test_fit_trains_with_the_checked_copy_of_a_copied_config_and_checks_family_arguments():
    import scipy.sparse as sp

    block = small_stream()[0]
    cfg = TrainConfig(epochs=1, batch_size=256)
    for update in ({"epochs": 2.0}, {"lr": "0.01"}, {"batch_size": 256.0}, {"eval_every": "1"}):
        assert fit(LightGCN(block.n_users, block.n_items, dim=8), block, cfg.model_copy(update=update)).epochs_run >= 1
    with pytest.raises(CcdrecError, match="cfg.epochz: TrainConfig has no such field"):
        fit(LightGCN(block.n_users, block.n_items, dim=8), block, cfg.model_copy(update={"epochz": 1}))
    with pytest.raises(CcdrecError, match="inputs is for a Mult-VAE"):
        fit(LightGCN(block.n_users, block.n_items, dim=8), block, cfg, inputs=sp.csr_matrix((block.n_users, block.n_items)))
    with pytest.raises(CcdrecError, match="avoid is for BPR models"):
        fit(MultVAE(block.n_users, block.n_items, dim=8), block, cfg, avoid=np.array([[0, 1]]))
    for callbacks in ("ab", [None], [object()]):
        with pytest.raises(CcdrecError, match="callbacks must be"):
            fit(LightGCN(block.n_users, block.n_items, dim=8), block, cfg, callbacks=callbacks)
    with pytest.raises(CcdrecError, match="negative, NaN or infinite values"):
        fit(MultVAE(block.n_users, block.n_items, dim=8), block, cfg, inputs=block.train_matrix * np.nan)
    with pytest.raises(CcdrecError, match="negative, NaN or infinite values"):
        LightGCN(block.n_users, block.n_items, dim=8).set_graph(-block.train_matrix)


def test_a_diverged_model_is_named_before_the_next_training():
    from ccdrec.errors import TrainingDiverged

    block = small_stream()[0]
    model = LightGCN(block.n_users, block.n_items, dim=8)
    with torch.no_grad():
        model.user_emb[0, 0] = float("nan")
    with pytest.raises(CcdrecError, match="not finite .* before training: an earlier training diverged") as e:
        fit(model, block, TrainConfig(epochs=1))
    one_line(e)
    from ccdrec.train import Callback

    class NaNGradient(Callback):
        def batch_loss(self, model, out, users, items, epoch):
            return out[0].sum() * float("nan")  # NaN gradients: the weights become NaN

    fresh = LightGCN(block.n_users, block.n_items, dim=8)
    with pytest.raises(TrainingDiverged):  # in epoch 1, before any validation: no best weights to go back to
        fit(fresh, block, TrainConfig(epochs=3, eval_every=1), callbacks=[NaNGradient()])
    with pytest.raises(CcdrecError, match="an earlier training diverged"):  # not "a smaller learning rate may help"
        fit(fresh, block, TrainConfig(epochs=1))


def test_custom_masks_targets_and_user_tensors_are_read_as_meant():
    import scipy.sparse as sp

    block = small_stream()[0]
    model = LightGCN(block.n_users, block.n_items, dim=8)
    model.set_graph(block.train_matrix)
    scorer = model.scorer()
    t = block_target(model, block, "test")
    with pytest.raises(CcdrecError, match="target has 45 item columns, more than the 40 items ranked"):
        rank_metrics(scorer, sp.hstack([t.target, sp.csr_matrix(np.ones((block.n_users, 5)))]).tocsr(), t.exclude, 40)
    short = rank_metrics(scorer, t.target, t.exclude[:5], 40)  # users past the mask's rows mask nothing
    assert short == rank_metrics(scorer, t.target, sp.vstack([t.exclude[:5], sp.csr_matrix((block.n_users - 5, 40))]), 40)
    zeros = sp.csr_matrix((np.zeros(3), ([0, 1, 2], [0, 1, 2])), shape=(block.n_users, 40))
    assert rank_metrics(scorer, zeros, None, 40)["users"] == 0  # a stored 0 is no held-out item
    with pytest.raises(CcdrecError, match="unknown device 'gpu'"):
        rank_metrics(scorer, t.target, t.exclude, 40, device="gpu")
    rows = torch.tensor([0, 1, 1])
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(scorer(rows.to(dtype)), scorer(rows))  # uint8 is indices, not a mask
    with pytest.raises(CcdrecError, match="1-D integer tensor"):
        scorer(rows.to(torch.bool))


def test_damaged_weights_and_sizes_are_named_before_memory_is_taken(tmp_path):
    from ccdrec.checkpoint import load_model, save_model

    save_model(LightGCN(60, 40, dim=8), tmp_path / "k")
    info = json.loads((tmp_path / "k.json").read_text())
    info["model"]["n_users"] = 10**12
    (tmp_path / "k.json").write_text(json.dumps(info))
    with pytest.raises(CcdrecError, match="user_emb: \\(60, 8\\) stored, \\(1000000000000, 8\\) expected"):
        load_model(tmp_path / "k")
    info["model"]["n_users"], info["format"] = 60, True
    (tmp_path / "k.json").write_text(json.dumps(info))
    with pytest.raises(CcdrecError, match="not a ccdrec model checkpoint"):
        load_model(tmp_path / "k")
    save_model(LightGCN(60, 40, dim=8), tmp_path / "k")
    torch.save(torch.zeros(3), tmp_path / "k.pt")
    with pytest.raises(CcdrecError, match="not a ccdrec model's weights"):
        load_model(tmp_path / "k")
    with pytest.raises(CcdrecError, match="cannot be written as JSON"):
        save_model(LightGCN(60, 40, dim=8), tmp_path / "n", meta={"x": float("nan")})
    with pytest.raises(CcdrecError, match="stem must be a path"):
        save_model(LightGCN(60, 40, dim=8), 5)
    save_model(LightGCN(60, 40, dim=8), tmp_path / "good")
    assert load_model(tmp_path / "good", device="cpu:0")[0].device.type == "cpu"
    assert not (tmp_path / "n.pt").exists()


def test_other_public_functions_name_their_arguments():
    from ccdrec.continual.proxy import Proxy, ema_update
    from ccdrec.continual.replay import replay_weight
    from ccdrec.distill.ensemble import RankEnsemble, top_lists

    block = small_stream()[0]
    model = LightGCN(block.n_users, block.n_items, dim=8)
    model.set_graph(block.train_matrix)
    for kwargs, message in [
        ({"exponent": float("nan")}, "exponent must be"),
        ({"exact_top": -1}, "exact_top must be at least 1"),
        ({"sketch": 0}, "sketch must be at least 1"),
    ]:
        with pytest.raises(CcdrecError, match=message):
            RankEnsemble([model], **kwargs)
    with pytest.raises(CcdrecError, match="members must be models"):
        RankEnsemble([model, "ab"])
    with pytest.raises(CcdrecError, match="chunk must be at least 1"):
        top_lists(model.scorer(), block.n_users, block.n_items, None, chunk=0)
    with pytest.raises(CcdrecError, match="user indices"):
        top_lists(model.scorer(), block.n_users, block.n_items, None, users=[1.7])
    proxy = Proxy.from_model(model)
    with pytest.raises(CcdrecError, match="indices must be non-negative, not -1"):
        proxy.scorer()(torch.tensor([-1]))
    with pytest.raises(CcdrecError, match="proxy weight must be"):
        ema_update(proxy, model, "0.5")
    with pytest.raises(CcdrecError, match="epoch must be at least 0"):
        replay_weight(-1)


# --- the fourth round (comparisons, sweeps, reports, configuration loading)


def test_comparisons_and_sweeps_check_their_arguments_before_creating_anything(tmp_path):
    from ccdrec.data.stream import save_stream
    from ccdrec.pipeline.compare import run_compare
    from ccdrec.pipeline.sweep import run_sweep
    from ccdrec.presets import load_config

    save_stream(small_stream(), tmp_path / "st")
    cfg = load_config(str(tmp_path / "st"), preset="quick")
    for call, message in [
        (lambda: run_compare(cfg.model_copy(update={"seed": -1}), tmp_path / "c", methods=["ccd"]), "seed: Input should be"),
        (lambda: run_compare(cfg, tmp_path / "c", methods=["ccd"], bench_repeats=0), "bench_repeats must be at least 1"),
        (lambda: run_compare(cfg.model_dump(), tmp_path / "c"), "cfg must be a ccdrec.config.RunConfig, not dict"),
        (lambda: run_compare(cfg, tmp_path / "c", methods="ccd"), "methods must be a list of names"),
        (lambda: run_compare(cfg, tmp_path / "c", methods=[]), "methods is empty"),
        (lambda: run_compare(cfg, tmp_path / "c", ablations="no-replay"), "ablations must be a list of names"),
        (lambda: run_sweep(cfg, tmp_path / "s", seeds=[-1], methods=["ccd"]), "seeds\\[0\\] must be at least 0"),
        (lambda: run_sweep(cfg, tmp_path / "s", seeds=[True], methods=["ccd"]), "seeds\\[0\\] must be an int"),
        (lambda: run_sweep(cfg, tmp_path / "s", seeds="0,1", methods=["ccd"]), "seeds must be a non-empty list"),
        (lambda: run_sweep(cfg, tmp_path / "s", seeds=[0, 0], methods=["ccd"]), "seeds repeats a value"),
        (lambda: run_sweep(cfg, tmp_path / "s", cadences=[0], methods=["ccd"]), "cadences\\[0\\] must be at least 1"),
        (lambda: run_sweep(cfg.model_copy(update={"workers": 0}), tmp_path / "s"), "workers: Input should be"),
    ]:
        with pytest.raises(CcdrecError, match=message) as e:
            call()
        one_line(e)
    assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()


def test_a_new_run_stops_at_max_blocks_given_to_run_stream(tmp_path):
    from ccdrec.data.stream import save_stream
    from ccdrec.pipeline.ccd import run_stream
    from ccdrec.presets import load_config

    save_stream(small_stream(), tmp_path / "st")
    rd = run_stream(
        load_config(str(tmp_path / "st"), preset="quick", overrides=OVERRIDES), tmp_path / "r", progress=False, max_blocks=0
    )
    assert rd.read_state()["completed"][-1] == "b0/eval" and rd.load_config().max_blocks == 0


def test_report_tables_name_a_metric_or_model_the_rows_do_not_hold(run_dir):
    from ccdrec.pipeline.rundir import RunDir
    from ccdrec.report import tables
    from ccdrec.report.markdown import write_report

    rows = RunDir(run_dir).read_metrics()
    assert not tables.summary(rows, ("recall@20",)).isna().all().all()
    for call, message in [
        (lambda: tables.summary(rows, ("recal@20",)), "no metric 'recal@20' in these rows; they hold .*recall@20"),
        (lambda: tables.summary(rows, "recall@20"), "metrics must be a tuple"),
        (lambda: tables.rkj_table(rows, "teachr"), "no model 'teachr' in these rows; they evaluate teacher"),
        (lambda: tables.new_users(rows, "bogus"), "no metric 'bogus'"),
        (lambda: tables.summary(str(run_dir / "metrics.jsonl")), "rows must be a list of metric rows"),
        (lambda: write_report(str(run_dir)), "write_report takes a RunDir, not a path"),
    ]:
        with pytest.raises(CcdrecError, match=message) as e:
            call()
        one_line(e)


def test_streams_configurations_and_checkpoints_refuse_what_would_be_read_wrong(tmp_path):
    from ccdrec.checkpoint import load_model, save_model
    from ccdrec.data.append import append_stream
    from ccdrec.data.stream import Stream, save_stream
    from ccdrec.presets import load_config

    s = small_stream()
    with pytest.raises(CcdrecError, match="the user vocabulary holds 'a' twice"):
        Stream("x", s.blocks, user_vocab=np.array(["a", "a", *map(str, range(s.n_users - 2))]))
    with pytest.raises(CcdrecError, match="save_stream takes a Stream, not list"):
        save_stream([s[0]], tmp_path / "st_list")
    assert not (tmp_path / "st_list").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(CcdrecError, match="a file, not a directory"):
        save_stream(s, tmp_path / "f")
    for kwargs, message in [
        ({"dataset": ""}, "the dataset path is empty"),
        ({"preset": "../presets/quick"}, "unknown preset"),
        ({"overrides": "seed=3"}, "overrides must be a list"),
        ({"dataset": 5}, "dataset must be a name or a path"),
    ]:
        with pytest.raises(CcdrecError, match=message):
            load_config(**kwargs)
    with pytest.raises(CcdrecError, match="the stream directory must be a path"):
        append_stream(5, "new.csv")
    for call in (lambda: save_model(LightGCN(60, 40, dim=8), ""), lambda: load_model("")):
        with pytest.raises(CcdrecError, match="stem must name a file"):
            call()


def test_low_level_helpers_name_their_arguments():
    import scipy.sparse as sp

    from ccdrec.continual.lwckd import knn_graph
    from ccdrec.distill import rrd_loss
    from ccdrec.eval import harmonic

    with pytest.raises(CcdrecError, match="k must be an int"):
        knn_graph(sp.eye(4, format="csr"), k=2.5)
    with pytest.raises(CcdrecError, match="k must be an int"):
        knn_graph(sp.eye(4, format="csr"), k=True)
    scores = torch.zeros(2, 3)
    with pytest.raises(CcdrecError, match="mask must be a bool tensor of shape \\(2, 3\\)"):
        rrd_loss(scores, torch.zeros(2, 4), mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(CcdrecError, match="the interesting lists are empty"):
        rrd_loss(torch.zeros(2, 0), torch.zeros(2, 4))
    with pytest.raises(CcdrecError, match="torch tensors"):
        rrd_loss(np.zeros((2, 3)), torch.zeros(2, 4))
    with pytest.raises(CcdrecError, match="at least 0"):
        harmonic(-1, 0.5)


def test_losses_and_prefix_digests_name_a_wrong_argument(stream):
    from ccdrec.train.losses import bpr_loss, vae_loss

    with pytest.raises(CcdrecError, match="bpr_loss: neg must be a floating-point torch tensor, not ndarray"):
        bpr_loss(torch.zeros(3), np.zeros(3))
    with pytest.raises(CcdrecError, match="bpr_loss: pos must be .* not a torch.int64 tensor"):
        bpr_loss(torch.zeros(3, dtype=torch.long), torch.zeros(3))
    with pytest.raises(CcdrecError, match="vae_loss: target must be"):
        vae_loss(torch.zeros(2, 4), [[0, 1, 0, 0]] * 2, torch.zeros(2, 3), torch.zeros(2, 3), 0.2)
    assert bpr_loss(torch.zeros(3), torch.zeros(3, 2)).item() == pytest.approx(np.log(2))  # softplus(0)
    with pytest.raises(CcdrecError, match="n_blocks must be an int"):
        stream.prefix_digest("1")
    with pytest.raises(CcdrecError, match="n_blocks must be at least 1"):
        stream.prefix_digest(0)
    with pytest.raises(CcdrecError, match="no prefix of"):
        stream.prefix_digest(len(stream) + 1)
    assert stream.prefix_digest(np.int64(len(stream))) == stream.digest
