"""Which model scores which image, on a night with several models: the routes. No Ray, no torch.

A route is a name and the checkpoint that scores its images. Three ways to say them:

    --models MODELS      INPUT/<route>/… is scored by MODELS/<route>.pt (a folder or s3:// prefix)
    --routes FILE        CSV or YAML rules, pattern → model, the first that matches wins
    a manifest's model   per image: a name (MODELS/<name>.pt) or a checkpoint's URI

A pattern is a path under INPUT (or an absolute URI) with `*` (within one folder), `**` (across
folders), `?` and `[…]`; it matches an image when it matches the image's path or one of the
folders it is in, so `line3` and `line3/` route everything under INPUT/line3/.

`Router.codes` gives every listed image a route: one with a model, or one without, whose `why` is
that image's row ("no model: …", retryable, so a model added later scores it). A route whose model
cannot be used (missing, corrupt, of another format) is found when its model is read
(`nightly.fleet`), and its images' rows say so.
"""

from __future__ import annotations

import csv
import io
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dskd_ray.errors import DataError
from dskd_ray.io.storage import (
    canonical_uri,
    exists,
    join_uri,
    list_folder,
    read_object,
    storage_errors,
    uri_scheme,
)

NO_MODEL = "no model"  # the error kind of an image no route gives a model
MODEL_SUFFIX = ".pt"


@dataclass(frozen=True)
class Route:
    """A route's name (None: the image is in no route) and its model's URI (None: no model, and
    `why` is its images' error)."""

    name: str | None
    model: str | None
    why: str = ""


@dataclass(frozen=True)
class RouteRule:
    """One line of a routes file: images matching `pattern` go to `route`, scored by `model`."""

    pattern: str
    model: str
    route: str
    regex: str  # RE2, anchored: the pattern, or a folder the image is in
    absolute: bool  # matched against the whole URI, not the path under INPUT


@dataclass(frozen=True)
class Routing:
    """How a night finds each image's model: `--models`, `--routes`, or both (a routes file's
    model names are then looked up in MODELS)."""

    models: str | None = None
    rules: tuple[RouteRule, ...] = ()
    source: str | None = None  # the routes file

    def describe(self) -> str:
        """What the run's manifest says it was given (its `model` field)."""
        said = [f"--models {self.models}"] if self.models else []
        return " ".join([*said, *([f"--routes {self.source}"] if self.source else [])])


# --- routes files -------------------------------------------------------------------------------


def read_routes(uri: str, models: str | None = None) -> Routing:
    """The rules of a routes file (CSV with columns pattern, model and optionally route; or YAML:
    a mapping pattern → model, or a list of {pattern, model, route}). DataError in one line for
    a file that cannot say exactly which model scores what."""
    name = uri.rsplit("/", 1)[-1]
    with storage_errors(uri):
        try:
            text = read_object(uri).decode("utf-8")
        except FileNotFoundError:
            raise DataError(f"routes file {uri} does not exist") from None
        except UnicodeDecodeError:
            raise DataError(f"routes file {uri} is not UTF-8 text") from None
    entries = _yaml_entries(name, text) if name.lower().endswith((".yaml", ".yml")) else None
    if entries is None:
        if not name.lower().endswith(".csv"):
            raise DataError(f"routes file {name}: name it .csv, .yaml or .yml")
        entries = _csv_entries(name, text)
    if not entries:
        raise DataError(f"routes file {name} names no routes")
    base = posixpath.dirname(uri.rstrip("/"))
    rules, models_of = [], {}
    for line, (pattern, model, route) in entries:
        where = f"routes file {name}, {line}"
        if not pattern:
            raise DataError(f"{where}: the pattern is empty")
        if not model:
            raise DataError(f"{where}: no model for {pattern!r}")
        model_uri = _model_uri(where, model, models, base)
        route = route or _stem(model_uri)
        if models_of.setdefault(route, model_uri) != model_uri:
            raise DataError(
                f"{where}: route {route!r} is already scored by {models_of[route]}: one model "
                "per route (name the routes apart with a route column)"
            )
        absolute = bool(uri_scheme(pattern)) or pattern.startswith("/")
        rules.append(RouteRule(pattern, model_uri, route, glob_regex(pattern), absolute))
    return Routing(models=models, rules=tuple(rules), source=uri)


def _csv_entries(name: str, text: str) -> list[tuple[str, tuple[str, str, str]]]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "pattern" not in columns or "model" not in columns:
        raise DataError(
            f"routes file {name} needs columns pattern and model (and may have route); it has: "
            f"{', '.join(columns) or 'none'}"
        )
    entries = []
    for i, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        entries.append((f"line {i}", (row["pattern"], row["model"], row.get("route", ""))))
    return entries


