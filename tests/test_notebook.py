"""The quick-start notebook runs headless from top to bottom."""
import os

import nbformat
from nbclient import NotebookClient

from tests import FAST_COMPILE_XLA_FLAG
from tests.helpers import ROOT


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    # The kernel trains for a while: there, LLVM's optimisations pay for themselves (~25%).
    monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"].replace(FAST_COMPILE_XLA_FLAG, "").strip())
    path = os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb")
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "store the notebook without outputs"
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "bits/byte" in outputs and "max pooling" in outputs
    assert "The with statement is used to" in outputs
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2
