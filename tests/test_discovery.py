"""Plugins are discovered: a package walk over models/, tasks/, methods/ (private `_` modules skipped) and the
entry-point groups prune_bench.{models,tasks,methods}, through which an outside package registers its own."""
import importlib.metadata
import pkgutil
import sys
from pathlib import Path

import methods
from bench import registry
from bench.cli import main
from bench.registry import METHODS


def test_package_walk_finds_every_public_module_and_skips_private_ones():
    mods = registry.plugin_modules()
    on_disk = {f"methods.{m.name}" for m in pkgutil.iter_modules(methods.__path__)}
    assert {m for m in on_disk if not m.split(".")[1].startswith("_")} <= set(mods)
    assert not [m for m in mods if m.rsplit(".", 1)[1].startswith("_")]
    assert {"methods._allocate", "methods._importance", "methods._schedule"} <= on_disk
    # every method file registers by being found: no hand-kept list to forget it in
    assert {"somp", "upop", "gohsp", "vtrans", "wanda_sp"} <= set(METHODS.names())
    assert not hasattr(registry, "PLUGIN_MODULES")


def test_an_entry_point_registers_an_outside_method(tmp_path, monkeypatch):
    pkg = tmp_path / "outside_pkg_pb"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "my_method.py").write_text(
        "from bench.api import Method\n"
        "from bench.registry import register_method\n\n"
        "@register_method('outside_method')\n"
        "class Outside(Method):\n"
        "    name = 'outside_method'\n"
        "    description = 'registered through an entry point'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def fake_entry_points(group=None, **kw):
        seen.append(group)
        if group == "prune_bench.methods":
            return [importlib.metadata.EntryPoint(name="outside", value="outside_pkg_pb.my_method", group=group)]
        return []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))      # restored after the test
    assert "outside_method" in METHODS
    assert METHODS.get("outside_method").description == "registered through an entry point"
    assert seen == list(registry.ENTRY_POINT_GROUPS)
    sys.modules.pop("outside_pkg_pb.my_method", None)


def test_ls_methods_filters_with_a_glob(capsys):
    assert main(["ls", "methods", "upop*"]) in (0, None)
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert names == ["upop", "upop_unified", "upop_uniform"]


def test_no_plugin_module_is_left_out_of_the_walk():
    here = Path(registry.__file__).resolve().parent.parent
    files = {f"{d}.{p.stem}" for d in registry.PLUGIN_PACKAGES for p in (here / d).glob("*.py")
             if not p.stem.startswith("_")}
    assert files <= set(registry.plugin_modules())


def test_methods_import_no_other_method_module_in_a_cycle():
    """The toolkit (methods/_importance, _allocate, _schedule) imports no method; gohsp and magnitude do not
    import each other (they share the toolkit instead)."""
    import ast
    here = Path(methods.__file__).resolve().parent

    def imports(name):
        tree = ast.parse((here / f"{name}.py").read_text())
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        return {m for m in out if m.startswith("methods.")}

    assert "methods.gohsp" not in imports("magnitude") and "methods.magnitude" not in imports("gohsp")
    for tool in ("_importance", "_allocate", "_schedule"):
        assert imports(tool) <= {"methods._allocate", "methods._importance", "methods._schedule"}, tool
