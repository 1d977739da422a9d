"""The search service: clip-retrieval's back-end API (`POST /knn-service`, `POST /metadata`, `GET /indices-list`)
so that `clip_retrieval.clip_client.ClipClient` works unchanged, plus `GET /image/<indice>/<id>` (the stored
image from our shards), `GET /indices-status`, `POST /export` (an img2dataset-ready parquet) and the page at `/`.
`aesthetic_score` / `aesthetic_weight` and `use_violence_detector` act as clip-retrieval's back end makes them act,
on the indices whose embedding model their files belong to (`extras.py`); elsewhere they are ignored, and
/indices-status says so.

aiohttp (already the download stage's HTTP library): one event loop serves many concurrent clients, the request
body limit is the server's own (`client_max_size`), and CLIP and slow faiss searches run in worker threads (both
release the GIL), so a slow query never blocks the others. A search that takes less than the hop to a thread and
back (`ServeSettings.inline_search_ms`, judged by the index's recent searches: a small IVF probe at 1M vectors takes
about 0.5 ms) runs on the event loop: at hundreds of queries/s that hop cost more CPU than the search. Every bad
request gets a 4xx with a JSON `{"error": ...}`; nothing returns a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import logging
import os
import tarfile
import time
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from aiohttp import web
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    FailFast,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

from laion_assets.core.index import metadata as meta
from laion_assets.core.index.search import Hit, OpenIndex, RowFilter, search
from laion_assets.core.settings import FetchSettings, ServeSettings
from laion_assets.serve.encoder import BadQuery, QueryEncoder
from laion_assets.serve.extras import SearchExtras, load_extras
from laion_assets.serve.indices import Indices, load_indices

LOG = logging.getLogger(__name__)
INDICES = web.AppKey("indices", Indices)
SETTINGS = web.AppKey("settings", ServeSettings)
ENCODER = web.AppKey("encoder", QueryEncoder)
ROOT = web.AppKey("root", str)
FETCHER = web.AppKey("fetcher", object)
SEARCH_MS = web.AppKey("search_ms", dict)  # CPU ms of recent searches
EXTRAS = web.AppKey("extras", SearchExtras)
INLINE_RESULTS = 100
IMAGE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
# What an exported subset holds: img2dataset reads URL and TEXT; the rest are LAION's columns.
EXPORT_COLUMNS = {"URL": "URL", "TEXT": "caption", "WIDTH": "WIDTH", "HEIGHT": "HEIGHT", "similarity": "similarity",
                  "punsafe": "punsafe", "pwatermark": "pwatermark", "LANGUAGE": "LANGUAGE", "key": "key",
                  "shard": "shard", "aesthetic": "aesthetic"}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _json_response(doc: Any, status: int = 200) -> web.Response:
    # orjson: the API's JSON both ways is a large share of a query's time at hundreds of queries per second
    return web.Response(body=orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), status=status,
                        content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json_response({"error": message}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure as JSON with a message: 4xx for the client's mistakes, a bare 500 (logged here) for ours."""
    try:
        return await handler(request)
    except (BadRequest, BadQuery) as err:
        return _error(getattr(err, "status", 400), str(err))
    except web.HTTPException as err:
        if err.status < 400:
            raise
        return _error(err.status, err.reason if err.status != 413 else
                      f"request body over the limit of {request.app[SETTINGS].max_body_bytes} bytes")
    except Exception:
        LOG.exception("internal error on %s %s", request.method, request.path)
        return _error(500, "internal error (logged by the service)")


# --- validation ---------------------------------------------------------------------------------------------------
# A body is parsed by orjson (faster here than pydantic's model_validate_json, and the indice is looked up in the
# dict before the fields are checked, so a wrong indice is reported before any other fault), then checked by the
# pydantic model of its route; _message words a failure as the API always has.

