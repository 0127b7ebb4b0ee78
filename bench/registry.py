"""Small generic registries filled by decorators (tasks, methods, model families) or by YAML discovery (tables)."""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from bench.errors import UnknownName

T = TypeVar("T")

# Modules whose import fills the registries (one file per task, method and model family).
PLUGIN_MODULES = [
    "models.vit",
    "tasks.imagenet",
    "methods.dense",
    "methods.somp",
    "methods.sgmp",
    "methods.upop",
    "methods.gohsp",
    "tasks.cifar10",
    "models.segmenter",
    "tasks.ade20k",
    # vision-language (BLIP, CLIP)
    "models.blip",
    "models.clip",
    "tasks.nlvr2",
    "tasks.vqa",
    "tasks.caption",
    "tasks.retrieval",
    # language (VTrans, GLUE, perplexity)
    "models.bert",
    "models.gpt2",
    "models.llama",
    "methods.vtrans",
    "tasks.glue",
    "tasks.lm_perplexity",
]


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
    for mod in PLUGIN_MODULES:
        importlib.import_module(mod)


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
