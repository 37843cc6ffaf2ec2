"""What every UI route shares: the signed-in user, the CSRF check and page rendering."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlmodel import Session

from modelhash import __version__
from modelhash.registry.errors import PermissionDeniedError, ServiceError
from modelhash.registry.ui._session import COOKIE, UiUser, csrf_ok, resolve

__all__ = [
    "SECURITY_HEADERS",
    "CsrfForm",
    "CsrfRejected",
    "SignInRequired",
    "UserDep",
    "render",
    "require_role",
    "templates",
]

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.globals["version"] = __version__


class SignInRequired(Exception):
    """No valid session: the answer is a redirect to the sign-in page."""


class CsrfRejected(ServiceError):
    """A form came without this session's CSRF token."""

    status = 403


async def _user(request: Request) -> UiUser:
    token = request.cookies.get(COOKIE)

    def find() -> UiUser | None:
        with Session(request.app.state.engine) as session:
            return resolve(session, token)

    user = await run_in_threadpool(find)
    if user is None:
        raise SignInRequired
    request.state.ui_user = user
    return user


UserDep = Annotated[UiUser, Depends(_user)]


def require_role(user: UiUser, role: str) -> None:
    """403 unless the user's key has ``role``, exactly as REST would answer."""
    if not user.principal.allows(role):
        raise PermissionDeniedError(
            f"this needs a {role} key; yours is a {user.principal.role} key"
        )


async def _csrf(user: UserDep, csrf_token: Annotated[str | None, Form()] = None) -> UiUser:
    if not csrf_ok(user.csrf, csrf_token):
        raise CsrfRejected("the form's CSRF token is missing or wrong: reload the page and retry")
    return user


CsrfForm = Annotated[UiUser, Depends(_csrf)]


def render(
    request: Request, name: str, user: UiUser | None, status_code: int = 200, **context: Any
) -> HTMLResponse:
    """The page ``name`` for ``user``, with the navigation the user's role may see.

    Pages are never cached (they show what a key may see, on possibly shared
    machines) and never framed (the action forms must not be clickjacked); the
    content policy allows this origin's scripts and styles only.
    """
    response = templates.TemplateResponse(
        request, name, {"user": user, **context}, status_code=status_code
    )
    response.headers.update(SECURITY_HEADERS)
    return response


#: Headers on every UI page.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
}
