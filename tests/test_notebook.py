"""The quick-start notebook runs headless from top to bottom, and no legend in its figures
covers another panel or leaves the figure."""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests import FAST_COMPILE_XLA_FLAG
from tests.helpers import ROOT

# Whole programs (subprocesses, training runs, many compiles): the slow tier.
pytestmark = pytest.mark.slow

# Run first in the kernel (not stored in the notebook): before the inline backend shows and
# closes figures (at plt.show() and at the end of a cell), every legend's box is measured
# against the figure and against each other panel (with its tick labels and title); what was
# measured and any overlap are printed.
FIGURE_CHECK = """
import json as _json


def _legend_overlaps():
    import matplotlib.pyplot as _plt

    found = []
    for number in _plt.get_fignums():
        figure = _plt.figure(number)
        renderer = figure.canvas.get_renderer()
        figure.canvas.draw()
        legends = [(ax, ax.get_legend()) for ax in figure.axes if ax.get_legend()]
        legends += [(None, legend) for legend in figure.legends]
        for owner, legend in legends:
            box = legend.get_window_extent(renderer)
            if not figure.bbox.contains(box.x0, box.y0) or not figure.bbox.contains(box.x1, box.y1):
                found.append(f"figure {number}: a legend leaves the figure")
            for ax in figure.axes:
                twin = owner is not None and ax.get_position().bounds == owner.get_position().bounds
                if ax is not owner and not twin and box.overlaps(ax.get_tightbbox(renderer, bbox_extra_artists=[])):
                    found.append(f"figure {number}: a legend covers the panel {ax.get_title()!r}")
    if _plt.get_fignums():
        print("LEGEND CHECK", _json.dumps({"figures": len(_plt.get_fignums()), "overlaps": found}))


# Registered before pyplot loads the inline backend, whose own hook then runs after this one.
get_ipython().events.register("post_execute", _legend_overlaps)
import matplotlib.pyplot as _pyplot

_show = _pyplot.show


def _measured_show(*args, **kwargs):
    _legend_overlaps()
    return _show(*args, **kwargs)


_pyplot.show = _measured_show
"""


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    # The kernel trains for a while: there, LLVM's optimisations pay for themselves (~25%).
    monkeypatch.setenv(
        "XLA_FLAGS", os.environ["XLA_FLAGS"].replace(FAST_COMPILE_XLA_FLAG, "").strip()
    )
    path = os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb")
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "store the notebook without outputs"
    )
    notebook.cells.insert(0, nbformat.v4.new_code_cell(FIGURE_CHECK))
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "bits/byte" in outputs and "max pooling" in outputs
    assert "The with statement is used to" in outputs
    images = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 2
    checks = [
        json.loads(line.split("LEGEND CHECK ", 1)[1])
        for line in outputs.splitlines()
        if "LEGEND CHECK" in line
    ]
    assert (
        sum(check["figures"] for check in checks) >= 2
    )  # the figures were measured before they were shown
    assert [problem for check in checks for problem in check["overlaps"]] == []
