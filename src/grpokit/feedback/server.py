"""The ranking page: a small web app over the feedback store, served by the training process.

Why Starlette (served by uvicorn): no build step (one HTML file with its own CSS and vanilla JS,
src/grpokit/assets/feedback/page.html, no external assets), one process (the app runs in a daemon
thread of the trainer next to the store it writes, so a ranking reaches the waiting step without
a broker), and both are maintained, small, and already installed with the `judges` extra (fastapi
is built on Starlette; uvicorn serves it). Gradio would bring a front-end bundle, a queue and its
own server for a page of four buttons.

Security:

* bound to 127.0.0.1 by default; binding anywhere else logs a warning (anyone who can reach the
  port and has the token can rank);
* every request needs the random token printed at start-up (`?token=` in the URL, or the
  `X-Feedback-Token` header the page sends): without it, 403;
* bound to loopback, a request whose Host header is not a loopback name is refused (403), so a web
  page on another site cannot reach the app through DNS rebinding;
* every prompt and candidate is data: the API returns JSON, the page puts text in with
  `textContent` (never as HTML), and its Content-Security-Policy allows only its own script (a
  per-response nonce) and requests to itself; `Referrer-Policy: no-referrer` keeps the token off
  other sites.

API (JSON): `GET /api/next?labeller=NAME` (a waiting group this labeller has not answered, its
candidates in an order of their own, or `group: null`), `POST /api/rank` (`{group_id, labeller,
ranking}` in shown positions, 0-based, best first, a list for tied positions; or `{group_id,
labeller, skip: true}`), `GET /api/progress`. Wrong size: 400; unknown group: 404; a group no step
is waiting for, or answered twice by one person: 409.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import random
import secrets
import socket
import threading
import time
from importlib import resources
from typing import Any

from grpokit.feedback.store import BadRanking, FeedbackStore, NotWaiting, UnknownGroup, normalize_ranking

__all__ = ["FeedbackServer", "prompt_turns", "is_loopback"]

logger = logging.getLogger("grpokit.feedback")
TOKEN_HEADER = "X-Feedback-Token"
MAX_BODY = 1 << 20
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # multimodal parts: the text ones, an image as a marker
        return "".join(p.get("text", "") if isinstance(p, dict) and p.get("type", "text") == "text"
                       else "" if _images([p])  # an image the page shows itself
                       else f"[{p.get('type', 'part')}]" if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _images(content: Any) -> list[str]:
    """The data:image/ URIs of a message's image parts (`feedback.reward.with_images` puts them
    there); nothing else is ever handed to the page as an image source."""
    if not isinstance(content, (list, tuple)):
        return []
    return [p["url"] for p in content if isinstance(p, dict) and p.get("type") == "image"
            and isinstance(p.get("url"), str) and p["url"].startswith("data:image/")]


def prompt_turns(prompt: Any) -> list[dict[str, Any]]:
    """A prompt as the page shows it: one {role, content, images} per conversation turn (a text
    prompt is one turn with role "prompt"); `images` holds data:image/ URIs only."""
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return [{"role": str(m.get("role", "")), "content": _text(m.get("content")),
                 "images": _images(m.get("content"))} for m in prompt]
    return [{"role": "prompt", "content": _text(prompt), "images": []}]


class FeedbackServer:
    """The ranking page over `store`, on `host:port` (port 0: a free one), in a daemon thread.
    `start()` -> the URL with the token; `stop()` ends it. The per-labeller order of a group's
    candidates is drawn from a secret of this server, the labeller and the group (the same order
    each time the labeller asks), and kept here (`shown_order`) to map a ranking back."""

    def __init__(self, store: FeedbackStore, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        self.store, self.host, self.port = store, host, int(port)
        self.token = token or secrets.token_urlsafe(24)
        self._secret = secrets.token_bytes(16)
        self._shown: dict[tuple[str, str], list[int]] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # ---- the shuffle ----
    def shown_order(self, labeller: str, gid: str, m: int) -> list[int]:
        """shown position -> original candidate index, for this labeller and group."""
        key = (labeller, gid)
        order = self._shown.get(key)
        if order is None or len(order) != m:
            seed = hashlib.sha256(self._secret + json.dumps([labeller, gid]).encode()).digest()
            order = list(range(m))
            random.Random(int.from_bytes(seed[:8], "big")).shuffle(order)
            self._shown[key] = order
        return order

    # ---- the app ----
    def _build_app(self) -> Any:
        try:
            from starlette.applications import Starlette
            from starlette.requests import Request
            from starlette.responses import HTMLResponse, JSONResponse, Response
            from starlette.routing import Route
            import uvicorn  # noqa: F401 - checked here, with the app, so the error comes before step 1
        except ImportError as e:
            from grpokit.tracking import MissingPackageError

            raise MissingPackageError(f"the feedback page needs starlette and uvicorn ({e.name} is missing): "
                                      "pip install 'grpokit[judges]'") from e

        page = (resources.files("grpokit") / "assets" / "feedback" / "page.html").read_text(encoding="utf-8")
        plain = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

        def error(status: int, message: str) -> Response:
            return JSONResponse({"error": message}, status_code=status, headers=plain)

        def labeller_of(value: Any) -> str:
            name = str(value or "").strip()
            if not name or len(name) > 64:
                raise BadRanking("give your name as labeller (1 to 64 characters)")
            return name

        async def index(request: Request) -> Response:
            nonce = secrets.token_urlsafe(16)
            csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                   "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                   "frame-ancestors 'none'")
            return HTMLResponse(page.replace("__NONCE__", nonce),
                                headers={**plain, "Content-Security-Policy": csp, "X-Frame-Options": "DENY"})

        async def next_group(request: Request) -> Response:
            try:
                labeller = labeller_of(request.query_params.get("labeller"))
            except BadRanking as e:
                return error(400, str(e))
            waiting = self.store.pending(labeller)
            body: dict[str, Any] = {"group": None, "progress": self.store.progress(labeller)}
            if waiting:
                g = waiting[0]
                order = self.shown_order(labeller, g.id, len(g.candidates))
                body["group"] = {"id": g.id, "step": g.step, "prompt": prompt_turns(g.prompt),
                                 "candidates": [g.candidates[i] for i in order]}
            return JSONResponse(body, headers=plain)

        async def rank(request: Request) -> Response:
            raw = await request.body()
            if len(raw) > MAX_BODY:
                return error(413, "request too large")
            try:
                data = json.loads(raw)
            except ValueError:
                return error(400, "the body must be JSON: {group_id, labeller, ranking} or {group_id, labeller, "
                                  "skip: true}")
            if not isinstance(data, dict) or not isinstance(data.get("group_id"), str):
                return error(400, "give group_id (a string), labeller, and ranking or skip: true")
            gid = data["group_id"]
            try:
                labeller = labeller_of(data.get("labeller"))
                group = self.store.group(gid)
                if group is None:
                    raise UnknownGroup(gid)
                skipped = data.get("skip") is True
                ranking = None
                if not skipped:
                    m = len(group.candidates)
                    order = self.shown_order(labeller, gid, m)
                    if not isinstance(data.get("ranking"), list):
                        raise BadRanking("give ranking (shown positions best first, a list for a tie) or skip: true")
                    shown = normalize_ranking(data["ranking"], m)
                    ranking = [[order[p] for p in tied] for tied in shown]
                stored = self.store.add_ranking(gid, labeller, ranking, skipped=skipped)
            except BadRanking as e:
                return error(400, str(e))
            except UnknownGroup:
                return error(404, f"no group {gid!r}")
            except NotWaiting as e:
                return error(409, str(e))
            return JSONResponse({"ok": True, "skipped": skipped, "ranking": stored,
                                 "progress": self.store.progress(labeller)}, headers=plain)

        async def progress(request: Request) -> Response:
            name = str(request.query_params.get("labeller") or "").strip() or None
            return JSONResponse(self.store.progress(name), headers=plain)

        app = Starlette(routes=[Route("/", index), Route("/api/next", next_group),
                                Route("/api/rank", rank, methods=["POST"]), Route("/api/progress", progress)])
        return _Guard(app, self)

    # ---- lifetime ----
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/?token={self.token}"

    def start(self, timeout: float = 15.0) -> str:
        """Serve in a daemon thread -> the URL with the token (printed by the caller)."""
        if self._thread is not None:
            return self.url
        import uvicorn

        if not is_loopback(self.host):
            logger.warning("feedback page bound to %s, not to loopback: anyone who can reach this port and has "
                           "the token can rank; bind to 127.0.0.1 unless you mean it", self.host)
        family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off", loop="asyncio")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="grpokit-feedback-server")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the feedback page did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(5)
        self._server = self._thread = None


class _Guard:
    """ASGI wrapper: the token on every request, and a loopback Host header when bound to loopback."""

    def __init__(self, app: Any, server: FeedbackServer):
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            from starlette.datastructures import Headers, QueryParams
            from starlette.responses import PlainTextResponse

            headers = Headers(scope=scope)
            given = headers.get(TOKEN_HEADER.lower()) or QueryParams(scope.get("query_string", b"")).get("token") or ""
            why = ""
            if not secrets.compare_digest(given.encode(), self.server.token.encode()):
                why = "forbidden: this page needs the token printed when the run started (the URL with ?token=)"
            elif is_loopback(self.server.host) and _host_name(headers.get("host", "")) not in _LOOPBACK_NAMES:
                why = "forbidden: this page answers requests addressed to 127.0.0.1 or localhost only"
            if why:
                await PlainTextResponse(why, status_code=403, headers={"Cache-Control": "no-store"})(scope, receive,
                                                                                                     send)
                return
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1'; '[::1]:8000' -> '::1'."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host
