"""The public namespace: sorted, importable, documented (the mkdocs version of rlax's coverage check)."""

import pathlib
import re

import chunkmask

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def test_all_is_sorted_and_importable():
    names = [n for n in chunkmask.__all__ if n != "__version__"]
    assert names == sorted(names)
    for name in chunkmask.__all__:
        assert hasattr(chunkmask, name), name


def test_every_public_name_is_documented():
    text = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    documented = set(re.findall(r"^::: chunkmask\.(?:[a-z_]+\.)?([A-Za-z_][A-Za-z0-9_]*)\s*$", text, re.M))
    missing = [n for n in chunkmask.__all__ if n != "__version__" and n not in documented]
    assert not missing, f"not documented under docs/: {missing}"


def test_core_import_needs_no_optional_dependency():
    import subprocess
    import sys

    # Block the optional packages (a None entry in sys.modules makes their import fail), then
    # import the whole public namespace.
    code = (
        "import sys\n"
        "for m in ('gymnasium', 'matplotlib', 'tqdm', 'metaworld', 'mujoco', 'ray'):\n"
        "    sys.modules[m] = None\n"
        "import chunkmask\n"
        "for name in chunkmask.__all__:\n"
        "    getattr(chunkmask, name)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_import_in_init_is_exported():
    import ast

    tree = ast.parse(pathlib.Path(chunkmask.__file__).read_text())
    imported = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
    assert imported - set(SUBPACKAGES) == set(chunkmask.__all__) - {"__version__"}


SUBPACKAGES = ("baselines", "batch", "eval", "losses", "offpolicy", "pcm", "selfbc")


def test_top_level_is_curated_and_subpackages_hold_the_rest():
    import importlib

    assert len(chunkmask.__all__) <= 40
    for name in SUBPACKAGES:
        sub = importlib.import_module(f"chunkmask.{name}")
        assert getattr(chunkmask, name) is sub
        assert list(sub.__all__) == sorted(sub.__all__), name
        for public in sub.__all__:
            obj = getattr(sub, public)
            # implementation modules are private: every public object is re-exported here
            module = getattr(obj, "__module__", None)
            if module is not None and module.startswith("chunkmask."):
                assert module.split(".")[-1].startswith("_") or module.count(".") == 1 or (
                    name == "losses"
                ), (name, public, module)
