import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path | None:
    """The real-data folder: $HGM_DATA, else ../shared/data beside the repository."""
    candidate = Path(os.environ["HGM_DATA"]) if os.environ.get("HGM_DATA") else REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("real data absent: set HGM_DATA or place the data folder at ../shared/data")
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on one torch thread: several spin against each other on a busy 2-core runner, and
    one is many times faster. A module uses it with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
