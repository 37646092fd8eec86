"""OpenAI's error body, {"error": {"message", "type", "param", "code"}}, for every failure."""
from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse

_TYPE_FOR_STATUS = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    413: "invalid_request_error", 500: "server_error", 501: "not_supported_error", 503: "unavailable_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.close_connection = False  # the middleware answers with Connection: close

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": _TYPE_FOR_STATUS.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param, code)