def _yaml_entries(name: str, text: str) -> list[tuple[str, tuple[str, str, str]]]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DataError(f"routes file {name} is not valid YAML: {' '.join(str(e).split())}") from e
    if isinstance(data, dict) and set(data) == {"routes"}:
        data = data["routes"]
    if isinstance(data, dict):  # pattern: model
        return [(f"key {k!r}", (_text(k), _text(v), "")) for k, v in data.items()]
    if not isinstance(data, list):
        raise DataError(
            f"routes file {name}: expected a mapping pattern → model, or a list of "
            "{pattern, model, route}"
        )
    entries = []
    for i, item in enumerate(data, start=1):
        if not isinstance(item, dict) or set(item) - {"pattern", "model", "route"}:
            raise DataError(
                f"routes file {name}, item {i}: expected pattern, model and optionally route"
            )
        entries.append(
            (f"item {i}", (_text(item.get("pattern")), _text(item.get("model")),
                           _text(item.get("route"))))
        )  # fmt: skip
    return entries


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _model_uri(where: str, model: str, models: str | None, base: str) -> str:
    """A routes file's model: a URI or absolute path as written; a name (no folder, no .pt) in
    MODELS; any other path relative to the routes file's folder."""
    if uri_scheme(model) or model.startswith("/"):
        return model
    if "/" not in model and not model.endswith(MODEL_SUFFIX):
        if models is None:
            raise DataError(
                f"{where}: model {model!r} is a name: give --models MODELS to find "
                f"MODELS/{model}{MODEL_SUFFIX}, or the checkpoint's path"
            )
        return join_uri(models, model + MODEL_SUFFIX)
    return join_uri(base, model) if base else model


def _stem(uri: str) -> str:
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    return base[: -len(MODEL_SUFFIX)] if base.endswith(MODEL_SUFFIX) else base


_RE2_SPECIAL = set("\\.^$|?*+()[]{}")


def glob_regex(pattern: str) -> str:
    """An anchored RE2 pattern for a route pattern: `*` within a folder, `**` across folders,
    `?` one character, `[…]` a set (`[!…]` its complement); it matches a path that the pattern
    matches whole, or that lies in a folder it matches."""
    out, i = [], 0
    body = pattern.rstrip("/") or pattern
    while i < len(body):
        c = body[i]
        if c == "*":
            if body.startswith("**/", i):  # no folder, or any number of them
                out.append("(.*/)?")
                i += 3
                continue
            if body.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := _class_end(body, i)) > 0:
            inner = body[i + 1 : end]
            inner = "^" + inner[1:] if inner.startswith("!") else inner
            out.append("[" + inner.replace("\\", "\\\\") + "]")
            i = end + 1
            continue
        else:
            out.append("\\" + c if c in _RE2_SPECIAL else c)
        i += 1
    return "(?s)^" + "".join(out) + "(/.*)?$"  # (?s): a name may hold a newline


def _class_end(body: str, start: int) -> int:
    """Where the set opened at `start` closes (a "]" first in it is a member), or -1."""
    j = start + 1
    j += body.startswith("!", j)
    j += body.startswith("]", j)
    return body.find("]", j)


# --- assigning images to routes -----------------------------------------------------------------


