"""Small generic registries filled by decorators (tasks, methods, model families) or by YAML discovery (tables)."""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from bench.errors import UnknownName

T = TypeVar("T")

# The packages whose modules fill the registries (one file per task, method and model family), found by a package
# walk (modules and subpackages whose name starts with "_" are private helpers and are skipped), and the entry-point
# groups through which an installed package registers its own: in its pyproject.toml
#     [project.entry-points."prune_bench.methods"]
#     my_method = "my_package.my_method"        # a module whose import registers it (a decorated class)
PLUGIN_PACKAGES = ("models", "tasks", "methods")
ENTRY_POINT_GROUPS = ("prune_bench.models", "prune_bench.tasks", "prune_bench.methods")


def plugin_modules() -> list[str]:
    """The modules of PLUGIN_PACKAGES, in a fixed order (models, tasks, methods; alphabetical inside)."""
    import pkgutil
    out = []
    for pkg_name in PLUGIN_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                out.append(f"{pkg_name}.{info.name}")
    return out


def entry_point_plugins() -> list:
    """The installed entry points of ENTRY_POINT_GROUPS (importlib.metadata)."""
    from importlib.metadata import entry_points
    return [ep for group in ENTRY_POINT_GROUPS for ep in entry_points(group=group)]


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj
        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def get(self, name: str) -> T:
        load_plugins()
        if name not in self._items:
            raise UnknownName(self.kind, name, self._items)
        return self._items[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


TASKS: Registry = Registry("task")
METHODS: Registry = Registry("method")
MODEL_FAMILIES: Registry = Registry("model family")
MODELS: Registry = Registry("model")  # architecture name -> (family adapter class, config dict)

_loaded = False


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in plugin_modules():
        importlib.import_module(mod)
    for ep in entry_point_plugins():
        try:
            ep.load()     # a module (its import registers) or an object already registered by its module
        except Exception as e:   # an outside package that cannot load must not hide the suite's own plugins
            from bench.errors import BenchError
            raise BenchError(f"entry point {ep.name!r} ({ep.group} = {ep.value}) failed to load: {e}") from e


def register_task(name: str):
    return TASKS.register(name)


def register_method(name: str):
    return METHODS.register(name)


def register_model_family(name: str):
    """Class decorator for a model adapter; its ARCHS dict names the architectures it builds."""
    def deco(cls):
        MODEL_FAMILIES.add(name, cls)
        cls.family = name
        for arch, cfg in getattr(cls, "ARCHS", {}).items():
            MODELS.add(arch, (cls, dict(cfg)))
        return cls
    return deco
