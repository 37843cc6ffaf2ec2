"""The registry's wire format: request and response bodies shared by client and server.

Pydantic models only, with no server imports, so a platform that installs the client
alone can build requests and parse answers. Field names here are a promise to
scripts; add fields, never rename them.

Matching safety lives here too, because mirrors must apply the same rule as the
server: only :data:`STRONG_ALGORITHMS` (full 256-bit hashes) can make a check match.
The model-site hashes in :data:`WEAK_ALGORITHMS` are 32 to 48-bit truncations that
collide by chance across millions of uploads; they are kept so that a researcher can
look up a pasted Civitai AutoV2, and nothing more.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from modelhash.errors import InvalidHashError
from modelhash.fingerprint._digest import CONTENT_ALGORITHM, Digest, parse_hash_as
from modelhash.fingerprint._sketch import MAGIC as _SKETCH_MAGIC
from modelhash.fingerprint._sketch import SKETCH_ALGORITHM, Sketch

__all__ = [
    "CATEGORIES",
    "MAX_CHECK_ITEMS",
    "MAX_IMPORT_ROWS",
    "MAX_IMPORT_TEXT",
    "MAX_SKETCHED_TENSORS_PER_REQUEST",
    "MAX_SKETCH_BYTES",
    "MAX_SKETCH_DECODED",
    "MAX_SKETCH_TENSORS",
    "ROLES",
    "SEVERITIES",
    "STRONG_ALGORITHMS",
    "WEAK_ALGORITHMS",
    "WIRE_KEYS",
    "AuditRecord",
    "BaseCreate",
    "BasePublic",
    "Category",
    "ChangeEvent",
    "ChangesPage",
    "CheckItem",
    "CheckRequest",
    "CheckResponse",
    "CheckResult",
    "FlagCreate",
    "FlagDetail",
    "FlagPage",
    "FlagStatus",
    "ImportRequest",
    "ImportResult",
    "ImportRow",
    "KeyCreate",
    "KeyCreated",
    "KeyPublic",
    "LookupFlag",
    "LookupResult",
    "Match",
    "MatchEvidence",
    "Opinion",
    "PublicKey",
    "RangeResult",
    "ReasonBody",
    "ReportCreate",
    "ReportKind",
    "ReportPublic",
    "Role",
    "Severity",
    "SignedExport",
    "Strength",
    "decode_sketch",
    "digests_from_map",
    "encode_sketch",
    "sketch_tensor_count",
]

#: Full-length hashes: a chance collision is out of reach, so an equal value means
#: the same bytes (file layer) or the same tensors (content layer).
STRONG_ALGORITHMS: frozenset[str] = frozenset({"sha256", "blake3", CONTENT_ALGORITHM})
#: Truncated model-site hashes: stored for lookup and range queries, never matched.
WEAK_ALGORITHMS: frozenset[str] = frozenset({"crc32", "autov1", "autov2", "autov3"})

#: Keys of the flat fingerprint map (``ModelFingerprint.summary()``) and the
#: algorithm each stands for.
WIRE_KEYS: dict[str, str] = {
    "content": CONTENT_ALGORITHM,
    "sha256": "sha256",
    "blake3": "blake3",
    "crc32": "crc32",
    "autov1": "autov1",
    "autov2": "autov2",
    "autov3": "autov3",
}

MAX_CHECK_ITEMS = 1000
#: The largest sketch accepted, as stored bytes (after base64 decoding).
MAX_SKETCH_BYTES = 8 * 1024 * 1024
#: The largest sketch body accepted once decompressed (a zip bomb stops here).
MAX_SKETCH_DECODED = 32 * 1024 * 1024
_SKETCH_B64_MAX = 4 * ((MAX_SKETCH_BYTES + 2) // 3)
#: The most tensors one sketch may hold. A tensor takes 526 stored bytes or more
#: (its K x K float16 values dominate), and real weights barely compress, so no
#: genuine sketch within :data:`MAX_SKETCH_BYTES` holds more; only a crafted one of
#: tiny, compressible tensors would, and decoded each costs about 2.4 KB of memory.
MAX_SKETCH_TENSORS = 16_384
#: The most sketch tensors one check request may carry over all its items. Items
#: are decoded one at a time, so memory stays bounded by one sketch; this bounds
#: the work of one request.
MAX_SKETCHED_TENSORS_PER_REQUEST = 2 * MAX_SKETCH_TENSORS

Category = Literal["csam", "ncii", "real-person-likeness", "other"]
#: ``csam``: made or tuned to produce child sexual abuse imagery.
#: ``ncii``: made to produce non-consensual intimate imagery of real people.
#: ``real-person-likeness``: reproduces an identifiable real person without consent.
#: ``other``: anything else a hotline decided to flag; say why in the note.
CATEGORIES: tuple[str, ...] = ("csam", "ncii", "real-person-likeness", "other")
Severity = Literal["low", "medium", "high", "critical"]
SEVERITIES: tuple[str, ...] = ("low", "medium", "high", "critical")
FlagStatus = Literal["active", "disputed", "revoked"]
Role = Literal["reader", "submitter", "admin"]
ROLES: tuple[str, ...] = ("reader", "submitter", "admin")
Strength = Literal["strong", "weak"]
ReportKind = Literal["false-positive", "confirmed-hit"]
#: The largest bulk import body, as text; clients send bigger lists in batches.
MAX_IMPORT_TEXT = 2 * 1024 * 1024
MAX_IMPORT_ROWS = 5000
MatchKind = Literal["exact", "content", "near-duplicate", "derived", "lora", "lora-baked"]

_HEX_MAX = 200


def _no_nul(value: Any) -> Any:
    """Refuse NUL characters and text that is not valid Unicode (lone surrogates)
    anywhere in a value: databases cannot store them, nor can JSON answers carry them."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_nul(k)
            _no_nul(v)
    elif isinstance(value, list):
        for v in value:
            _no_nul(v)
    return value


