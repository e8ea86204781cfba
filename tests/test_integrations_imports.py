"""`import chunkmask` never imports a trainer integration, and a missing trainer fails loudly."""

import importlib.util
import subprocess
import sys

import pytest


def test_import_chunkmask_loads_no_integration():
    probe = (
        "import sys, chunkmask\n"
        "print(sorted(m for m in sys.modules if m.startswith('chunkmask.integrations')"
        " or m.split('.')[0] in ('verl', 'rlinf')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(importlib.util.find_spec("verl") is not None, reason="verl is installed")
def test_verl_integration_without_verl_names_the_package():
    from chunkmask.integrations import verl

    with pytest.raises(ImportError, match="needs `verl.trainer.ppo.core_algos` from the `verl`"):
        verl.register()
    with pytest.raises(ImportError, match="from the `verl` package"):
        verl.check_registered()


@pytest.mark.skipif(importlib.util.find_spec("rlinf") is not None, reason="rlinf is installed")
def test_rlinf_register_without_rlinf_names_the_package():
    from chunkmask.integrations import rlinf

    with pytest.raises(ImportError, match="needs `rlinf.algorithms.registry` from the `rlinf`"):
        rlinf.register()


def test_verl_entry_point_is_declared():
    from importlib.metadata import entry_points

    points = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert points.get("chunkmask") == "chunkmask.integrations.verl._plugin"