async def _json(request: web.Request) -> dict[str, Any]:
    body = await request.read()  # ClipClient posts JSON without a content type: read the body as it comes
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise BadRequest(f"the body is not JSON: {err}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    return doc


def _blank_is_null(value: Any) -> Any:
    return None if value == "" else value


def _within(lo: int, hi: int | str) -> WrapValidator:
    """lo <= value <= hi, worded with both ends as the API always has (pydantic's ge and le each name one); a str hi
    names a ServeSettings field, read from the validation context (the settings)."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        valid = handler(value)  # the type first: "10" must read "must be an integer", not "between"
        top = getattr(info.context, hi) if isinstance(hi, str) else hi
        if not lo <= valid <= top:
            raise ValueError(f"{info.field_name} must be between {lo} and {top}, not {value}")  # the input: 3, not 3.0
        return valid

    return WrapValidator(check)


Pixels = Annotated[int, _within(0, 1 << 30)]
Results = Annotated[int, _within(1, "max_results")]  # ServeSettings.max_results, the validation context
# A number in 0..1, or unset: null or "" (clip-front sends "" for a number left unset).
Fraction = Annotated[Annotated[float, Field(allow_inf_nan=False), _within(0, 1)] | None,
                     BeforeValidator(_blank_is_null)]
# An aesthetic score in 0..10 (LAION-Aesthetics V2's range), or unset.
Aesthetic = Annotated[Annotated[float, Field(allow_inf_nan=False), _within(0, 10)] | None,
                      BeforeValidator(_blank_is_null)]


class _Body(BaseModel):
    """A request body. Strict: JSON's types as they are ("10" is not a number, true is not 1); fields the service
    does not know are ignored, as clip-retrieval's back end ignores them."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, doc: Any) -> Any:
        # null means the field's default (the page sends null for a number it cannot parse); modality alone has
        # always refused null
        if isinstance(doc, dict):
            return {k: v for k, v in doc.items() if v is not None or k == "modality"}
        return doc


class RowFilterBody(_Body):
    """Our filters beyond clip-retrieval's (the page sends them; ClipClient does not)."""

    max_punsafe: Fraction = None
    max_pwatermark: Fraction = None
    language: str | None = None
    min_width: Pixels = 0
    min_height: Pixels = 0
    min_aesthetic: Aesthetic = None

    def row_filter(self) -> RowFilter:
        return RowFilter(max_punsafe=self.max_punsafe, max_pwatermark=self.max_pwatermark,
                         language=self.language or "", min_width=self.min_width, min_height=self.min_height,
                         min_aesthetic=self.min_aesthetic)


class KnnBody(RowFilterBody):
    """A /knn-service body: clip-retrieval's fields (ClipClient sends them all) and our row filter; indice_name is
    _indice's. Several faults: the first in field order is the one reported, a field's type before the query checks
    of _query_vector."""

    modality: Literal["image", "text"] = "image"
    num_images: Results = 40
    num_result_ids: Results | None = None  # None: num_images
    deduplicate: bool = False
    use_safety_model: bool = False
    # Checked, then ignored (docs/search.md): one CLIP reads every language.
    use_mclip: bool = False
    # Applied where the index's embedding model is the files' (extras.py), else ignored (/indices-status).
    use_violence_detector: bool = False
    aesthetic_score: Annotated[Annotated[int, Field(ge=0, le=9)] | None, BeforeValidator(_blank_is_null)] = None
    aesthetic_weight: Fraction = None
    text: str | None = None
    image: str | None = None  # base64
    image_url: str | None = None
    # FailFast: a 20 MB body of [true, true, ...] is one error, not millions of them. "" is unset, as for text.
    embedding_input: Annotated[list[float] | None, FailFast(), BeforeValidator(_blank_is_null)] = None


class MetadataBody(_Body):
    ids: Annotated[list[int], FailFast()]


class ExportBody(_Body):
    """The rows to export: ids (the current results), or, without them, every row passing a filter (checked by the
    handler, so that a filter beside ids stays ignored)."""

    ids: Annotated[list[int] | None, FailFast()] = None


# pydantic's messages ("Input should be a valid integer") name no field and differ from the API's since its start:
# _message words the first error as the API always has. Fields that read one way whatever failed inside them:
_FIELD_MESSAGES = {"modality": "modality must be image or text, not {!r}",
                   "aesthetic_score": "aesthetic_score must be an integer 0..9, not {!r}",
                   "embedding_input": "embedding_input must be a list of numbers",
                   "ids": "ids must be a list of integers"}
# The rest by pydantic's error type: "<field> must be <words>, not <value>".
_TYPE_WORDS = {"int_type": "an integer", "bool_type": "true or false", "float_type": "a number",
               "finite_number": "a number"}


def _message(err: ValidationError) -> str:
    """The first error of a body's validation as the API words it (pydantic lists them in field order)."""
    first = err.errors(include_url=False)[0]
    name, value, kind = str(first["loc"][0]) if first["loc"] else "body", first["input"], first["type"]
    if name in _FIELD_MESSAGES:
        return _FIELD_MESSAGES[name].format(value)[:200]
    if kind == "value_error":  # ours (_within), already worded
        return str(first["ctx"]["error"])
    if kind == "string_type":
        return f"{name} must be a string, not {type(value).__name__}"
    if kind in _TYPE_WORDS:
        return f"{name} must be {_TYPE_WORDS[kind]}, not {value!r}"[:200]
    return f"{name}: {first['msg']}"[:200]  # none known to reach here; still the field and pydantic's words


B = TypeVar("B", bound=_Body)


def _valid(model: type[B], doc: dict[str, Any], settings: ServeSettings | None = None) -> B:
    try:
        return model.model_validate(doc, context=settings)
    except ValidationError as err:
        raise BadRequest(_message(err)) from None


def _indice(request: web.Request, doc: dict[str, Any]) -> OpenIndex:
    indices = request.app[INDICES]
    name = doc.get("indice_name")
    if name is None and len(indices.available) == 1:
        name = next(iter(indices.available))
    if not isinstance(name, str):
        raise BadRequest(f"indice_name must be one of {sorted(indices.available)}")
    if name in indices.unavailable:
        raise BadRequest(f"indice {name!r} is unavailable: {indices.unavailable[name]}", 503)
    if name not in indices.available:
        raise BadRequest(f"unknown indice {name!r}: one of {sorted(indices.available)}", 404)
    return indices.available[name]


# --- queries ------------------------------------------------------------------------------------------------------

async def _fetch_image(request: web.Request, url: str) -> bytes:
    """An image_url's bytes, through the download stage's guard (no private or loopback addresses unless allowed,
    a byte cap, a deadline)."""
    fetcher: Any = request.app[FETCHER]
    result = await fetcher.fetch(url)
    if result.status != "success":
        raise BadRequest(f"cannot fetch image_url: {result.error}")
    return result.body


async def _query_vector(request: web.Request, body: KnnBody, index: OpenIndex) -> np.ndarray:
    text, image, image_url, embedding = body.text, body.image, body.image_url, body.embedding_input
    given = [n for n, v in (("text", text), ("image", image), ("image_url", image_url),
                            ("embedding_input", embedding)) if v not in (None, "")]
    if not given:
        raise BadRequest("empty query: give one of text, image (base64), image_url or embedding_input")
    if len(given) > 1:
        raise BadRequest(f"give one query, not {', '.join(given)}")
    encoder = request.app[ENCODER]
    if text is not None and text.strip():
        return await asyncio.to_thread(encoder.text, text)
    if text is not None:
        raise BadRequest("empty query: the text is blank")
    if image:
        try:
            data = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("image must be base64") from None
        return await asyncio.to_thread(encoder.image, data)
    if image_url:
        data = await _fetch_image(request, image_url)
        return await asyncio.to_thread(encoder.image, data)
    assert embedding is not None  # given, and a list of numbers (KnnBody)
    if len(embedding) != index.dim:
        raise BadRequest(f"embedding_input has {len(embedding)} dimensions, the index {index.dim}")
    vector = np.asarray(embedding, np.float32)
    if not np.all(np.isfinite(vector)) or not np.any(vector):  # JSON has no inf, but 1e39 is one in float32
        raise BadRequest("embedding_input must be finite and not all zeros")
    return vector


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A metadata row as the API shows it: clip-retrieval's `url` beside our columns, and LAION's image-text
    `similarity` renamed, since clip-retrieval's `similarity` is the query's."""
    out = {"url": row.get("URL"), **row}
    if "similarity" in out:
        out["image_text_similarity"] = out.pop("similarity")
    return out


def _result(hit: Hit) -> dict[str, Any]:
    return {"id": hit.id, "similarity": hit.similarity, **_public(hit.row)}


async def knn_service(request: web.Request) -> web.Response:
    doc = await _json(request)
    index = _indice(request, doc)
    s = request.app[SETTINGS]
    body = _valid(KnnBody, doc, s)
    modality, num_images, deduplicate = body.modality, body.num_images, body.deduplicate
    num_result_ids = num_images if body.num_result_ids is None else body.num_result_ids
    where = body.row_filter()
    if body.use_safety_model and where.max_punsafe is None:
        where = dataclasses.replace(where, max_punsafe=s.safety_threshold)
    _check_filter(index, where)
    extras = request.app[EXTRAS]
    query = extras.query(await _query_vector(request, body, index), index, body.aesthetic_score,
                         body.aesthetic_weight)
    violence = extras.violence_prompts(index, body.use_violence_detector)
    args = (index, query, modality, num_result_ids, num_images, index.removed, deduplicate, s.dedup_threshold, where,
            None, violence)
    recent: dict[tuple[str, str], float] = request.app[SEARCH_MS]
    key = (index.name, modality)
    if (recent.get(key, 0.0) < s.inline_search_ms and not deduplicate and num_result_ids <= INLINE_RESULTS
            and not index.on_disk and violence is None):
        hits, ms = _timed_search(*args)  # cheaper than the hop to a thread and back (see ServeSettings)
    else:
        hits, ms = await asyncio.to_thread(_timed_search, *args)
    if not deduplicate and num_result_ids <= INLINE_RESULTS:  # the average of the queries that may run inline
        recent[key] = ms if key not in recent else 0.9 * recent[key] + 0.1 * ms
    return _json_response([_result(h) for h in hits])


def _timed_search(*args: Any) -> tuple[list[Hit], float]:
    """The hits and the search's CPU ms (this thread's: waits for a core or the GIL under load are not the
    search's cost)."""
    start = time.thread_time()
    hits = search(*args)
    return hits, (time.thread_time() - start) * 1000


async def metadata(request: web.Request) -> web.Response:
    doc = await _json(request)
    ids = _valid(MetadataBody, doc).ids
    if not ids:
        return _json_response([])
    index = _indice(request, doc)
    if len(ids) > request.app[SETTINGS].max_results:
        raise BadRequest(f"at most {request.app[SETTINGS].max_results} ids per request")
    bad = [i for i in ids if not 0 <= i < index.metadata.num_rows]
    if bad:
        raise BadRequest(f"ids out of range 0..{index.metadata.num_rows - 1}: {bad[:5]}")
    rows = index.rows.rows(ids)
    out = [{"id": i, "metadata": _public(r)} for i, r in zip(ids, rows, strict=True) if i not in index.removed]
    return _json_response(out)


async def indices_list(request: web.Request) -> web.Response:
    return _json_response(sorted(request.app[INDICES].available))


def _check_filter(index: OpenIndex, where: RowFilter) -> None:
    if where.min_aesthetic is not None and "aesthetic" not in index.metadata.column_names:
        raise BadRequest(f"indice {index.name!r} has no aesthetic scores: min_aesthetic cannot filter it")


async def indices_status(request: web.Request) -> web.Response:
    status = request.app[INDICES].status()
    extras = request.app[EXTRAS]
    for name, index in request.app[INDICES].available.items():
        status[name]["model"] = index.report.get("model", "")
        status[name]["aesthetic_scores"] = "aesthetic" in index.metadata.column_names
        status[name].update(extras.verdict(index))
    return _json_response(status)


def _read_image(root: str, tar_key: str, key: str) -> tuple[bytes, str]:
    path = os.path.join(root, tar_key)
    if tar_key.startswith("/") or ".." in tar_key.split("/") or not os.path.exists(path):
        raise BadRequest(f"the shard of {key} is not in the storage root", 404)
    with tarfile.open(path) as tar:
        for ext, kind in IMAGE_TYPES.items():
            try:
                member = tar.getmember(f"{key}.{ext}")
            except KeyError:
                continue
            f = tar.extractfile(member)
            if f is not None:
                return f.read(), kind
    raise BadRequest(f"no image of {key} in its shard", 404)


async def image(request: web.Request) -> web.Response:
    """The stored image of a result, by its id (the index row): keys repeat across buckets and crawls."""
    index = _indice(request, {"indice_name": request.match_info["indice"]})
    text = request.match_info["id"]
    row = int(text) if text.isdigit() and len(text) < 19 else -1
    if not 0 <= row < index.metadata.num_rows or row in index.removed:
        raise BadRequest(f"no id {text!r} in indice {index.name!r}", 404)
    key = index.metadata["key"][row].as_py()
    tar_key = index.metadata["tar"][row].as_py() if "tar" in index.metadata.column_names else None
    if not tar_key:
        raise BadRequest(f"the index does not record the shard of {key}", 404)
    body, kind = await asyncio.to_thread(_read_image, request.app[ROOT], tar_key, key)
    return web.Response(body=body, content_type=kind, headers={"Cache-Control": "max-age=86400"})


# --- subset export ------------------------------------------------------------------------------------------------

def _filter_mask(batch: pa.RecordBatch, f: RowFilter) -> pa.Array:
    """RowFilter.passes, vectorized over a batch."""
    mask = pc.greater_equal(pc.fill_null(batch["WIDTH"], 0), f.min_width)
    mask = pc.and_kleene(mask, pc.greater_equal(pc.fill_null(batch["HEIGHT"], 0), f.min_height))
    if f.max_punsafe is not None:
        mask = pc.and_kleene(mask, pc.less_equal(pc.fill_null(batch["punsafe"], 0.0), f.max_punsafe))
    if f.max_pwatermark is not None:
        mask = pc.and_kleene(mask, pc.less_equal(pc.fill_null(batch["pwatermark"], 0.0), f.max_pwatermark))
    if f.language:
        mask = pc.and_kleene(mask, pc.equal(batch["LANGUAGE"], f.language))
    if f.min_aesthetic is not None:
        mask = pc.and_kleene(mask, pc.greater_equal(batch["aesthetic"], f.min_aesthetic))  # null: fails
    return pc.fill_null(mask, False)


def export_table(index: OpenIndex, ids: list[int] | None, f: RowFilter | None, limit: int) -> pa.Table:
    """The rows of ids, or every row passing the filter (batch by batch over the memory-mapped metadata), minus
    removed rows, in img2dataset's columns."""
    if ids is not None:
        table = index.metadata.take(pa.array([i for i in ids if i not in index.removed], pa.int64()))
    else:
        removed = pa.array(sorted(index.removed), pa.int64())
        parts, rows, start = [], 0, 0
        for batch in index.metadata.to_batches(meta.BATCH_ROWS):
            mask = _filter_mask(batch, f or RowFilter())
            if len(removed):
                positions = pa.array(range(start, start + batch.num_rows), pa.int64())
                mask = pc.and_(mask, pc.invert(pc.is_in(positions, removed)))
            start += batch.num_rows
            kept = batch.filter(mask)
            parts.append(kept)
            rows += kept.num_rows
            if rows > limit:
                raise BadRequest(f"the filter matches more than {limit} rows: narrow it", 413)
        table = pa.Table.from_batches(parts, schema=index.metadata.schema)
    return pa.table({out: table[col] for out, col in EXPORT_COLUMNS.items() if col in table.column_names})


async def export(request: web.Request) -> web.Response:
    import pyarrow.parquet as pq

    doc = await _json(request)
    index = _indice(request, doc)
    s = request.app[SETTINGS]
    ids, flt = _valid(ExportBody, doc).ids, None
    if ids is not None:
        if len(ids) > s.export_limit or any(not 0 <= i < index.metadata.num_rows for i in ids):
            raise BadRequest(f"ids must be at most {s.export_limit} row numbers of the index")
    else:
        raw = doc.get("filter")
        if not isinstance(raw, dict):
            raise BadRequest("give ids (the current results) or a filter object")
        flt = _valid(RowFilterBody, raw).row_filter()
        _check_filter(index, flt)
    table = await asyncio.to_thread(export_table, index, ids, flt, s.export_limit)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    name = f"{index.name}-subset-{table.num_rows}.parquet"
    return web.Response(body=buf.getvalue(), content_type="application/vnd.apache.parquet",
                        headers={"Content-Disposition": f'attachment; filename="{name}"',
                                 "X-Rows": str(table.num_rows)})


async def page(request: web.Request) -> web.Response:
    from laion_assets.serve.page import PAGE

    return web.Response(text=PAGE, content_type="text/html")


async def _fetcher(app: web.Application) -> Any:
    """One guarded fetcher for image_url queries, for the service's lifetime."""
    from laion_assets.core.download.fetch import Fetcher

    s = app[SETTINGS]
    # An explicit user request, not crawling: robots.txt and TDMRep do not apply; the address guard, the byte cap
    # and the deadline do.
    settings = FetchSettings(max_bytes=s.image_fetch_bytes, deadline_s=s.image_fetch_deadline_s, retries=0,
                             connect_timeout_s=min(10.0, s.image_fetch_deadline_s), allow_networks=s.allow_networks,
                             respect_robots_txt=False, respect_tdmrep=False, respect_x_robots_tag=False)
    async with Fetcher(settings) as fetcher:
        app[FETCHER] = fetcher
        yield


def make_app(root: str, settings: ServeSettings, encoder: QueryEncoder, indices: Indices | None = None,
             extras: SearchExtras | None = None) -> web.Application:
    """The service over a local storage root's indices (loaded here unless given), with the encoder's model
    settings' rating embeddings and violence prompts (loaded here unless given)."""
    app = web.Application(middlewares=[errors], client_max_size=settings.max_body_bytes)
    app[ROOT] = os.path.abspath(root)
    app[SETTINGS] = settings
    app[ENCODER] = encoder
    app[INDICES] = indices if indices is not None else load_indices(app[ROOT])
    app[SEARCH_MS] = {}  # moving average of search CPU ms per (indice, modality)
    app[EXTRAS] = extras if extras is not None else load_extras(encoder.settings)
    app.cleanup_ctx.append(_fetcher)
    app.router.add_get("/", page)
    app.router.add_post("/knn-service", knn_service)
    app.router.add_post("/metadata", metadata)
    app.router.add_get("/indices-list", indices_list)
    app.router.add_get("/indices-status", indices_status)
    app.router.add_get("/image/{indice}/{id}", image)
    app.router.add_post("/export", export)
    return app


def serve(root: str, settings: ServeSettings, encoder: QueryEncoder, print_fn: Any = print) -> None:
    """Run the service until interrupted. faiss searches one query per thread: requests run in parallel worker
    threads, and OpenMP inside each query would only make them fight over the cores."""
    import faiss

    faiss.omp_set_num_threads(1)
    app = make_app(root, settings, encoder)
    status = app[INDICES].status()
    for name, st in status.items():
        print_fn(f"indice {name}: " + (f"{st['rows']} rows" if st["available"] else f"unavailable ({st['reason']})"))
    for name, index in app[INDICES].available.items():
        for feature, verdict in app[EXTRAS].verdict(index).items():
            if not verdict["applied"]:
                print_fn(f"indice {name}: {feature} ignored ({verdict['reason']})")
    web.run_app(app, host=settings.host, port=settings.port, print=print_fn, access_log=None)