#: Free text that will be stored.
Text = Annotated[str, AfterValidator(_no_nul)]
#: A JSON object that will be stored.
JsonObject = Annotated[dict[str, Any], AfterValidator(_no_nul)]


def _canonical(algorithm: str, value: str) -> str:
    try:
        return parse_hash_as(algorithm, value).hex
    except InvalidHashError as exc:
        raise ValueError(str(exc)) from None


def digests_from_map(fingerprint: dict[str, str]) -> list[Digest]:
    """Parse an ``algorithm -> hex`` map (wire keys or algorithm names) into digests.

    Raises ``ValueError`` naming the first key or value that is not accepted.
    """
    out: list[Digest] = []
    for key, value in fingerprint.items():
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a hex string")
        name = WIRE_KEYS.get(key.strip().lower(), key)
        try:
            out.append(parse_hash_as(name, value))
        except InvalidHashError as exc:
            raise ValueError(str(exc)) from None
    return out


def _require_strong(digests: list[Digest], what: str) -> None:
    if not any(d.algorithm in STRONG_ALGORITHMS for d in digests):
        raise ValueError(
            f"{what} has no strong hash (sha256, blake3 or content); "
            "the truncated model-site hashes (crc32, autov1-3) never match on their own"
        )


def encode_sketch(sketch: Sketch) -> str:
    """The wire form of a sketch: standard, padded base64 of :meth:`Sketch.to_bytes`."""
    return base64.b64encode(sketch.to_bytes()).decode("ascii")


def _sketch_blob(text: str) -> bytes:
    if len(text) > _SKETCH_B64_MAX:
        raise ValueError(f"sketch: larger than {MAX_SKETCH_BYTES} bytes")
    try:
        blob = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError("sketch: not valid base64 (standard alphabet, padded)") from None
    if len(blob) > MAX_SKETCH_BYTES:
        raise ValueError(f"sketch: larger than {MAX_SKETCH_BYTES} bytes")
    return blob


def _tensor_count(blob: bytes) -> int:
    """The tensor count in a sketch's header, read without inflating the rest."""
    if blob[:4] != _SKETCH_MAGIC or len(blob) < 6:
        raise ValueError("sketch: not a modelhash sketch")
    head = blob[6:6 + 512]
    if blob[5]:
        try:
            head = zlib.decompressobj().decompress(blob[6:6 + 4096], 512)
        except zlib.error:
            raise ValueError("sketch: corrupt compressed body") from None
    if len(head) < 1 or len(head) < 1 + head[0] + 5:
        raise ValueError("sketch: truncated header")
    count = int.from_bytes(head[2 + head[0] : 6 + head[0]], "little")
    if count > MAX_SKETCH_TENSORS:
        raise ValueError(f"sketch: {count} tensors, more than the {MAX_SKETCH_TENSORS} allowed")
    return count


