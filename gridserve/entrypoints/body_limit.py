"""--max-request-bytes: a request body larger than the limit is refused with 413 as soon as its size is known
(Content-Length up front, or the running count of a chunked body), before it is buffered, parsed or tokenized."""

import orjson


class BodyLimit:
    """ASGI middleware around the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        if length is not None:  # the server holds the body to its declared length
            return await self.app(scope, receive, send)
        # A chunked body: read it here, stopping at the limit, and hand it on whole (the app would buffer it anyway).
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = orjson.dumps({"error": {
            "message": f"the request body is larger than --max-request-bytes ({self.max_bytes} bytes)",
            "type": "invalid_request_error", "param": None, "code": "request_too_large"}})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
