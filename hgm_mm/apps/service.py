"""The guide as a JSON HTTP service: `hgm-mm serve --index DIR`, on FastAPI served by uvicorn.

    hgm-mm serve --index catalogue --port 8080
    curl -F photo=@room.jpg -F text="warm Nordic light" -F k=10 http://127.0.0.1:8080/match
    hgm-mm match room.jpg --service http://127.0.0.1:8080

The matcher (model and index) is loaded once when the service starts and shared by every
request; requests run concurrently in FastAPI's thread pool (`Matcher.match` serialises only the
encoders). Routes, with their OpenAPI description at ``/openapi.json`` and pages at ``/docs``:

- ``POST /match``: multipart form with ``photo`` (JPEG, PNG or WebP) and/or ``text``, ``k``,
  ``filter`` (a JSON object, `hgm_mm.apps.serving.read_filter`) and ``events`` (the shopper's own
  events as a JSON list, `hgm_mm.apps.serving.read_events`) -> the result, `MatchResult.to_dict()`
  with each product's ``photo_url``.
- ``GET /products/{product_id}``: a product's metadata; ``GET /products/{product_id}/photo``: its photo.
- ``GET /health``: the model, the catalogue size and the version.

Request bodies over the upload limit are refused with 413 before they are read in full; every
refusal is a 4xx with ``{"error": "..."}`` saying what to send instead.
"""

import json
import logging
from pathlib import Path
from collections.abc import Callable
from typing import Any

from .serving import (DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES, MAX_K, RequestRefused, product_document,
                      read_events, read_filter, read_k, read_room_photo, read_wish, result_document)
from ..version import __version__

logger = logging.getLogger(__name__)

FORM_OVERHEAD_BYTES = 64 * 1024  # the text fields and multipart boundaries beside the photo


