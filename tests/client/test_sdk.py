"""The SDK against ``httpx.MockTransport``: retries, timeouts, 5xx, garbage, bad keys."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
from collections.abc import Callable

import httpx
import pytest

import modelhash
import modelhash.errors as errors
from modelhash import AsyncRegistryClient, RegistryClient, Retry
from modelhash.wire import MAX_CHECK_ITEMS

Handler = Callable[[httpx.Request], httpx.Response]
SHA = "ab" * 32


def ok_check(request: httpx.Request) -> httpx.Response:
    items = json.loads(request.content)["items"]
    return httpx.Response(200, json={"results": [
        {"index": i, "verdict": "clean", "matches": []} for i in range(len(items))
    ]})


def make(handler: Handler, **kw: object) -> tuple[RegistryClient, list[float]]:
    slept: list[float] = []
    retry = kw.pop("retry", Retry(rng=random.Random(0)))
    c = RegistryClient("http://registry.test", api_key="mh_secret",
                       transport=httpx.MockTransport(handler), retry=retry,  # type: ignore[arg-type]
                       sleep=slept.append, **kw)  # type: ignore[arg-type]
    return c, slept


def _isort_style(name: str) -> tuple[int, str]:
    """Constants, then classes, then functions, as ruff's RUF022 orders ``__all__``."""
    if name.isupper():
        return 0, name
    return (1, name) if name[:1].isupper() else (2, name)


def test_public_names_are_complete_and_sorted() -> None:
    # Public names are imported lazily: every lazy name is exported, every export
    # resolves, and nothing else public leaks from the package namespace.
    lazy = set(modelhash._LAZY)
    assert set(modelhash.__all__) == lazy | {"__version__"}
    for name in modelhash.__all__:
        assert getattr(modelhash, name) is not None
    helpers = {"annotations", "importlib", "Any", "TYPE_CHECKING"}
    public = {n for n, v in vars(modelhash).items()
              if not n.startswith("_") and type(v).__name__ != "module"} - helpers
    assert public <= set(modelhash.__all__), public - set(modelhash.__all__)
    assert modelhash.__all__ == sorted(modelhash.__all__, key=_isort_style)
    assert errors.__all__ == sorted(errors.__all__, key=_isort_style)
    for name in errors.__all__:
        assert name in errors.__doc__, f"{name} missing from the tree in the docstring"


def test_sends_the_key_and_parses_results() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok_check(request)

    c, _ = make(handler)
    (r,) = c.check([{"sha256": SHA.upper(), "autov2": SHA[:10], "sketch-v9": "x"}])
    assert r.verdict == "clean"
    assert seen[0].headers["authorization"] == "Bearer mh_secret"
    assert json.loads(seen[0].content) == {"items": [{"sha256": SHA, "autov2": SHA[:10]}]}


def test_batches_are_split_at_the_server_limit_and_renumbered() -> None:
    sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sizes.append(len(json.loads(request.content)["items"]))
        return ok_check(request)

    c, _ = make(handler)
    results = c.check([{"sha256": secrets.token_hex(32)} for _ in range(2 * MAX_CHECK_ITEMS + 1)])
    assert sizes == [MAX_CHECK_ITEMS, MAX_CHECK_ITEMS, 1]
    assert [r.index for r in results] == list(range(2 * MAX_CHECK_ITEMS + 1))


def test_weak_only_fingerprint_is_refused_before_sending() -> None:
    c, _ = make(lambda r: pytest.fail("sent"))
    with pytest.raises(errors.InputError, match="no strong hash"):
        c.check([{"autov2": SHA[:10]}])


def test_5xx_is_retried_with_growing_jittered_waits_then_succeeds() -> None:
    calls = iter([503, 502, 504])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(calls, 200)
        return ok_check(request) if status == 200 else httpx.Response(status, text="busy")

    c, slept = make(handler)
    assert c.check([{"sha256": SHA}])[0].verdict == "clean"
    assert len(slept) == 3
    assert all(0 <= s <= 0.25 * 2**i for i, s in enumerate(slept))


def test_5xx_after_the_last_attempt_is_an_http_error() -> None:
    c, slept = make(lambda r: httpx.Response(500, json={"detail": "boom"}))
    with pytest.raises(errors.RegistryHTTPError) as info:
        c.check([{"sha256": SHA}])
    assert info.value.status == 500 and slept == []  # 500 is not a retry status
    c, slept = make(lambda r: httpx.Response(503, json={"detail": "db down"}))
    with pytest.raises(errors.RegistryHTTPError, match="503 db down"):
        c.check([{"sha256": SHA}])
    assert len(slept) == 3


