"""Property tests of the whole API against its own OpenAPI document (schemathesis).

Whatever the generator sends, the answer is never a 5xx and always matches what the
schema documents: bad hashes, unknown algorithms, oversized batches and wrong types
get a 4xx with a ``detail``. One test per operation, on each database.

"Schema-valid data must be accepted" is not checked: some rules span fields or
depend on the algorithm (a sha256 is 64 hex digits, a crc32 8; an item needs one
strong hash), which JSON Schema cannot say, so schema-valid requests may rightly
get a 400 or 422. Every other default check runs, including that schema-invalid
data is rejected.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from modelhash.registry._db import session_scope
from modelhash.registry._settings import Settings
from modelhash.registry.app import create_app
from modelhash.registry.crud.keys import CLI, create_key
from tests.utils.registry import auth

# The operations, read from a throwaway app (it touches no database until asked).
OPERATIONS = sorted(
    (method.upper(), path)
    for path, methods in create_app(Settings(database_url="sqlite://")).openapi()["paths"].items()
    for method in methods
)


@pytest.fixture(scope="session")
def fuzz_admin(engine) -> tuple[int, str]:
    with session_scope(engine) as session:
        row, key = create_key(session, role="admin", name="fuzz", actor=CLI)
    assert row.id is not None
    return row.id, key


@pytest.fixture(scope="session")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_input_makes_a_server_error(api_schema, fuzz_admin, method, path):
    operation = api_schema.find_operation_by_path(method, path)
    assert operation is not None
    admin_id, admin_key = fuzz_admin

    @given(case=operation.as_strategy())
    @settings(
        max_examples=50,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        key_id = (case.path_parameters or {}).get("key_id")
        if isinstance(key_id, int) and 0 < key_id <= admin_id:
            # Keep our own key, and the keys other tests of this session made before
            # it (which test runs first depends on the files' order).
            case.path_parameters["key_id"] = admin_id + 1_000_000
        case.call_and_validate(headers=auth(admin_key), excluded_checks=[positive_data_acceptance])

    run()
