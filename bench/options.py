"""Typed, strict option blocks for cards, built on pydantic v2.

Every block of a card (the card itself, a profile, a training recipe, a method's options and settings, a
task's data options) is an `OptionsModel`: unknown keys are refused (with the nearest known key), values
are not coerced from strings (`lr: 1e-3` is a string to PyYAML and is refused, not silently parsed), and
every field carries a one-line description that `bench ls methods --options`, `bench validate` and the
README's key list print. `parse_block` turns pydantic's errors into one BenchError line per problem,
each naming the path in the card and the fix.
"""
from __future__ import annotations

import difflib
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bench.errors import BenchError

M = TypeVar("M", bound=BaseModel)


class OptionsModel(BaseModel):
    """Base of every typed card block: strict types, no unknown keys, immutable once parsed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, protected_namespaces=())

    # keys added after cells were recorded: left out of to_dict() (what a cell's config and hash hold) while at
    # their default, so the cells of every card that does not set them keep their hash (and cached records)
    HASH_STABLE_KEYS: ClassVar[tuple] = ()

    def to_dict(self) -> dict:
        """The block with every default filled in (but the HASH_STABLE_KEYS still at their default), as plain
        JSON-able data (hashes, records)."""
        d = self.model_dump(mode="json")
        for k in self.HASH_STABLE_KEYS:
            if getattr(self, k) == type(self).model_fields[k].get_default(call_default_factory=True):
                d.pop(k, None)
        return d


# Numbers as a card writes them. strict=True refuses strings ("1e-3", "two") and bools; ints are fine for floats.
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]          # a probability or a share, 0..1 inclusive
OpenFraction = Annotated[float, Field(gt=0, lt=1)]      # a pruning ratio p, strictly inside (0, 1)
PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]


def _loc(prefix: str, loc: tuple) -> str:
    parts = [prefix] if prefix else []
    for p in loc:
        if isinstance(p, int):
            if parts:
                parts[-1] += f"[{p}]"
            else:
                parts.append(f"[{p}]")
        else:
            parts.append(str(p))
    return ".".join(parts) or "(top level)"


def _known_keys(model: type[BaseModel], loc: tuple) -> list:
    """The field names of the (nested) model that `loc` points into, for 'did you mean'."""
    cur: Any = model
    for p in loc[:-1]:
        if isinstance(p, int) or not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            # list items / dict values: look through the annotation for a model
            cur = _inner_model(cur)
            if isinstance(p, int) or cur is None:
                continue
        field = cur.model_fields.get(p) if isinstance(cur, type) and issubclass(cur, BaseModel) else None
        if field is None:
            cur = _inner_model(cur)
            continue
        cur = _inner_model(field.annotation) or field.annotation
    cur = cur if isinstance(cur, type) and issubclass(cur, BaseModel) else _inner_model(cur)
    return sorted(cur.model_fields) if cur is not None else []


def _inner_model(tp) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for a in getattr(tp, "__args__", ()) or ():
        m = _inner_model(a)
        if m is not None:
            return m
    return None


def describe_errors(err: ValidationError, model: type[BaseModel], prefix: str = "") -> list:
    """One sentence per problem: '<path>: <what is wrong> (<fix>)'."""
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = _loc(prefix, loc)
        kind, got = e["type"], e.get("input")
        if kind == "extra_forbidden":
            known = _known_keys(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
            hint = f", did you mean {close[0]}?" if close else (f" (known keys: {', '.join(known)})" if known else "")
            out.append(f"{path}: unknown key{hint}")
        elif kind == "missing":
            out.append(f"{path}: missing (required)")
        elif kind in ("float_type", "int_type", "bool_type", "string_type", "list_type", "dict_type", "tuple_type",
                      "model_type", "int_from_float", "literal_error", "enum"):
            out.append(f"{path}: {e['msg'].lower()}, got {got!r}" + _number_hint(kind, got))
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            out.append(f"{path}: {msg[:1].lower() + msg[1:]}, got {got!r}" if not isinstance(got, dict)
                       else f"{path}: {msg[:1].lower() + msg[1:]}")
    return out


def _number_hint(kind: str, got) -> str:
    if kind not in ("float_type", "int_type") or not isinstance(got, str):
        return ""
    try:
        v = float(got)
    except ValueError:
        return " (write a number)"
    return f" (YAML reads {got} as text: write {v!r} with a decimal point, e.g. 1.0e-3)"


def block_errors(model: type[BaseModel], data: Any, where: str) -> list:
    """The problems of `data` as a `model` block (empty: valid), one sentence each."""
    try:
        model.model_validate({} if data is None else data)
        return []
    except ValidationError as e:
        return describe_errors(e, model, where)


def parse_block(model: type[M], data: Any, where: str) -> M:
    """Validate `data` against `model`; raise one BenchError whose lines name each problem's path."""
    try:
        return model.model_validate({} if data is None else data)
    except ValidationError as e:
        errs = describe_errors(e, model, where)
        raise BenchError(errs[0] if len(errs) == 1 else "\n  - ".join([f"{len(errs)} problems:"] + errs)) from None


def field_docs(model: type[BaseModel]) -> list:
    """[(name, type text, default text, description)] of a block, for `ls --options` and the README."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if f.is_required():
            default = "required"
        else:
            d = f.get_default(call_default_factory=True)
            default = repr(d.model_dump() if isinstance(d, BaseModel) else d)
        bounds = [f"{sym}{getattr(m, attr)}" for m in f.metadata
                  for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                  if getattr(m, attr, None) is not None]
        rows.append((f.alias or name, _short_type(ann) + (f" ({', '.join(bounds)})" if bounds else ""), default,
                     f.description or ""))
    return rows


def _short_type(ann) -> str:
    import typing
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(ann)
        bounds = []
        for m in meta:
            for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                for mm in getattr(m, "metadata", [m]):
                    v = getattr(mm, attr, None)
                    if v is not None:
                        bounds.append(f"{sym}{v}")
        return _short_type(base) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_short_type(a) for a in typing.get_args(ann))
    if origin in (list, tuple, dict):
        args = ", ".join(_short_type(a) for a in typing.get_args(ann) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))