def test_retry_after_is_honoured_up_to_a_cap() -> None:
    answers = iter([httpx.Response(429, headers={"Retry-After": "2"}),
                    httpx.Response(503, headers={"Retry-After": "999"})])

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or ok_check(request)

    c, slept = make(handler)
    c.check([{"sha256": SHA}])
    assert slept[0] >= 2 and slept[1] == 30


def test_timeouts_and_resets_are_retried_only_when_idempotent() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    c, slept = make(timeout)
    with pytest.raises(errors.RegistryUnreachableError, match="timed out"):
        c.check([{"sha256": SHA}])
    assert len(slept) == 3
    c, slept = make(timeout)
    with pytest.raises(errors.RegistryUnreachableError):
        c.revoke("f1", reason="x")
    assert slept == []  # a revoke that may have landed is not repeated


def test_connection_refused_is_retried_even_for_writes() -> None:
    attempts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.path)
        if len(attempts) < 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=_flag_detail("revoked"))

    c, slept = make(handler)
    assert c.revoke("f1", reason="wrong").status == "revoked"
    assert len(attempts) == 3 and len(slept) == 2


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, errors.RejectedError), (401, errors.UnauthorizedError), (403, errors.ForbiddenError),
     (404, errors.NotFoundError), (409, errors.ConflictError), (422, errors.RejectedError),
     (418, errors.RegistryHTTPError)],
)
def test_error_statuses_map_to_classes_and_are_not_retried(status: int, cls: type) -> None:
    c, slept = make(lambda r: httpx.Response(status, json={"detail": "nope\nsecond line"}))
    with pytest.raises(cls) as info:
        c.get_flag("abc")
    assert slept == []
    line = info.value.diagnostics()
    assert "\n" not in line and f"{status} nope" in line and "mh_secret" not in line
    assert "http://registry.test/v1/flags/abc" in line


def test_validation_errors_are_summarised_in_one_line() -> None:
    body = {"detail": [{"loc": ["body", "items", 0], "msg": "Field required", "type": "x"}]}
    c, _ = make(lambda r: httpx.Response(422, json=body))
    with pytest.raises(errors.RejectedError, match=r"items\.0: Field required"):
        c.check([{"sha256": SHA}])


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>proxy login</html>"),
        httpx.Response(200, json={"results": "nope"}),
        httpx.Response(200, json={"results": []}),
        httpx.Response(200, json={"results": [{"index": 5, "verdict": "clean", "matches": []}]}),
        httpx.Response(302, headers={"Location": "http://elsewhere/"}),
        httpx.Response(502, text="<html>bad gateway</html>"),
    ],
)
def test_garbage_answers_are_registry_errors(response: httpx.Response) -> None:
    c, _ = make(lambda r: response, retry=Retry(attempts=1))
    with pytest.raises(errors.RegistryError) as info:
        c.check([{"sha256": SHA}])
    assert "\n" not in info.value.diagnostics()


def test_fail_open_and_fail_closed_on_outage_but_not_on_a_bad_key() -> None:
    c, _ = make(lambda r: httpx.Response(503), retry=Retry(attempts=1))
    (d,) = c.screen([{"sha256": SHA}])
    assert (d.verdict, d.allow, d.recheck) == ("unchecked", False, True)
    (d,) = c.screen([{"sha256": SHA}], unreachable="fail-open")
    assert (d.verdict, d.allow, d.recheck) == ("unchecked", True, True)
    c, _ = make(lambda r: httpx.Response(401, json={"detail": "unknown key"}))
    with pytest.raises(errors.UnauthorizedError):
        c.screen([{"sha256": SHA}], unreachable="fail-open")


def test_environment_configures_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELHASH_REGISTRY", "https://reg.example/")
    monkeypatch.setenv("MODELHASH_API_KEY", "mh_env")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ready"})

    with RegistryClient(transport=httpx.MockTransport(handler)) as c:
        c.ready()
    assert str(seen[0].url) == "https://reg.example/readyz"
    assert seen[0].headers["authorization"] == "Bearer mh_env"
    with pytest.raises(errors.InputError, match="http"):
        RegistryClient("ftp://nope")


def test_async_client_retries_and_chunks() -> None:
    statuses = iter([503])
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(statuses, 200)
        return ok_check(request) if status == 200 else httpx.Response(status)

    async def run() -> int:
        async with AsyncRegistryClient(
            "http://registry.test", transport=httpx.MockTransport(handler), sleep=sleep
        ) as c:
            results = await c.check([{"sha256": secrets.token_hex(32)}
                                     for _ in range(MAX_CHECK_ITEMS + 3)])
            return len(results)

    assert asyncio.run(run()) == MAX_CHECK_ITEMS + 3
    assert len(slept) == 1


def _flag_detail(status: str) -> dict[str, object]:
    return {"id": "f1", "category": "csam", "severity": "high", "status": status,
            "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z",
            "fingerprints": {}, "redacted": False}
