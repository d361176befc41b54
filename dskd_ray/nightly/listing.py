"""What a run is asked to score, as one Arrow table of URIs, versions and sizes
(`LISTING_SCHEMA`), never image bytes: the images under a prefix (`list_inputs`,
through `io.storage_listing.iter_images`) or the rows of a manifest (`read_manifest`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dskd_ray.errors import DataError
from dskd_ray.io.storage import check_schemes, open_object
from dskd_ray.io.storage_listing import ListingStats, iter_images

log = logging.getLogger(__name__)


# Listed images become an Arrow chunk every this many: the Python objects of one chunk are all
# the listing holds beside its Arrow columns (at 50 000 they were 12 MB, a fifth of a 10⁵
# listing's driver memory; bench/listing.py).
LISTING_CHUNK = 8192


LISTING_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("image_version", pa.string()),
        ("image_bytes", pa.int64()),
        ("listing_error", pa.string()),  # set when the file is not to be read (its name)
    ]
)


@dataclass
class _Listing:
    table: pa.Table
    stats: ListingStats
    manifest: bool = False  # the input was a manifest: exactly its images, no "gone" rows
    models: pa.ChunkedArray | None = None  # a manifest's model column, when asked for and there


def is_manifest(input_uri: str) -> bool:
    """INPUT names a list of images (Parquet or CSV) rather than a folder or prefix of them."""
    return input_uri.lower().endswith((".parquet", ".csv"))


def list_inputs(
    input_uri: str, output: str, schemes: tuple[str, ...] = (), with_model: bool = False
) -> _Listing:
    """Every image under `input_uri` (or in the manifest it names) with its version; a manifest
    may name s3://, file:// and local paths, and the URI `schemes` besides. `with_model`: keep a
    manifest's `model` column (a run of several models routes by it).

    Built in Arrow chunks as the listing pages arrive, never as one Python object per image
    (about 130 bytes per image on the driver, where a Python dict took about 1 KB).
    """
    if is_manifest(input_uri):
        table = read_manifest(input_uri, schemes, with_model=with_model)
        models = table["model"] if "model" in table.column_names else None
        table = table.select(LISTING_SCHEMA.names)
        return _Listing(table, ListingStats(), manifest=True, models=models)
    chunks: list[pa.RecordBatch] = []
    rows: dict[str, list] = {name: [] for name in LISTING_SCHEMA.names}
    stats = ListingStats()

    def flush() -> None:
        if rows["image_uri"]:
            chunks.append(pa.RecordBatch.from_pydict(rows, schema=LISTING_SCHEMA))
            for column in rows.values():
                column.clear()

    for entry in iter_images(input_uri, exclude=output, stats=stats):
        if entry is None:
            stats.other_files += 1
            continue
        rows["image_uri"].append(entry.uri)
        rows["image_version"].append(entry.version)
        rows["image_bytes"].append(entry.size)
        rows["listing_error"].append(entry.error)
        if len(rows["image_uri"]) >= LISTING_CHUNK:
            flush()
    flush()
    return _Listing(pa.Table.from_batches(chunks, schema=LISTING_SCHEMA), stats)


MANIFEST_COLUMNS = ("image_uri", "image_version", "image_bytes")


_URI = r"^([a-zA-Z][a-zA-Z0-9+.-]*://|/)"  # a scheme, or an absolute local path


_SCHEME_PART = r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://"


# A local path with something to resolve: "//", a "." or ".." segment (Arrow's RE2 syntax).
_UNRESOLVED = r"^/(.*/)?(\.\.?)?(/|$)|//"


def _one_spelling(uris: pa.Array) -> pa.Array:
    """Local paths spelled as the listing spells them: file:///a → /a, and "//", ".", ".."
    resolved (only the rows that need it, in Python). Other URIs as written."""
    import posixpath

    uris = pc.replace_substring_regex(uris, pattern="^(?i:file)://(/|$)", replacement="/")
    local = pc.starts_with(uris, "/")
    todo = pc.and_(local, pc.match_substring_regex(uris, _UNRESOLVED))
    if not pc.any(todo).as_py():
        return uris
    values = uris.to_pylist()
    for i in pc.indices_nonzero(todo).to_pylist():
        values[i] = "/" + posixpath.normpath(values[i]).lstrip("/")
    return pa.array(values, pa.string())


def read_manifest(uri: str, schemes: tuple[str, ...] = (), with_model: bool = False) -> pa.Table:
    """The images a manifest names (LISTING_SCHEMA): column `image_uri`, optionally
    `image_version` (missing: the image is scored once per URI) and `image_bytes`; with
    `with_model`, also its `model` column (the model of each image), if it has one.

    Read in record batches, only those columns. A manifest that cannot say exactly which
    images to score (no such column, an empty or relative URI, a URI twice) is refused whole,
    and so is one naming a scheme other than s3://, file:// and `schemes`. Local paths are
    compared spelled one way (file:// dropped, ".", ".." and "//" resolved): two spellings of
    one file are the same URI twice. Keys on object storage are taken as written: there
    "a/../b" is a key of its own.
    """
    from pyarrow import csv, parquet

    name = uri.rsplit("/", 1)[-1]
    chunks = []
    try:
        with open_object(uri) as f:
            if uri.lower().endswith(".parquet"):
                source = parquet.ParquetFile(f)
                columns = source.schema_arrow.names
                _check_manifest_columns(name, columns)
                wanted = [c for c in MANIFEST_COLUMNS if c in columns]
                wanted += ["model"] if with_model and "model" in columns else []
                _check_manifest_types(name, source.schema_arrow, wanted)
                batches = source.iter_batches(batch_size=65_536, columns=wanted)
            else:
                types = {"image_uri": pa.string(), "image_version": pa.string(),
                         "model": pa.string()}  # fmt: skip
                convert = csv.ConvertOptions(column_types=types, strings_can_be_null=True)
                batches = csv.open_csv(f, convert_options=convert)
                _check_manifest_columns(name, batches.schema.names)
            offset = 0
            for batch in batches:
                table = pa.Table.from_batches([batch])
                chunk = _manifest_chunk(name, table, offset, schemes)
                if with_model and "model" in table.column_names:
                    chunk = chunk.append_column("model", table["model"].cast(pa.string()))
                chunks.append(chunk)
                offset += batch.num_rows
    except FileNotFoundError:
        raise DataError(f"manifest {uri} does not exist") from None
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        why = " ".join(str(e).split())
        raise DataError(f"manifest {uri} cannot be read as {name.rsplit('.', 1)[-1]}: {why}") from e
    table = pa.concat_tables(chunks) if chunks else LISTING_SCHEMA.empty_table()
    if pc.count_distinct(table["image_uri"]).as_py() != table.num_rows:
        counts = pc.value_counts(table["image_uri"])
        twice = counts.filter(pc.greater(counts.field("counts"), 1))
        raise DataError(
            f"manifest {name} lists {twice[0]['values'].as_py()} more than once "
            f"({len(twice)} URI(s) repeated, local paths compared spelled one way): one row "
            "per image"
        )
    return table


def _check_manifest_columns(name: str, columns: list[str]) -> None:
    if "image_uri" not in columns:
        raise DataError(
            f"manifest {name} has no column image_uri (it has: {', '.join(columns) or 'none'})"
        )


def _check_manifest_types(name: str, schema: pa.Schema, columns: list[str]) -> None:
    """Each column a value per row that says one thing: text (or numbers, cast to text) for the
    URI and the version, a whole number for the size; a list or a struct is refused in one line
    (it used to end in Arrow's traceback)."""
    for column in columns:
        kind = schema.field(column).type
        scalar = (
            pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
        )
        if column != "image_uri":
            scalar = scalar or pa.types.is_integer(kind)
        if column == "image_version":
            scalar = scalar or pa.types.is_floating(kind)
        if not scalar:
            want = "a whole number" if column == "image_bytes" else "text"
            raise DataError(f"manifest {name}: column {column} holds {kind}, not {want}")


def _manifest_chunk(name: str, chunk: pa.Table, offset: int, schemes: tuple[str, ...]) -> pa.Table:
    uris = chunk["image_uri"].cast(pa.string()).combine_chunks()
    bad = pc.invert(pc.fill_null(pc.match_substring_regex(uris, _URI), False))
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        value = uris[i].as_py()
        shown = "empty" if not value else f"{value!r} is not absolute (a path from / or a URI)"
        raise DataError(f"manifest {name}, row {offset + i + 1}: image_uri {shown}")
    found = pc.unique(pc.utf8_lower(pc.extract_regex(uris, _SCHEME_PART).field("scheme")))
    unknown = {s for s in found.to_pylist() if s} - {"s3", "file", *schemes}
    if unknown:
        scheme = sorted(unknown)[0]
        i = pc.index(pc.starts_with(pc.utf8_lower(uris), f"{scheme}://"), True).as_py()
        check_schemes({scheme}, schemes, f"manifest {name}, row {offset + i + 1},")
    uris = _one_spelling(uris)
    n = chunk.num_rows
    if "image_version" in chunk.column_names:
        versions = pc.fill_null(chunk["image_version"].cast(pa.string()), "")
    else:
        versions = pa.array([""] * n, pa.string())
    if "image_bytes" in chunk.column_names:
        sizes = pc.fill_null(chunk["image_bytes"].cast(pa.int64()), -1)
    else:
        sizes = pa.array(np.full(n, -1, np.int64))  # unknown: the read fills it in
    return pa.table(
        [uris, versions, sizes, pa.nulls(n, pa.string())], schema=LISTING_SCHEMA
    ).combine_chunks()