@dataclass
class Router:
    """Gives images their routes for one night: `routes` grows as names are met, and
    `codes(uris)` indexes into it."""

    routing: Routing
    input_uri: str
    manifest: bool  # INPUT is a manifest: no folders to route by
    routes: list[Route] = field(default_factory=list)
    _index: dict[tuple[str | None, str | None, str], int] = field(default_factory=dict)
    _available: dict[str, str] | None = None  # MODELS' checkpoints, by route name

    def __post_init__(self) -> None:
        if self.routing.models is not None:
            self._available = models_in(self.routing.models)
        if self.manifest and any(not r.absolute for r in self.routing.rules):
            bad = next(r for r in self.routing.rules if not r.absolute)
            raise DataError(
                f"routes file {self.routing.source}: pattern {bad.pattern!r} is a path under "
                "INPUT, but INPUT is a manifest: give whole URIs (s3://… or /…) as patterns"
            )

    def _code(self, route: Route) -> int:
        key = (route.name, route.model, route.why)
        taken = {r.name: r.model for r in self.routes if r.name is not None}
        if key not in self._index and route.name in taken and taken[route.name] != route.model:
            # Two models under one name (two URIs with one file name, say): told apart, as rows
            # name their route and one route has one model.
            route = Route(f"{route.name} ({route.model or NO_MODEL})", route.model, route.why)
            key = (route.name, route.model, route.why)
        if key not in self._index:
            self._index[key] = len(self.routes)
            self.routes.append(route)
        return self._index[key]

    def codes(
        self, uris: pa.ChunkedArray | pa.Array, models: pa.ChunkedArray | None = None
    ) -> np.ndarray:
        """Each image's route (an index into `routes`). `models`: a manifest's model column."""
        n = len(uris)
        codes = np.full(n, -1, np.int32)
        if models is not None:
            self._by_manifest(models, codes)
        if self.routing.rules:
            self._by_rules(uris, codes)
        elif self.manifest and models is None:
            raise DataError(
                "a manifest INPUT routed by --models needs a column model (a name in MODELS, or a "
                "checkpoint's URI, per image), or --routes with whole URIs as patterns"
            )
        elif not self.manifest:
            self._by_folder(uris, codes)
        left = codes < 0
        if left.any():
            if self.routing.rules:
                why = f"{NO_MODEL}: no route in {self.routing.source} matches this image"
            else:
                why = f"{NO_MODEL}: the manifest's model column names none for this image"
            codes[left] = self._code(Route(None, None, why))
        return codes

    def _by_manifest(self, models: pa.ChunkedArray, codes: np.ndarray) -> None:
        values = pc.utf8_trim_whitespace(models.cast(pa.string()))
        values = pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
        names = pc.unique(values).drop_null()
        found = pc.index_in(values, value_set=names)
        found = pc.fill_null(found, -1).to_numpy(zero_copy_only=False)
        table = np.array([self._code(self._named(v)) for v in names.to_pylist()], np.int32)
        codes[found >= 0] = table[found[found >= 0]]

    def _named(self, value: str) -> Route:
        """A manifest's model value: a checkpoint's URI or path, or a name in MODELS."""
        if uri_scheme(value) or value.startswith("/") or value.endswith(MODEL_SUFFIX):
            return Route(_stem(value), value)
        if self._available is None:
            return Route(
                value, None, f"{NO_MODEL}: the manifest names model {value!r} but no --models "
                "folder was given to find it in"
            )  # fmt: skip
        return self._folder_route(value)

    def _folder_route(self, name: str) -> Route:
        assert self._available is not None and self.routing.models is not None
        model = self._available.get(name)
        if model is None:
            expected = join_uri(self.routing.models, name + MODEL_SUFFIX)
            return Route(name, None, f"{NO_MODEL}: {expected} does not exist")
        return Route(name, model)

    def _by_rules(self, uris: pa.ChunkedArray | pa.Array, codes: np.ndarray) -> None:
        relative = None if self.manifest else _under_input(uris, self.input_uri)
        for rule in self.routing.rules:
            target = uris if rule.absolute else relative
            hit = pc.fill_null(pc.match_substring_regex(target, rule.regex), False)
            hit = np.asarray(hit.to_numpy(zero_copy_only=False), bool) & (codes < 0)
            if hit.any():
                codes[hit] = self._code(Route(rule.route, rule.model))

    def _by_folder(self, uris: pa.ChunkedArray | pa.Array, codes: np.ndarray) -> None:
        relative = _under_input(uris, self.input_uri)
        parts = pc.split_pattern(relative, "/", max_splits=1)
        in_folder = pc.equal(pc.list_value_length(parts), 2)
        folder = pc.if_else(in_folder, pc.list_element(parts, 0), pa.scalar(None, pa.string()))
        names = pc.unique(folder).drop_null()
        found = pc.fill_null(pc.index_in(folder, value_set=names), -1)
        found = found.to_numpy(zero_copy_only=False)
        table = np.array(
            [self._code(self._folder_route(name)) for name in names.to_pylist()], np.int32
        )
        codes[found >= 0] = table[found[found >= 0]]
        loose = (found < 0) & (codes < 0)
        if loose.any():
            why = (
                f"{NO_MODEL}: the image is not in a route folder (INPUT/<route>/…, scored by "
                f"{join_uri(self.routing.models or 'MODELS', '<route>' + MODEL_SUFFIX)})"
            )
            codes[loose] = self._code(Route(None, None, why))


def _under_input(uris: pa.ChunkedArray | pa.Array, input_uri: str) -> pa.Array:
    """Each URI's path under INPUT ("" for INPUT itself, or a URI not under it)."""
    prefix = canonical_uri(input_uri).rstrip("/") + "/"
    uris = pa.chunked_array([uris]) if isinstance(uris, pa.Array) else uris
    uris = uris.combine_chunks() if uris.num_chunks else pa.array([], pa.string())
    inside = pc.starts_with(uris, prefix)
    cut = pc.utf8_slice_codeunits(uris, len(prefix))  # it counts characters, not bytes
    return pc.if_else(inside, cut, pa.scalar("", pa.string()))


def models_in(models: str) -> dict[str, str]:
    """The checkpoints directly in a --models folder or prefix, by route name (`<route>.pt`).
    DataError when it does not exist or holds none: a mistyped MODELS must not make every image
    of the night a "no model" row."""
    with storage_errors(models):
        if not exists(models):
            raise DataError(f"--models {models} does not exist")
        try:
            files, _ = list_folder(models)
        except NotADirectoryError:
            raise DataError(f"--models {models} is a file: give a folder of <route>.pt") from None
    found = {}
    for uri in files:
        base = uri.rsplit("/", 1)[-1]
        if base.endswith(MODEL_SUFFIX) and len(base) > len(MODEL_SUFFIX):
            found[base[: -len(MODEL_SUFFIX)]] = uri
    if not found:
        raise DataError(
            f"--models {models} holds no checkpoint (<route>{MODEL_SUFFIX}): one per folder of "
            "INPUT, named like it"
        )
    return found