class _BodyLimit:
    """ASGI middleware: a request whose body exceeds `max_bytes` gets 413, whether it says its
    length up front (Content-Length) or not (chunked), before the application has read it all.

    Once the limit is passed the middleware answers itself and tells the application the client
    has gone, so its form parser stops; whatever the application sends after that is dropped.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        received = 0
        refused = False

        async def limited_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise

    async def _refuse(self, send) -> None:
        body = json.dumps({"error": f"This request is larger than {self.max_bytes / 2**20:.1f} MB. Send a "
                                    "smaller photo or save it at a lower quality."}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_service(matcher, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                   max_pixels: int = DEFAULT_MAX_PIXELS, max_k: int = MAX_K):
    """The FastAPI application serving one `Matcher`.

    Args:
        matcher: the loaded `Matcher` (``Matcher.load(index_dir)``), shared by all requests.
        max_upload_bytes: largest photo accepted, in bytes (the whole body may hold 64 KiB more).
        max_pixels: largest photo accepted, in width * height.
        max_k: most products one request may ask for.

    Returns:
        An ASGI application (FastAPI wrapped in the body-size limit); its FastAPI app is ``.app``.
    """
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.exceptions import HTTPException

    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels), ("max_k", max_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; expected a positive int")
    api = FastAPI(title="hgm_mm shopping guide", version=__version__,
                  description="Recognises the room in a photo or words and recommends the catalogue "
                              "products, and a set of them, that belong in it.")

    def photo_url_for(request: Request):
        return lambda product_id: str(request.url_for("product_photo", product_id=product_id).path)

    @api.exception_handler(RequestRefused)
    def refused(_request, refusal: RequestRefused):
        return JSONResponse({"error": refusal.message}, status_code=refusal.status)

    @api.exception_handler(HTTPException)  # unknown routes and methods: the same {"error"} shape
    def http_error(request, error: HTTPException):
        return JSONResponse({"error": f"{error.detail}: {request.method} {request.url.path}; the routes are "
                                      "described at /docs"}, status_code=error.status_code, headers=error.headers)

    @api.exception_handler(RequestValidationError)
    def malformed(_request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors())
        return JSONResponse({"error": f"malformed request ({problems}); the fields are described at /docs"},
                            status_code=400)

    @api.get("/health", summary="Whether the service is up, with its model and catalogue")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": matcher.model.config.name, "products": len(matcher.index),
                "version": __version__}

    @api.post("/match", summary="Scene, ranked products and a product set for a room photo and/or words")
    def match(request: Request,
              photo: UploadFile | None = File(None, description="the room photo: JPEG, PNG or WebP"),
              text: str | None = Form(None, description='what the shopper wants, in words ("a Nordic living room")'),
              k: str = Form("10", description=f"products to return, 1-{max_k}"),
              filter: str | None = Form(None, description='a JSON object: {"category": ["sofa"], "price": {"max": 800}}'),
              events: str | None = Form(None, description="the shopper's events, a JSON list of "
                                                          "{product_id, event, timestamp}")) -> dict[str, Any]:
        data = _read_upload(photo, max_upload_bytes) if photo is not None else b""
        # a browser form with no file chosen still sends an empty, nameless file part
        image = read_room_photo(data, max_pixels=max_pixels) if data or (photo and photo.filename) else None
        wish = read_wish(text)
        if image is None and wish is None:
            raise RequestRefused("Send a photo of the room, words saying what you want, or both.")
        profile = read_events(events, matcher.index)
        try:
            result = matcher.match(image=image, text=wish, profile=profile, k=read_k(k, max_k=max_k),
                                   filter=read_filter(filter))
        except ValueError as err:  # a filter on an attribute the catalogue does not have
            raise RequestRefused(str(err)) from None
        return result_document(result, photo_url_for(request))

    @api.get("/products/{product_id}", summary="One catalogue product's metadata")
    def product(request: Request, product_id: str) -> dict[str, Any]:
        if product_id not in matcher.index:
            raise RequestRefused(f"No product {product_id!r} in this catalogue.", 404)
        return product_document(matcher.index, product_id, photo_url_for(request))

    @api.get("/products/{product_id}/photo", name="product_photo", summary="One catalogue product's photo",
             response_class=FileResponse)
    def product_photo(product_id: str):
        image = matcher.index.metadata(product_id).get("image") if product_id in matcher.index else None
        if not isinstance(image, str) or not Path(image).is_file():
            raise RequestRefused(f"No photo for product {product_id!r}.", 404)
        return FileResponse(image, headers={"Cache-Control": "max-age=86400"})

    service = _BodyLimit(api, max_upload_bytes + FORM_OVERHEAD_BYTES)
    service.app = api
    return service


def _read_upload(upload, max_bytes: int) -> bytes:
    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RequestRefused(f"This photo is larger than {max_bytes / 2**20:.1f} MB. Send a smaller photo or "
                             "save it at a lower quality.", 413)
    return data


def serve(index_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8080, device: str | None = None,
          model=None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
          ready: Callable[[str], None] | None = None) -> None:
    """Loads the index folder's matcher once and serves it on `host`:`port` until interrupted.

    Args:
        index_dir: a folder written by `hgm-mm index`.
        port: the port; 0 picks a free one.
        device: torch device for the model (default: the Matcher's choice).
        model: query with this model instead of the folder's copy (refused unless it built the index).
        ready: called with the service's URL once it is listening.
    """
    import socket

    import uvicorn

    from ..ranking.matcher import Matcher

    matcher = Matcher.load(index_dir, device=device, model=model).warm_up()
    service = create_service(matcher, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels)
    # the socket is bound here, not by uvicorn, so that port 0 gives a port known before serving
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as err:
        listener.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}; choose another --port") from None
    listener.listen(2048)  # clients that connect before the server loop starts wait in the backlog
    bound_port = listener.getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound_port}"
    server = uvicorn.Server(uvicorn.Config(service, log_level="warning", lifespan="off"))
    logger.info("serving %s (%d products) on %s (API at %s/docs)", index_dir, len(matcher.index), url, url)
    if ready is not None:
        ready(url)
    server.run(sockets=[listener])


class ServiceClient:
    """Asks a running `hgm-mm serve` for matches; `hgm-mm match --service URL` goes through it.

        client = ServiceClient("http://127.0.0.1:8080")
        result = client.match(photo="room.jpg", text="warm Nordic light", k=10)   # a MatchResult

    Each product's ``metadata["image"]`` in the result is the URL of its photo on the service.
    """

    def __init__(self, url: str, *, timeout_s: float = 120.0) -> None:
        import httpx

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"service URL {url!r}; expected http://host:port of a running `hgm-mm serve`")
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def health(self) -> dict[str, Any]:
        """The service's /health: status, model, product count and version."""
        return self._request("GET", "/health")

    def match(self, photo: str | Path | bytes | None = None, text: str | None = None, *, k: int = 10,
              filter: dict[str, Any] | None = None, events: list[dict[str, Any]] | None = None):
        """`Matcher.match` on the service: photo (a path or the file's bytes) and/or words.

        `filter` takes ranges as ``(low, high)`` tuples, as `ProductIndex.search` does; `events` is a
        list of ``{"product_id", "event", "timestamp"}`` of the shopper the ranking is for.
        """
        from ..ranking.matcher import MatchResult

        fields: dict[str, str] = {"k": str(k)}
        if text:
            fields["text"] = text
        if filter:
            fields["filter"] = json.dumps({key: {"min": c[0], "max": c[1]} if isinstance(c, tuple) else c
                                           for key, c in filter.items()})
        if events:
            fields["events"] = json.dumps(events)
        files = None
        if photo is not None:
            data = photo if isinstance(photo, bytes) else Path(photo).read_bytes()
            files = {"photo": ("photo", data, "application/octet-stream")}
        document = self._request("POST", "/match", data=fields, files=files)
        for product in [*document["products"], *document["product_set"]]:
            product["metadata"]["image"] = self.url + product.pop("photo_url")
        return MatchResult.from_dict(document)

    def _request(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise ValueError(f"cannot reach the service at {self.url} ({type(err).__name__}: {err}); start it with "
                             "`hgm-mm serve --index DIR` or check the URL") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise ValueError(f"{self.url}{path} answered {response.status_code}: {message}")
        return response.json()
