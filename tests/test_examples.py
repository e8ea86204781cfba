import importlib.util
import math
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pcm_synthetic_example_runs_end_to_end(capsys):
    module = load("pcm_synthetic")
    result = module.main(["--steps", "3", "--prompts", "2", "--group-size", "4", "--chunks", "16", "--budget", "3"])
    out = capsys.readouterr().out
    assert "budget B=3" in out and "first trajectory's selected chunks" in out
    assert result["kept"] <= 3 * 8 and result["kept"] < result["total"]
    assert sum(result["selected_per_phase"]) == result["kept"]
    assert math.isfinite(result["loss"]) and result["grad_norm"] > 0
    assert all(0.1 - 1e-6 <= p <= 1 + 1e-6 for p in result["keep_probabilities"])
