"""What a run is: a method name plus typed, validated arguments (:class:`Request`), and the registry of methods.

    request = parse_request({"method": "maps", "prompt": "a red circle", "seed": 3}, where="line 4")
    request.args        # {"prompt": "a red circle", "seed": 3, "steps": None, ...}: every field, defaults filled
    cli_line(request)   # 'attnkit maps "a red circle" --seed 3'

A :class:`Method` is one small entry: its fields (name, type, default, CLI option, help), the Python call that
runs it and, optionally, model-aware checks and a batched call. Adding a method is one ``register(Method(...))``
in :mod:`attnkit.runs.methods`. Every error names the place (``where``), the field and the fix.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnkit.engine import AttnkitError

# Value types a field can have. JSON gives numbers, strings, lists and objects; the app and the CLI give strings,
# so every type takes both its JSON form and a short text form ("0.2,0.8", "lego=2").
TYPES = ("str", "text", "int", "float", "bool", "words", "window", "cross", "weights", "pixel", "path", "choice")
RESERVED = ("id", "method")  # keys of a job line that are not arguments


@dataclass(frozen=True)
class Field:
    """One argument of a method.

    ``cli``: the CLI's spelling: ``"arg"`` (positional), ``"--to"`` (an option; lists repeat it), ``None`` when
    the CLI has no such option (the request's CLI line then falls back to ``attnkit batch``).
    ``required``: no default; ``minimum``: smallest allowed number; ``choices``: allowed strings.
    """

    name: str
    type: str
    default: Any = None
    help: str = ""
    cli: str | None = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"field {self.name}: unknown type {self.type!r} (one of {TYPES})")


@dataclass(frozen=True)
class Method:
    """One method front ends can run.

    ``run(pipe, args, ctx) -> Output``: the Python call. ``check(pipe, args)``: model-aware validation (token
    limits, words in the prompt) run for every job before any sampling. ``batch_key(pipe, args)``: jobs with the
    same non-None key may share one UNet batch through ``run_batch(pipe, [args, ...], ctx) -> [Output, ...]``,
    whose outputs must equal running each alone (up to float rounding).
    """

    name: str
    summary: str
    fields: tuple[Field, ...]
    run: Callable[..., Any]
    prompt_field: str = "prompt"
    check: Callable[[Any, dict[str, Any]], None] | None = None
    batch_key: Callable[[Any, dict[str, Any]], Hashable | None] | None = None
    run_batch: Callable[..., list[Any]] | None = None

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


@dataclass(frozen=True)
class Request:
    """A validated run: ``method`` and ``args`` (every field of the method, defaults filled in)."""

    method: str
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> Method:
        return get_method(self.method)

    def given(self) -> dict[str, Any]:
        """The arguments that differ from their defaults, JSON-ready (what a job line needs to say)."""
        spec = self.spec
        return {k: to_json(v) for k, v in self.args.items() if v != spec.field(k).default}

    def to_job(self, job_id: str | None = None) -> dict[str, Any]:
        """A batch job line for this request: ``{"id": ..., "method": ..., **arguments}``."""
        return {**({"id": job_id} if job_id is not None else {}), "method": self.method, **self.given()}


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (its name must be new)."""
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    from attnkit.runs import methods  # noqa: F401  (registers the built-in methods)

    if name not in REGISTRY:
        raise AttnkitError(f"unknown method {name!r}: use one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def method_names() -> list[str]:
    from attnkit.runs import methods  # noqa: F401

    return list(REGISTRY)


# -- parsing and validation ---------------------------------------------------------------------------------
def _fail(where: str, name: str, problem: str) -> AttnkitError:
    return AttnkitError(f"{where}: field {name!r}: {problem}")


def _number(value: Any, f: Field, where: str, integer: bool) -> float | int:
    if isinstance(value, str):
        try:
            value = float(value.strip()) if not integer else int(value.strip())
        except ValueError:
            raise _fail(where, f.name, f"{value!r} is not {'an integer' if integer else 'a number'}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, f.name, f"give {'an integer' if integer else 'a number'}, not {type(value).__name__}")
    if not math.isfinite(value):
        raise _fail(where, f.name, f"{value} is not a finite number")
    if integer:
        if value != int(value):
            raise _fail(where, f.name, f"{value} is not an integer")
        value = int(value)
    if f.minimum is not None and value < f.minimum:
        raise _fail(where, f.name, f"{value} is below the smallest allowed value {f.minimum:g}")
    if f.maximum is not None and value > f.maximum:
        raise _fail(where, f.name, f"{value} is above the largest allowed value {f.maximum:g}")
    return value


def _fraction(value: Any, f: Field, where: str) -> float:
    x = float(_number(value, Field(f.name, "float"), where, integer=False))
    if not 0.0 <= x <= 1.0:
        raise _fail(where, f.name, f"{x} is not a fraction of the steps: give a value from 0 to 1")
    return x


def _window(value: Any, f: Field, where: str) -> float | tuple[float, float]:
    if isinstance(value, str):
        value = [p for p in value.replace(" ", "").split(",") if p]
        value = value[0] if len(value) == 1 else value
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise _fail(where, f.name, "give a fraction like 0.8 or a [start, end] pair like [0.2, 0.8]")
        start, end = (_fraction(v, f, where) for v in value)
        if start > end:
            raise _fail(where, f.name, f"start {start} is after end {end}")
        return (start, end)
    return _fraction(value, f, where)


def _weights(value: Any, f: Field, where: str) -> dict[str, float]:
    if isinstance(value, str):  # "lego=2, pink=-1"
        items = {}
        for part in (p.strip() for p in value.replace(";", ",").split(",")):
            if not part:
                continue
            word, sep, number = part.partition("=")
            if not sep or not word.strip():
                raise _fail(where, f.name, f"{part!r}: use WORD=FACTOR, e.g. lego=2")
            items[word.strip()] = number
        value = items
    if not isinstance(value, dict):
        raise _fail(where, f.name, 'give an object of word: factor, e.g. {"lego": 2.0}')
    out = {}
    for word, number in value.items():
        if not isinstance(word, str) or not word.strip():
            raise _fail(where, f.name, f"{word!r} is not a word")
        out[word.strip()] = float(_number(number, Field(f.name, "float"), where, integer=False))
    return out


def _words(value: Any, f: Field, where: str) -> list[str]:
    if isinstance(value, str):
        whole = f.name in ("targets", "to", "prompts")  # a string is one prompt, not words
        value = [value] if whole else [w for w in value.replace(",", " ").split() if w]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _fail(where, f.name, 'give a list of strings, e.g. ["red", "circle"]')
    items = [v.strip() for v in value if v.strip()]
    if len(items) != len(value):
        raise _fail(where, f.name, "an entry is empty")
    return items


def _pixel(value: Any, f: Field, where: str) -> tuple[int, int]:
    if isinstance(value, str):
        value = [p for p in value.replace(" ", "").split(",") if p]
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise _fail(where, f.name, "give the query pixel as [y, x] (or 'y,x') in the attention grid, e.g. [8, 8]")
    y, x = (int(_number(v, Field(f.name, "int", minimum=0), where, integer=True)) for v in value)
    return (y, x)


def coerce(f: Field, value: Any, where: str) -> Any:
    """``value`` as field ``f``'s type, or an :class:`AttnkitError` naming ``where`` and the field."""
    if value is None:
        if f.required:
            raise _fail(where, f.name, f"is required ({f.help or f.type})")
        return f.default
    kind = f.type
    if kind in ("str", "text", "path", "choice"):
        if not isinstance(value, str):
            raise _fail(where, f.name, f"give a string, not {type(value).__name__}")
        if kind == "text" and not value.strip():
            raise _fail(where, f.name, "is empty: give a prompt")
        if kind == "choice" and value not in f.choices:
            raise _fail(where, f.name, f"{value!r} is not one of {', '.join(map(repr, f.choices))}")
        if kind == "path" and not Path(value).expanduser().exists():
            raise _fail(where, f.name, f"{value!r} does not exist: check the path (relative paths are read "
                                       "from the folder the command runs in)")
        return value
    if kind == "int":
        return _number(value, f, where, integer=True)
    if kind == "float":
        return float(_number(value, f, where, integer=False))
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise _fail(where, f.name, "give true or false")
        return value
    if kind == "words":
        items = _words(value, f, where)
        if f.required and not items:
            raise _fail(where, f.name, f"is empty: give at least one ({f.help or f.type})")
        return items
    if kind == "window":
        return _window(value, f, where)
    if kind == "cross":  # Python's edit(cross=...): a window, or {"default_": window, word: window}
        if isinstance(value, dict):
            return {k: _window(v, f, where) for k, v in value.items()}
        return _window(value, f, where)
    if kind == "weights":
        return _weights(value, f, where)
    if kind == "pixel":
        return _pixel(value, f, where)
    raise AssertionError(kind)


def parse_request(data: dict[str, Any], where: str = "request", method: str | None = None) -> Request:
    """Validate ``{"method": ..., **arguments}`` (or ``method=`` plus arguments) into a :class:`Request`.

    Unknown fields, wrong types, missing required fields and out-of-range values raise an
    :class:`AttnkitError` that names ``where`` and the field. ``parse_request({"method": "generate",
    "prompt": "a cat"})``
    """
    if not isinstance(data, dict):
        raise AttnkitError(f"{where}: a job is a JSON object like {{\"method\": \"generate\", \"prompt\": ...}}, "
                           f"not {type(data).__name__}")
    name = method or data.get("method")
    if not isinstance(name, str):
        raise AttnkitError(f"{where}: field 'method' is required: one of {', '.join(method_names())}")
    try:
        spec = get_method(name)
    except AttnkitError as error:
        raise AttnkitError(f"{where}: field 'method': {error}") from None
    known = {f.name for f in spec.fields}
    unknown = [k for k in data if k not in known and k not in RESERVED]
    if unknown:
        raise _fail(where, unknown[0], f"method {name!r} has no such argument (it takes: {', '.join(sorted(known))})")
    args = {f.name: coerce(f, data.get(f.name), where) for f in spec.fields}
    return Request(name, args)


# -- JSON and the command line ------------------------------------------------------------------------------
def to_json(value: Any) -> Any:
    """Tuples as lists, recursively: how a value looks in a job line or record.json."""
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def _format(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(_format(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _cli_parts(f: Field, value: Any) -> list[str] | None:
    """The CLI words for one field's value, or None when the CLI cannot say it."""
    if f.cli is None:
        return None
    if f.cli == "arg":  # a list (the prompts of `attnkit style`) is one positional argument per entry
        return [str(v) for v in value] if f.type == "words" else [_format(value)]
    if f.type == "bool":
        return [f.cli] if value else [f"--no-{f.cli[2:]}"]
    if f.type == "words":
        return [part for v in value for part in (f.cli, v)]
    if f.type == "weights":
        return [part for k, v in value.items() for part in (f.cli, f"{k}={_format(v)}")]
    if f.type == "cross" and isinstance(value, dict):
        default = value.get("default_", f.default)
        words = [part for k, v in value.items() if k != "default_" for part in ("--cross-word", f"{k}={_format(v)}")]
        if any(isinstance(v, tuple | list) for k, v in value.items() if k != "default_"):
            return None  # the CLI's --cross-word takes one fraction per word
        return [f.cli, _format(default), *words]
    return [f.cli, _format(value)]


def cli_line(request: Request, model: str | None = None, out: str | Path | None = None,
             device: str | None = None, dtype: str | None = None) -> str:
    """The ``attnkit ...`` command that runs ``request`` again; where the CLI lacks an option the request sets,
    the same job through ``attnkit batch`` (a one-line job file on standard input)."""
    spec = request.spec
    words = ["attnkit", spec.name]
    exact = True
    for f in spec.fields:
        value = request.args[f.name]
        if value == f.default and not f.required:
            continue
        parts = _cli_parts(f, value)
        if parts is None:
            exact = False
            break
        words += parts
    common = []
    if model is not None and model != "bundled":
        common += ["--model", str(model)]
    if device not in (None, "auto"):
        common += ["--device", str(device)]
    if dtype not in (None, "float32"):
        common += ["--dtype", str(dtype)]
    if exact:
        return shlex.join(words + common + (["--out", str(out)] if out is not None else []))
    job = json.dumps({"id": Path(str(out)).name if out is not None else "run", **request.to_job()})
    folder = str(Path(str(out)).parent) if out is not None else "outputs"
    return f"echo {shlex.quote(job)} | " + shlex.join(["attnkit", "batch", "-", "--out", folder, *common])
