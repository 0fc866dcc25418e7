"""The quickstart notebook runs top to bottom, so it can never rot."""

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_quickstart_notebook_executes():
    import nbformat
    from nbclient import NotebookClient

    path = REPO_ROOT / "examples" / "quickstart.ipynb"
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "round trip exact" in outputs
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
