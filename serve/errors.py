"""One error shape for every answer the Gateway gives that is not a result, and the handlers that produce it.

GAP3D's routes answer `{"error": message, "field"?: ..., "stage"?: ...}`; Hunyuan3D-2's routes keep Hunyuan's
`{"text": message, "error_code": 1}` (serve/hunyuan.py). Schema errors, unknown routes, refusals by the
middleware (serve/middleware.py) and unexpected failures all go through `error_response`, and no message
carries more than a few dozen characters of what the client sent.
"""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve import hunyuan
from serve.api import ApiError

ECHO_CHARS = 40  # at most this much of a client's input (a field name) appears in an error
STATUS_MESSAGES = {
    404: "no such route; see /docs for the API",
    405: "method not allowed on this route",
    400: "the request could not be read",
}


def brief(text: str) -> str:
    """`text`, cut to ECHO_CHARS characters."""
    return text if len(text) <= ECHO_CHARS else text[: ECHO_CHARS - 3] + "..."


def error_response(
    path: str,
    status: int,
    message: str,
    field: str | None = None,
    stage: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    """The error body the route at `path` speaks: Hunyuan's on its routes, GAP3D's everywhere else."""
    if hunyuan.is_hunyuan_path(path):
        body = {"text": message, "error_code": 1}
    else:
        body = {"error": message}
        body.update({key: value for key, value in (("field", field), ("stage", stage)) if value})
    return JSONResponse(body, status_code=status, headers=headers)


def validation_field(location: tuple) -> str:
    """A pydantic error location -> the request field it names ("body" for the body as a whole)."""
    parts = [str(part) for part in location if part != "body"]
    return brief(".".join(parts)) if parts else "body"


async def api_error(request: Request, error: ApiError) -> JSONResponse:
    return error_response(request.url.path, error.status, error.message, error.field, error.stage, error.headers)


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    field = validation_field(tuple(first.get("loc", ())))
    return error_response(request.url.path, 422, first.get("msg", "invalid request"), field=field)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors (unknown routes, wrong methods, unreadable bodies)."""
    message = STATUS_MESSAGES.get(error.status_code, brief(str(error.detail)))
    return error_response(request.url.path, error.status_code, message, headers=error.headers)


async def unexpected(request: Request, error: Exception) -> JSONResponse:
    """Any other exception: Starlette raises it again after this answer, and Serve logs it with its traceback."""
    return error_response(request.url.path, 500, "internal error; the service logged it")


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
