"""A fake Azure Resource Manager for tests: Azure Resource Manager cannot be reached from
here, so the Azure SDK clients (azure-mgmt-*) are given a ``RequestsTransport`` whose
``requests`` session answers from this module instead of the network.

Routes map (HTTP method, a regex over the URL path) to a JSON body in the shape Azure's
REST reference documents (or a callable building one); every request is recorded, so a
test asserts what raybatch *sent*. Nothing leaves the process.

    arm = FakeArm()
    arm.route("GET", r"/providers/Microsoft.Compute/skus$", {"value": [...]})
    client = ComputeManagementClient(FakeCredential(), SUB, transport=arm.transport())
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union
from urllib.parse import parse_qs, urlparse

import requests
from requests.adapters import BaseAdapter

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"

Body = Union[dict, list, None, Callable[["Sent"], Any]]


@dataclass
class Sent:
    method: str
    url: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any

    def json(self) -> Any:
        return self.body


@dataclass
class _Route:
    method: str
    pattern: re.Pattern
    body: Body
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    times: Optional[int] = None  # answer this many times, then fall through to later routes


class FakeArm(BaseAdapter):
    """A requests adapter standing in for management.azure.com (and the token endpoints)."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: list[_Route] = []
        self.sent: list[Sent] = []
        self._operations = 0

    def route(self, method: str, path_regex: str, body: Body = None, status: int = 200,
              headers: Optional[dict[str, str]] = None, times: Optional[int] = None) -> "FakeArm":
        self.routes.insert(0, _Route(method.upper(), re.compile(path_regex, re.I), body, status,
                                     headers or {}, times))
        return self

    def error(self, method: str, path_regex: str, status: int, code: str, message: str,
              times: Optional[int] = None) -> "FakeArm":
        """An ARM error in its documented shape: {"error": {"code", "message"}}."""
        return self.route(method, path_regex, {"error": {"code": code, "message": message}}, status,
                          times=times)

    def long_running(self, method: str, path_regex: str, body: Body = None, *, status: str = "Succeeded",
                     error: Optional[dict] = None, times: Optional[int] = None,
                     initial_status: int = 201) -> "FakeArm":
        """An ARM long-running operation in its documented asynchronous shape: the request is
        answered ``initial_status`` (201 or 202, as the operation's REST reference says; with
        ``body``, the resource being created or updated) and an ``Azure-AsyncOperation`` status URL (and ``Retry-After: 0``, so
        pollers do not wait); that URL answers ``{"status": status}`` (plus ``"error"`` when
        given: ``{"code", "message", "details"}``). A poller of a PUT then GETs the resource
        itself, which the test routes as usual."""
        self._operations += 1
        op = f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.FakeArm/operations/op{self._operations}"
        self.route("GET", re.escape(op) + "$", {"status": status, **({"error": error} if error else {})})
        return self.route(method, path_regex, body, status=initial_status, times=times,
                          headers={"Azure-AsyncOperation": f"https://management.azure.com{op}",
                                   "Retry-After": "0"})

    def requests_to(self, method: str, path_regex: str) -> list[Sent]:
        rx = re.compile(path_regex, re.I)
        return [s for s in self.sent if s.method == method.upper() and rx.search(s.path)]

    # requests' adapter interface
    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):  # noqa: D401
        u = urlparse(request.url)
        raw = request.body
        if isinstance(raw, bytes):
            raw = raw.decode()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        sent = Sent(request.method.upper(), request.url, u.path, parse_qs(u.query), dict(request.headers), body)
        self.sent.append(sent)
        for r in self.routes:
            if r.method == sent.method and r.pattern.search(u.path) and r.times != 0:
                if r.times is not None:
                    r.times -= 1
                payload = r.body(sent) if callable(r.body) else r.body
                return self._response(request, r.status, payload, r.headers)
        return self._response(request, 404, {"error": {"code": "NotFound", "message":
                                                      f"fake ARM has no route for {sent.method} {u.path}"}}, {})

    def close(self) -> None:
        pass

    @staticmethod
    def _response(request, status: int, payload: Any, headers: dict[str, str]) -> requests.Response:
        import io  # noqa: PLC0415

        from urllib3.response import HTTPResponse  # noqa: PLC0415

        content = b"" if payload is None else json.dumps(payload).encode()
        all_headers = {"Content-Type": "application/json", "Content-Length": str(len(content)), **headers}
        resp = requests.Response()
        resp.status_code = status
        resp.raw = HTTPResponse(body=io.BytesIO(content), headers=all_headers, status=status,
                                preload_content=False, decode_content=False)
        resp.headers.update(all_headers)
        resp.url = request.url
        resp.request = request
        resp.reason = "OK" if status < 400 else "Error"
        return resp

    def session(self) -> requests.Session:
        s = requests.Session()
        s.mount("https://", self)
        s.mount("http://", self)
        return s

    def transport(self):
        """An azure-core transport for a management client: ``transport=arm.transport()``."""
        from azure.core.pipeline.transport import RequestsTransport  # noqa: PLC0415

        return RequestsTransport(session=self.session(), session_owner=False)


class FakeCredential:
    """A TokenCredential that never calls Azure AD."""

    def __init__(self, fail: Optional[Exception] = None) -> None:
        self.fail = fail
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken  # noqa: PLC0415

        self.scopes.append(scopes)
        if self.fail is not None:
            raise self.fail
        return AccessToken("fake-token", int(time.time()) + 3600)

    def get_token_info(self, *scopes, options=None):
        from azure.core.credentials import AccessTokenInfo  # noqa: PLC0415

        self.scopes.append(scopes)
        if self.fail is not None:
            raise self.fail
        return AccessTokenInfo("fake-token", int(time.time()) + 3600)