def sketch_tensor_count(text: str) -> int:
    """How many tensors a wire sketch says it holds; ValueError past the budget.

    Cheap: only the header is inflated. :func:`decode_sketch` checks the rest.
    """
    return _tensor_count(_sketch_blob(text))


def decode_sketch(text: str, *, kinds: tuple[str, ...] = ("model", "lora")) -> Sketch:
    """Parse a wire sketch; raise ``ValueError`` saying what is wrong with it.

    Refuses bad base64, more than :data:`MAX_SKETCH_BYTES`, more than
    :data:`MAX_SKETCH_TENSORS` tensors (read from the header before anything is
    decoded), a body that inflates past :data:`MAX_SKETCH_DECODED`, a malformed
    blob, another algorithm, an empty sketch and a kind outside ``kinds``.
    """
    blob = _sketch_blob(text)
    _tensor_count(blob)
    if blob[:4] == _SKETCH_MAGIC and len(blob) >= 6 and blob[5]:
        # Inflate here under a tighter cap than the parser's own.
        d = zlib.decompressobj()
        try:
            body = d.decompress(blob[6:], MAX_SKETCH_DECODED)
        except zlib.error:
            raise ValueError("sketch: corrupt compressed body") from None
        if d.unconsumed_tail or not d.eof:
            raise ValueError(
                f"sketch: truncated, or larger than {MAX_SKETCH_DECODED} bytes decompressed"
            )
        blob = blob[:5] + b"\x00" + body
    try:
        sketch = Sketch.from_bytes(blob)
    except (ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise ValueError(f"sketch: {exc}") from None
    if sketch.algorithm != SKETCH_ALGORITHM:
        raise ValueError(
            f"sketch: algorithm {sketch.algorithm!r} is not supported (expected "
            f"{SKETCH_ALGORITHM!r}); upgrade the client or fingerprint again"
        )
    if sketch.kind not in kinds:
        raise ValueError(f"sketch: kind {sketch.kind!r} is not accepted here ({', '.join(kinds)})")
    if not len(sketch):
        raise ValueError("sketch: it holds no tensors")
    for t in sketch:
        if min(t.shape) < 1 or not np.isfinite(t.values).all():
            raise ValueError(f"sketch: tensor {t.key!r} has an empty shape or non-finite values")
    return sketch


class _SketchCarrier(BaseModel):
    """A request with an optional ``sketch``.

    A submission decodes it once while validating and keeps it. A check item
    (``_sketch_lazy``) only reads the tensor count then; its request checks the
    total against :data:`MAX_SKETCHED_TENSORS_PER_REQUEST` and validates the items
    one at a time, and :meth:`parsed_sketch` decodes afresh on each call, so a
    batch never holds more than one decoded sketch.
    """

    _sketch: Sketch | None = PrivateAttr(default=None)
    _sketch_tensors: int = PrivateAttr(default=0)
    _sketch_kinds: ClassVar[tuple[str, ...]] = ("model", "lora")
    _sketch_lazy: ClassVar[bool] = False

    def parsed_sketch(self) -> Sketch | None:
        """The decoded ``sketch`` (None when none was sent)."""
        if self._sketch is not None:
            return self._sketch
        text = getattr(self, "sketch", None)
        return None if text is None else decode_sketch(text, kinds=self._sketch_kinds)

    def sketch_tensors(self) -> int:
        """How many tensors the sketch holds (0 without one)."""
        return self._sketch_tensors

    @model_validator(mode="after")
    def _decode_sketch(self) -> Any:
        text = getattr(self, "sketch", None)
        if text is not None:
            self._sketch_tensors = sketch_tensor_count(text)
            if not self._sketch_lazy:
                self._sketch = decode_sketch(text, kinds=self._sketch_kinds)
        return self


class _Submission(_SketchCarrier):
    """A flag or base submission: a ``fingerprint`` map with at least one strong hash."""

    @field_validator("fingerprint", check_fields=False)
    @classmethod
    def _valid_fingerprint(cls, value: dict[str, str]) -> dict[str, str]:
        digests = digests_from_map(value)
        _require_strong(digests, "the fingerprint")
        return {d.algorithm: d.hex for d in digests}


class _Wire(BaseModel):
    """Answers: ignore fields a newer server adds."""

    model_config = ConfigDict(extra="ignore")


class CheckItem(_SketchCarrier):
    """One model to check: the flat map ``ModelFingerprint.summary()`` produces.

    At least one strong hash is required. Unknown keys are refused, so a typo cannot
    silently turn into a "clean" answer. ``sketch``, optional, is the similarity
    layer: base64 of ``Sketch.to_bytes()`` of a ``model`` or ``lora`` sketch. It is
    only used when no exact or content hash matched.
    """

    model_config = ConfigDict(extra="forbid")
    _sketch_lazy: ClassVar[bool] = True

    content: str | None = Field(
        default=None,
        max_length=_HEX_MAX,
        validation_alias=AliasChoices("content", CONTENT_ALGORITHM),
    )
    sha256: str | None = Field(default=None, max_length=_HEX_MAX)
    blake3: str | None = Field(default=None, max_length=_HEX_MAX)
    crc32: str | None = Field(default=None, max_length=_HEX_MAX)
    autov1: str | None = Field(default=None, max_length=_HEX_MAX)
    autov2: str | None = Field(default=None, max_length=_HEX_MAX)
    autov3: str | None = Field(default=None, max_length=_HEX_MAX)
    sketch: str | None = Field(
        default=None,
        max_length=_SKETCH_B64_MAX,
        description="Optional: base64 (standard, padded) of Sketch.to_bytes(), kind model or lora.",
    )

    @field_validator("content", "sha256", "blake3", "crc32", "autov1", "autov2", "autov3")
    @classmethod
    def _normalise(cls, value: str | None, info: Any) -> str | None:
        if value is None:
            return None
        return _canonical(WIRE_KEYS[info.field_name], value)

    @model_validator(mode="after")
    def _needs_strong(self) -> CheckItem:
        _require_strong(self.digests(), "the fingerprint")
        return self

    def digests(self) -> list[Digest]:
        """Every hash given, as digests, in a fixed order."""
        out = []
        for key, algorithm in WIRE_KEYS.items():
            value = getattr(self, key)
            if value is not None:
                out.append(Digest(algorithm, value))
        return out


class CheckRequest(BaseModel):
    """A batch of fingerprints; the answer has one result per item, in order."""

    model_config = ConfigDict(extra="forbid")

    items: list[CheckItem] = Field(min_length=1, max_length=MAX_CHECK_ITEMS)

    @model_validator(mode="after")
    def _sketch_budget(self) -> CheckRequest:
        total = sum(item.sketch_tensors() for item in self.items)
        if total > MAX_SKETCHED_TENSORS_PER_REQUEST:
            raise ValueError(
                f"the sketches hold {total} tensors in all, more than the "
                f"{MAX_SKETCHED_TENSORS_PER_REQUEST} one request may carry: split the batch"
            )
        for index, item in enumerate(self.items):
            if item.sketch is not None:
                try:
                    item.parsed_sketch()  # validate now, drop it: decoded again when used
                except ValueError as exc:
                    raise ValueError(f"items[{index}].{exc}") from None
        return self


class MatchEvidence(_Wire):
    """Why a match was made: the layer and the algorithm that matched.

    For ``layer: sketch`` the extra keys are ``base`` (the reference base's name, or
    None for a raw comparison), ``tensors_compared``, and the scores behind the
    verdict (``cosine``, ``z``, ``coefficient``, ``base_distance``, ``raw_distance``),
    and ``blocks``: where in the model the flagged delta sits, one entry per part of a
    block in model order (``component``, ``block``, ``label``, ``part``, ``tensors``,
    ``cosine``, ``coefficient``, ``share`` of the flagged delta, ``upload_share``).
    For ``layer: invariant`` (the upload's tensors did not line up with the base's,
    as after a permutation of its units, and its singular values decided),
    ``invariant`` is true and the scores are the invariant layer's own (``cosine``,
    ``coefficient``, ``z``, ``matrices_compared``), with ``sketch`` holding what the
    sketch layer could still compare.
    """

    model_config = ConfigDict(extra="allow")

    layer: str
    algorithm: str | None = None


class Match(_Wire):
    """One flag a checked model matched. ``status`` may be ``revoked``: shown, not counted."""

    flag_id: str
    category: str
    severity: str
    status: FlagStatus
    match: MatchKind
    score: float
    evidence: MatchEvidence


class CheckResult(_Wire):
    """The answer for one checked item: ``match`` only if an active or disputed flag matched."""

    index: int
    verdict: Literal["match", "clean"]
    matches: list[Match]


class CheckResponse(_Wire):
    results: list[CheckResult]


class LookupFlag(_Wire):
    """A flag found by a lookup, without notes or evidence."""

    flag_id: str
    category: str
    severity: str
    status: FlagStatus


class LookupResult(_Wire):
    """What an exact lookup found for one algorithm and value.

    ``flagged`` is true when an active or disputed flag carries the value. For a weak
    algorithm, ``ambiguous`` is always true: a hit may be a chance collision.
    """

    algorithm: str
    value: str
    strength: Strength
    flagged: bool
    ambiguous: bool
    note: str | None = None
    flags: list[LookupFlag]


class RangeResult(_Wire):
    """Every flagged value starting with ``prefix``, mixed with decoys, sorted."""

    algorithm: str
    prefix: str
    values: list[str]


class FlagCreate(_Submission):
    """A new flag: what the model is, why it is flagged, and its fingerprint map."""

    model_config = ConfigDict(extra="forbid")

    category: Category
    severity: Severity = "high"
    note: Text | None = Field(default=None, max_length=4000)
    evidence: Text | None = Field(
        default=None, max_length=2000, description="A reference to evidence held elsewhere."
    )
    fingerprint: dict[str, str] = Field(
        min_length=1, max_length=16, description="algorithm -> hex, as summary() gives it"
    )
    files: list[JsonObject] = Field(default_factory=list, max_length=4096)
    model: JsonObject | None = None
    force: bool = Field(
        default=False, description="Admins only: flag even if it matches a reference base."
    )
    sketch: str | None = Field(
        default=None,
        max_length=_SKETCH_B64_MAX,
        description="Optional: base64 of Sketch.to_bytes() (kind model or lora), so that "
        "derivatives and re-saves of the model match too.",
    )



class ReasonBody(BaseModel):
    """A reason for a dispute, confirmation, revocation or reinstatement."""

    model_config = ConfigDict(extra="forbid")

    reason: Text = Field(min_length=1, max_length=2000)


class Opinion(_Wire):
    kind: Literal["confirm", "dispute"]
    reason: str | None
    by: str
    at: datetime


class FlagDetail(_Wire):
    """A flag. Readers get ``redacted: true`` and no note, evidence or opinions."""

    id: str
    category: str
    severity: str
    status: FlagStatus
    created_at: datetime
    updated_at: datetime
    fingerprints: dict[str, list[str]]
    redacted: bool
    note: str | None = None
    evidence: str | None = None
    files: list[dict[str, Any]] | None = None
    model: dict[str, Any] | None = None
    created_by: str | None = None
    status_reason: str | None = None
    opinions: list[Opinion] | None = None


class BaseCreate(_Submission):
    """A reference base: a public model that is never flagged.

    A public fine-tune is a base of its own too; a public adapter (a ``lora``
    sketch) is never a base of deltas. Both teach the registry what the
    derivatives of their base share, which is removed before scoring.
    """

    model_config = ConfigDict(extra="forbid")
    _sketch_kinds: ClassVar[tuple[str, ...]] = ("model", "lora")

    name: Text = Field(min_length=1, max_length=200)
    description: Text | None = Field(default=None, max_length=4000)
    fingerprint: dict[str, str] = Field(min_length=1, max_length=16)
    model: JsonObject | None = None
    sketch: str | None = Field(
        default=None,
        max_length=_SKETCH_B64_MAX,
        description="Optional: base64 of Sketch.to_bytes() of the base's raw (model) "
        "sketch, which flags' deltas are measured against, or of a public adapter's "
        "(lora) sketch, a known-innocent adapter.",
    )



class BasePublic(_Wire):
    id: str
    name: str
    description: str | None
    fingerprints: dict[str, list[str]]
    created_at: datetime
    sketch_kind: str | None = Field(
        default=None,
        description="The stored sketch's kind: model (a base, which public fine-tunes "
        "also are), lora (a reference adapter), or null when none was sent.",
    )


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    name: Text | None = Field(default=None, max_length=200)


class KeyPublic(_Wire):
    """An API key as listed: never the secret, only its non-secret prefix."""

    id: int
    name: str | None
    role: Role
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    """A new key; ``key`` is shown this once and stored only as a hash."""

    key: str


class AuditRecord(_Wire):
    """One audit event: who did what, why and when."""

    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    reason: str | None
    detail: dict[str, Any] | None


class ChangeEvent(_Wire):
    """One change to the list: ``flag.created``, ``flag.status`` or ``fingerprint.added``."""

    cursor: int
    at: datetime
    kind: str
    flag_id: str
    data: dict[str, Any]


class SignedExport(_Wire):
    """The whole list as canonical JSON in ``payload``, signed with ed25519."""

    payload: str
    signature: str
    key_id: str
    algorithm: Literal["ed25519"]


class ChangesPage(_Wire):
    """One page of the change feed. ``signed`` carries the same page as a signed
    ``modelhash-changes-v1`` payload; mirrors apply that, never the unsigned fields."""

    changes: list[ChangeEvent]
    next_cursor: int
    has_more: bool
    signed: SignedExport | None = None


class PublicKey(_Wire):
    """The export signing key. While the key is being rotated, ``endorsement`` is the
    new key signed by the previous one (payload ``modelhash-key-endorsement-v1``), so
    a mirror that pinned the old key can move to the new one by itself."""

    algorithm: Literal["ed25519"]
    key_id: str
    public_key_pem: str
    endorsement: SignedExport | None = None


class FlagPage(_Wire):
    """One page of a flag search, with the total count of matching flags."""

    total: int
    limit: int
    offset: int
    flags: list[FlagDetail]


class ReportCreate(BaseModel):
    """A platform's report on a flag. It is stored and shown; it changes no status."""

    model_config = ConfigDict(extra="forbid")

    kind: ReportKind
    note: Text | None = Field(default=None, max_length=2000)


class ReportPublic(_Wire):
    """A stored report: what kind, why, which key and when."""

    id: int
    flag_id: str
    kind: ReportKind
    note: str | None
    by: str
    at: datetime


class ImportRequest(BaseModel):
    """A bulk import: CSV text (a header row naming the columns) or a plain list of hashes.

    CSV columns: ``sha256``, ``blake3``, ``content`` (at least one per row), and
    ``category``, ``severity``, ``note``, ``evidence``; the columns of the CSV export
    are accepted too (and ignored where they are not submission fields). A plain list
    has one hash per line, in any accepted form. ``category`` and friends here are
    the defaults for rows that leave them empty. At most :data:`MAX_IMPORT_ROWS`
    rows per request; the SDK and CLI send larger lists in batches.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["csv", "list"] = "csv"
    text: Text = Field(min_length=1, max_length=MAX_IMPORT_TEXT)
    category: Category | None = None
    severity: Severity | None = None
    note: Text | None = Field(default=None, max_length=4000)
    evidence: Text | None = Field(default=None, max_length=4000)
    first_row: int | None = Field(
        default=None, ge=1, le=10**9,
        description="The number results give the first row after any header (default: its "
        "line number, 2 for CSV, 1 for a list); batches of one file pass their offset.",
    )


class ImportRow(_Wire):
    """The outcome of one row: ``created``, ``exists`` (already flagged) or ``error``."""

    row: int
    status: Literal["created", "exists", "error"]
    flag_id: str | None = None
    error: str | None = None


class ImportResult(_Wire):
    created: int
    existing: int
    failed: int
    rows: list[ImportRow]
