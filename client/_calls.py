"""Every registry call as a value: method, path, body, and how to read the answer.

The sync and async clients share these, so a call is described once and only the
I/O differs. Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from modelhash.errors import (
    ConflictError,
    ForbiddenError,
    InputError,
    NotFoundError,
    RegistryHTTPError,
    RegistryResponseError,
    RejectedError,
    UnauthorizedError,
)
from modelhash.fingerprint import FileHashes, ModelFingerprint
from modelhash.wire import (
    MAX_CHECK_ITEMS,
    BaseCreate,
    BasePublic,
    ChangesPage,
    CheckItem,
    CheckResponse,
    CheckResult,
    FlagCreate,
    FlagDetail,
    KeyCreate,
    KeyCreated,
    KeyPublic,
    LookupResult,
    PublicKey,
    RangeResult,
    ReasonBody,
    SignedExport,
    encode_sketch,
)

__all__ = [
    "Call",
    "Checkable",
    "batches",
    "check_batches",
    "check_items",
    "decode",
    "with_sketch",
]

T = TypeVar("T")

#: What ``check`` accepts for one model: a fingerprint, one file's hashes, a flat
#: ``summary()``-style map, or a ready :class:`~modelhash.wire.CheckItem`.
Checkable = ModelFingerprint | FileHashes | Mapping[str, str | None] | CheckItem

_ITEM_FIELDS = frozenset(CheckItem.model_fields) | {"content-blake3-v1"}
_ERRORS: dict[int, type[RegistryHTTPError]] = {
    400: RejectedError,
    401: UnauthorizedError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    413: RejectedError,
    422: RejectedError,
}


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and the parser of its JSON answer."""

    method: str
    path: str
    parse: Callable[[Any], T]
    body: Any = None
    params: Mapping[str, str | int] | None = None
    idempotent: bool = True
    raw: bool = False
    """``parse`` gets the whole response (headers, non-JSON bodies), not its JSON."""


def _model(model: type[BaseModel]) -> Callable[[Any], Any]:
    return model.model_validate


def _list(model: type[Any]) -> Callable[[Any], Any]:
    adapter = TypeAdapter(list[model])  # type: ignore[valid-type]
    return adapter.validate_python


def _seg(value: str) -> str:
    return quote(value, safe="")


def file_map(f: FileHashes) -> dict[str, str]:
    """The flat map of one file's hashes, strong ones first."""
    out = {"sha256": f.sha256, "blake3": f.blake3, "crc32": f.crc32, "autov2": f.autov2}
    if f.autov1 is not None:
        out["autov1"] = f.autov1
    if f.autov3 is not None:
        out["autov3"] = f.autov3
    return out


def with_sketch(fp: ModelFingerprint) -> dict[str, str]:
    """``fp.summary()``, plus ``sketch`` (its wire form) when ``fp`` has a sketch layer."""
    out = fp.summary()
    if fp.sketch is not None and fp.sketch.kind in ("model", "lora") and len(fp.sketch):
        out["sketch"] = encode_sketch(fp.sketch)
    return out


def check_item(value: Checkable, index: int = 0) -> CheckItem:
    """One :class:`CheckItem`; raises InputError when it has no strong hash or a bad value.

    Keys the wire format does not know (a newer fingerprint layer) are dropped, so
    they can never turn a check into a refused request.
    """
    if isinstance(value, CheckItem):
        return value
    if isinstance(value, ModelFingerprint):
        raw: Mapping[str, str | None] = with_sketch(value)
    elif isinstance(value, FileHashes):
        raw = file_map(value)
    else:
        raw = value
    data = {k: v for k, v in raw.items() if k in _ITEM_FIELDS and v is not None}
    try:
        return CheckItem.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        reason = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        raise InputError(
            f"fingerprint {index}{' ' + where if where else ''}: {reason}"
        ) from None


def check_items(values: Iterable[Checkable]) -> list[CheckItem]:
    """Validate every fingerprint before anything is sent."""
    return [check_item(v, i) for i, v in enumerate(values)]


def batches(items: Sequence[T], size: int = MAX_CHECK_ITEMS) -> list[Sequence[T]]:
    """``items`` cut into runs of at most ``size``, in order."""
    return [items[i : i + size] for i in range(0, len(items), size)]


#: The most sketch text one check request carries, under the registry's default
#: 4 MiB body limit; items past it go in the next request.
MAX_CHECK_SKETCH_CHARS = 3 * 1024 * 1024


def check_batches(items: Sequence[CheckItem]) -> list[Sequence[CheckItem]]:
    """``items`` cut into requests of at most ``MAX_CHECK_ITEMS`` items and, when they
    carry sketches, about :data:`MAX_CHECK_SKETCH_CHARS` of sketch text, in order."""
    out: list[Sequence[CheckItem]] = []
    start = chars = 0
    for i, item in enumerate(items):
        size = len(item.sketch or "")
        if i > start and (i - start >= MAX_CHECK_ITEMS or chars + size > MAX_CHECK_SKETCH_CHARS):
            out.append(items[start:i])
            start, chars = i, 0
        chars += size
    if start < len(items):
        out.append(items[start:])
    return out


