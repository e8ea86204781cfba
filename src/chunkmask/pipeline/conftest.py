"""Pytest: collect the pipeline's doctests only where Ray and gymnasium are installed.

`pytest` collects `src/` with `--doctest-modules`, which imports every module here. Without the
`ray` extra (or the `testbed` extra that the adapters' doctests use) nothing here is collected;
`tests/test_pipeline.py` skips itself with `pytest.importorskip`.
"""

from importlib.util import find_spec

_ready = find_spec("ray") is not None and find_spec("gymnasium") is not None
collect_ignore_glob = [] if _ready else ["*.py"]
