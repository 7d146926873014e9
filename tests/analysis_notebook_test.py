"""Executes notebooks/critical_batch.ipynb headless (demo mode: a synthetic fixture sweep)."""

import pathlib

import nbclient
import nbformat

NOTEBOOK = pathlib.Path(__file__).parents[1] / "notebooks" / "critical_batch.ipynb"


def test_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the demo sweep goes under tmp_path
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o["output_type"] == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3  # the two figures and the comparison
  text = " ".join(o.get("text", "") for o in outputs)
  assert "runs from" in text and "(sweep.json)" in text
  assert list(tmp_path.glob("bscan_demo_sweep_*"))


def test_notebook_has_no_analysis_logic():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  assert "def " not in code and "import numpy" not in code and "import pandas" not in code
  assert 'IN_COLAB = "google.colab" in sys.modules' in code
  assert '# @param {type:"string"}' in code
