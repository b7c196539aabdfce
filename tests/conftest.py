import pytest
import torch

from ccdrec.data.synthetic import synthetic_stream


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def stream():
    return synthetic_stream(seed=0)


@pytest.fixture(scope="session")
def finished_run():
    """``finished_run(root, stream, overrides)``: a whole CCD run (quick preset plus ``overrides``) of
    ``stream``, saved as ``root/stream``, in ``root/run``; returns the run directory."""
    from ccdrec.data.stream import save_stream
    from ccdrec.pipeline.ccd import run_stream
    from ccdrec.presets import load_config

    def make(root, stream, overrides):
        save_stream(stream, root / "stream")
        run_stream(load_config(root / "stream", preset="quick", overrides=list(overrides)), root / "run", progress=False)
        return root / "run"

    return make
