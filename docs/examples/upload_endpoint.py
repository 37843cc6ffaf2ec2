"""A reference upload endpoint: stream each upload through modelhash, refuse flagged ones.

Run it (needs ``pip install modelhash fastapi uvicorn``)::

    export MODELHASH_REGISTRY=https://registry.example MODELHASH_API_KEY=mh_...
    uvicorn upload_endpoint:app --port 9000
    curl -T model.safetensors http://127.0.0.1:9000/models/model.safetensors

The body is the file itself (``PUT``, or ``curl -T``). It is written to a staging
folder and fingerprinted, every layer included, as it arrives; a safetensors file
needs no second read. Re-uploads are caught even when re-saved, cast to fp16,
merged, fine-tuned further, converted (LoRA formats) or baked (a LoRA merged into
a checkpoint). Only an accepted upload is moved into storage; everything else is
deleted.

Answers: 201 stored; 403 the model matches a flag; 422 not a weight file that can
be read safely (hostile pickle, broken header); 413 too large; 503 the registry
could not be asked and the policy is fail-closed (retry later).
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from modelhash import AsyncRegistryClient, Checker, scan_upload_async
from modelhash.errors import RegistryError, UploadTooLargeError

MAX_BYTES = int(os.environ.get("UPLOAD_MAX_BYTES", 20 * 1024**3))
UNREACHABLE = os.environ.get("UPLOAD_UNREACHABLE", "fail-closed")  # or "fail-open"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


def create_app(
    storage: Path,
    checker: AsyncRegistryClient | Checker | None = None,
    *,
    max_bytes: int = MAX_BYTES,
    unreachable: str = UNREACHABLE,
) -> FastAPI:
    """An app that stores accepted uploads under ``storage``.

    ``checker`` defaults to one AsyncRegistryClient for the app's lifetime, set up
    from ``MODELHASH_REGISTRY`` and ``MODELHASH_API_KEY``.
    """
    state: dict[str, Any] = {"checker": checker}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if state["checker"] is None:
            async with AsyncRegistryClient() as client:
                state["checker"] = client
                yield
        else:
            yield

    app = FastAPI(title="upload endpoint with modelhash", lifespan=lifespan)
    staging = storage / ".staging"

    @app.put("/models/{name}", status_code=201)
    async def upload(name: str, request: Request) -> JSONResponse:
        if not _SAFE_NAME.fullmatch(name):
            raise HTTPException(400, "bad file name")
        staging.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=staging)
        kept = False
        try:
            with os.fdopen(fd, "wb") as out:

                async def tee() -> AsyncIterator[bytes]:
                    async for chunk in request.stream():
                        await asyncio.to_thread(out.write, chunk)
                        yield chunk

                try:
                    verdict = await scan_upload_async(
                        tee(), name=name, checker=state["checker"],
                        max_bytes=max_bytes, unreachable=unreachable,
                    )
                except UploadTooLargeError as exc:
                    raise HTTPException(413, exc.diagnostics()) from None
                except RegistryError as exc:  # a bad API key: no policy hides that
                    raise HTTPException(503, exc.diagnostics()) from None
            body = verdict.to_json()
            if not verdict.allow:
                status = {"match": 403, "error": 422}.get(verdict.verdict, 503)
                return JSONResponse(body, status_code=status)
            os.replace(tmp, storage / name)
            kept = True
            # verdict.recheck: accepted while the registry was down (fail-open);
            # queue it for a re-check, e.g. with `modelhash check` from a cron job.
            return JSONResponse(body, status_code=201)
        finally:
            if not kept:
                Path(tmp).unlink(missing_ok=True)

    return app


app = create_app(Path(os.environ.get("UPLOAD_STORAGE", "uploads")))
