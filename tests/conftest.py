import pytest
import torch

from ccdrec.data.synthetic import synthetic_stream


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def stream():
    return synthetic_stream(seed=0)
