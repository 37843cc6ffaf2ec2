"""The analyst web UI, served by the registry under ``/ui`` with the same keys and roles.

Server-rendered Jinja2 pages with a small stylesheet; read-only pages work without
JavaScript, and htmx (vendored, like the Swagger UI and ReDoc assets) only makes
forms a little smoother. Nothing is loaded from a CDN, so the UI and ``/docs`` work
on an air-gapped network.

:func:`install` adds the routes, the static files, the local ``/docs`` and
``/redoc`` pages and the error pages to an app.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelhash.registry.errors import ServiceError
from modelhash.registry.ui import actions, admin, pages, tools
from modelhash.registry.ui._deps import SignInRequired, render

__all__ = ["STATIC", "install"]

STATIC = Path(__file__).parent / "static"
_VENDOR = "/ui/static/vendor"


def install(app: FastAPI) -> None:
    """Add the web UI, the static assets and local API docs to ``app``."""
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    for module in (actions, pages, tools, admin):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{_VENDOR}/swagger-ui-bundle.js",
            swagger_css_url=f"{_VENDOR}/swagger-ui.css",
            swagger_favicon_url="/ui/static/favicon.svg",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API reference",
            redoc_js_url=f"{_VENDOR}/redoc.standalone.js",
            redoc_favicon_url="/ui/static/favicon.svg",
            with_google_fonts=False,
        )

    _install_error_pages(app)


def _is_ui(request: Request) -> bool:
    return request.url.path.startswith("/ui/") or request.url.path == "/ui"


def _install_error_pages(app: FastAPI) -> None:
    """UI requests get HTML error pages; every other path keeps the JSON handlers."""
    service_json = app.exception_handlers.get(ServiceError)
    validation_json = app.exception_handlers.get(RequestValidationError)
    http_json = app.exception_handlers.get(StarletteHTTPException)

    async def sign_in(request: Request, _: Exception) -> Response:
        target = request.url.path
        if request.url.query:
            target += "?" + request.url.query
        if request.method != "GET":
            target = "/ui/"
        return RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303)

    async def service_error(request: Request, exc: Exception) -> Response:
        if _is_ui(request):
            assert isinstance(exc, ServiceError)
            return _error_page(request, exc.status, str(exc))
        assert service_json is not None
        return await _call(service_json, request, exc)

    async def invalid(request: Request, exc: Exception) -> Response:
        if _is_ui(request):
            assert isinstance(exc, RequestValidationError)
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'form'}: {e.get('msg')}"
                for e in exc.errors()[:5]
            )
            return _error_page(request, 422, problems)
        assert validation_json is not None
        return await _call(validation_json, request, exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        if _is_ui(request) and isinstance(exc, StarletteHTTPException):
            return _error_page(request, exc.status_code, str(exc.detail))
        assert http_json is not None
        return await _call(http_json, request, exc)

    app.add_exception_handler(SignInRequired, sign_in)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)


async def _call(handler: Any, request: Request, exc: Exception) -> Response:
    """Run the JSON handler a UI handler stands in front of (sync or async)."""
    result = handler(request, exc)
    if inspect.isawaitable(result):
        result = await result
    assert isinstance(result, Response)
    return result


def _error_page(request: Request, status: int, message: str) -> HTMLResponse:
    user = getattr(request.state, "ui_user", None)
    return render(request, "error.html", user, status_code=status, status=status, message=message)