def check(items: Sequence[CheckItem]) -> Call[list[CheckResult]]:
    """POST /v1/check for one batch; answers are checked to be one per item, in order."""

    def parse(data: Any) -> list[CheckResult]:
        results = CheckResponse.model_validate(data).results
        if [r.index for r in results] != list(range(len(items))):
            raise ValueError(f"expected {len(items)} results in order, got {len(results)}")
        return results

    body = {"items": [i.model_dump(exclude_none=True, by_alias=False) for i in items]}
    return Call("POST", "/v1/check", parse, body=body)


def lookup(algorithm: str, value: str) -> Call[LookupResult]:
    return Call("GET", f"/v1/hashes/{_seg(algorithm)}/{_seg(value)}", _model(LookupResult))


def range_query(algorithm: str, prefix: str) -> Call[RangeResult]:
    return Call("GET", f"/v1/range/{_seg(algorithm)}/{_seg(prefix)}", _model(RangeResult))


def create_flag(body: FlagCreate) -> Call[FlagDetail]:
    # The registry de-duplicates submissions of a flagged model, so a retry is safe.
    return Call("POST", "/v1/flags", _model(FlagDetail), body=body.model_dump(mode="json"))


def get_flag(flag_id: str) -> Call[FlagDetail]:
    return Call("GET", f"/v1/flags/{_seg(flag_id)}", _model(FlagDetail))


def list_flags(status: str | None, limit: int, offset: int) -> Call[list[FlagDetail]]:
    params: dict[str, str | int] = {"limit": limit, "offset": offset}
    if status is not None:
        params["status"] = status
    return Call("GET", "/v1/flags", _list(FlagDetail), params=params)


def flag_action(flag_id: str, action: str, reason: str) -> Call[FlagDetail]:
    body = ReasonBody(reason=reason).model_dump()
    # A repeated revoke answers 409, so status changes are not retried once sent.
    return Call(
        "POST",
        f"/v1/flags/{_seg(flag_id)}/{action}",
        _model(FlagDetail),
        body=body,
        idempotent=False,
    )


def add_base(body: BaseCreate) -> Call[BasePublic]:
    return Call(
        "POST", "/v1/bases", _model(BasePublic), body=body.model_dump(mode="json"),
        idempotent=False,
    )


def list_bases() -> Call[list[BasePublic]]:
    return Call("GET", "/v1/bases", _list(BasePublic))


def create_key(role: str, name: str | None) -> Call[KeyCreated]:
    body = KeyCreate.model_validate({"role": role, "name": name}).model_dump()
    return Call("POST", "/v1/keys", _model(KeyCreated), body=body, idempotent=False)


def list_keys() -> Call[list[KeyPublic]]:
    return Call("GET", "/v1/keys", _list(KeyPublic))


def revoke_key(key_id: int) -> Call[KeyPublic]:
    return Call("DELETE", f"/v1/keys/{int(key_id)}", _model(KeyPublic))


def changes(since: int, limit: int) -> Call[ChangesPage]:
    return Call("GET", "/v1/changes", _model(ChangesPage), params={"since": since, "limit": limit})


def export() -> Call[SignedExport]:
    return Call("GET", "/v1/export", _model(SignedExport))


def public_key() -> Call[PublicKey]:
    return Call("GET", "/v1/export/public-key", _model(PublicKey))


def health() -> Call[dict[str, Any]]:
    def parse(data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data

    return Call("GET", "/readyz", parse)


def _detail(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        text = response.text.strip().splitlines()
        return (text[0][:200] if text else response.reason_phrase) or "error"
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, str):
        return detail.splitlines()[0][:300] if detail else response.reason_phrase
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return f"{where + ': ' if where else ''}{first.get('msg', 'invalid')}"[:300]
    return response.reason_phrase or "error"


def decode(call: Call[T], response: httpx.Response) -> T:
    """Turn an answer into the call's result, or raise the matching RegistryError."""
    url = str(response.request.url.copy_with(query=None))
    status = response.status_code
    if status >= 400:
        cls = _ERRORS.get(status, RegistryHTTPError)
        raise cls(call.method, url, status, _detail(response))
    if not 200 <= status < 300:
        raise RegistryResponseError(call.method, url, f"unexpected status {status}", status)
    if call.raw:
        try:
            return call.parse(response)
        except (ValidationError, ValueError, TypeError) as exc:
            reason = str(exc).splitlines()[0][:200]
            raise RegistryResponseError(call.method, url, reason, status) from None
    try:
        data = response.json()
    except ValueError:
        raise RegistryResponseError(call.method, url, "the body is not JSON", status) from None
    try:
        return call.parse(data)
    except (ValidationError, ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:200]
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            reason = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        raise RegistryResponseError(call.method, url, reason, status) from None
