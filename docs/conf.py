"""Sphinx configuration of annbatch's documentation.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (from the repository root). Tutorials
are MyST notebooks (``.md`` files with ``{code-cell}`` blocks) executed by myst-nb on every
build, each on small data it generates, so that a page that stops working fails the build.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "_scripts"))
# The kernels that execute the tutorials inherit the environment: make a source checkout
# importable there too when the package is not installed (an installed one works as well).
_src = str(HERE.parent / "src")
sys.path.insert(0, _src)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_src, os.environ.get("PYTHONPATH")]))

import annbatch  # noqa: E402

project = "annbatch"
author = "the annbatch developers"
copyright = "the annbatch developers"
version = release = annbatch.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
exclude_patterns = ["_build", "_scripts", "_data", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
templates_path = ["_templates"]

# --- API reference: autosummary pages from the numpydoc docstrings ---
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "groupwise"
autodoc_typehints = "description"  # types live in the signatures; show them with the parameters
autodoc_typehints_description_target = "documented"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    # The Loader's resume methods and the reference's spellings come from mixins: list them,
    # but not what torch's Dataset, dict or the built-in exceptions provide.
    "inherited-members": "IterableDataset,Dataset,Generic,BaseException,OSError,dict,object",
}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True

# No intersphinx: CI may be offline, and -W must not depend on the network.

# --- MyST and notebook execution ---
myst_enable_extensions = ["colon_fence", "deflist"]
nb_execution_mode = "force"  # every build runs every tutorial (nothing cached)
nb_execution_timeout = 120
nb_execution_in_temp = False  # cells run in their page's folder (object-storage.md finds the example)
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True
nb_merge_streams = True
# The scvi-tools tutorial trains scVI: scvi-tools needs Python 3.12, so a build without it
# (the README's command) shows that page's code unexecuted. CI sets ANNBATCH_DOCS_SCVI=1 and
# builds under 3.12 with scvi-tools, where a missing scvi-tools is an error instead.
if importlib.util.find_spec("scvi") is None:
    if os.environ.get("ANNBATCH_DOCS_SCVI") == "1":
        msg = "ANNBATCH_DOCS_SCVI=1, but scvi-tools is not installed in this Python"
        raise RuntimeError(msg)
    nb_execution_excludepatterns = ["tutorials/scvi-tools.md"]

# --- HTML ---
html_theme = "furo"
html_title = f"annbatch {version}"
html_static_path: list[str] = []
