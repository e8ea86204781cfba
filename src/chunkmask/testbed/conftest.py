"""Pytest: collect the testbed's doctests only where its optional dependency is installed.

`pytest` collects `src/` with `--doctest-modules`, which imports every module here, and every
testbed module imports gymnasium (the `testbed` extra). Without it the modules are not collected,
so a `pip install -e .[dev]` checkout still runs the suite cleanly; the testbed's own tests skip
themselves with `pytest.importorskip`.
"""

from importlib.util import find_spec

collect_ignore_glob = [] if find_spec("gymnasium") is not None else ["*.py"]
