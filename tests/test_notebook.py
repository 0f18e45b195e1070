"""notebooks/reuse_steps.ipynb executes top to bottom (nbclient)."""
import pathlib

import nbclient
import nbformat

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "reuse_steps.ipynb"


def test_reuse_steps_notebook_executes():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  # The RM really learned the separable preference, and PPO ran three iterations.
  last = [line for line in outputs.splitlines() if line.startswith("last loss")][0]
  assert float(last.split("accuracy")[1]) >= 0.95
  assert sum(line[:2] in ("0 ", "1 ", "2 ") for line in outputs.splitlines()) == 3
