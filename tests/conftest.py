import contextlib
import io
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

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


@pytest.fixture(scope="session")
def ikea(shared_data: Path) -> Path:
    """The IKEA rooms-and-products folder of the real data."""
    folder = shared_data / "ikea"
    if not (folder / "products.jsonl").is_file() or not (folder / "rooms.jsonl").is_file():
        pytest.skip(f"IKEA data absent: {folder} needs products.jsonl and rooms.jsonl (see the data README)")
    return folder


IKEA_HEAD_PRODUCTS = 40


@pytest.fixture(scope="session")
def ikea_head_catalogue(ikea: Path) -> dict:
    """The first products of the IKEA catalogue, by id."""
    from hgm_mm.data import read_products

    return {p.product_id: p for p in read_products(ikea / "products.jsonl")[:IKEA_HEAD_PRODUCTS]}


@pytest.fixture(scope="session")
def ikea_head_index(tmp_path_factory, ikea_head_catalogue: dict) -> Path:
    """A matcher folder over the first IKEA products, built with the tiny random model (one torch thread)."""
    import warnings

    import torch

    import hgm_mm
    from hgm_mm.ranking.catalog import build_catalog_index

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("ikea_head") / "index"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hgm_mm.RandomInitWarning)
        model = hgm_mm.create_model("hgm-tiny")
    build_catalog_index(model, list(ikea_head_catalogue.values()), folder, progress=False, num_workers=0)
    return folder


def tiny_model(seed: int | None = None, **overrides):
    """The tiny random `hgm-tiny` model (its random-weights warning silenced); `seed` fixes the weights,
    `overrides` go to `create_model` (scene_labels=...)."""
    import warnings

    import torch

    import hgm_mm

    if seed is not None:
        torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hgm_mm.RandomInitWarning)
        return hgm_mm.create_model("hgm-tiny", **overrides)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on one torch thread: several spin against each other on a busy 2-core runner, and
    one is many times faster. A module uses it with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def photo_bytes(size=(320, 240), format="JPEG", mode="RGB") -> bytes:
    """An encoded plain-grey image, as an upload would carry it."""
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format=format)
    return buffer.getvalue()


SERVER_START_TIMEOUT_S = 180  # importing torch and loading the model on a busy 2-core runner


@contextlib.contextmanager
def running_server(arguments: list[str], log_path: Path, what: str):
    """`python ARGUMENTS` (a server that prints "Serving on URL" once it listens) in its own
    process with this checkout importable; yields the URL, then stops the process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "wb") as stderr:
        process = subprocess.Popen([sys.executable, *arguments], stdout=subprocess.PIPE, stderr=stderr, env=env,
                                   text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    url = None
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while url is None and time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line.startswith("Serving on "):
            url = line.split()[2]
    try:
        if url is None:
            pytest.fail(f"{what} did not start (exit code {process.poll()}):\n{log_path.read_text()[-3000:]}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
