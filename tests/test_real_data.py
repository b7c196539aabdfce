"""Real-data checks on the bundled Yelp stream (slow: run with ``python -m pytest -m slow``)."""

import pytest

from ccdrec.config import TrainConfig
from ccdrec.data import load_stream
from ccdrec.eval import evaluate_block
from ccdrec.models import LightGCN
from ccdrec.train import fit

pytestmark = pytest.mark.slow


def test_lightgcn_learns_yelp_block0_beyond_popularity():
    block = load_stream("yelp")[0]
    model = LightGCN(block.n_users, block.n_items, 64, 2)
    res = fit(model, block, TrainConfig(epochs=12, batch_size=4096, lr=1e-2, l2=1e-2, negatives=4, eval_every=2), seed=0)
    # the popularity ranking scores about 0.086 validation Recall@20 on this block
    assert res.best_valid["recall@20"] > 0.095
    assert evaluate_block(model, block, "test")["recall@20"] > 0.09
