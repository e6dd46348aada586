"""A legacy HTTP+SSE (2024-11-05) MCP server from the official Python SDK, behind an API-key check.

python3 server.py <api-key>   prints the port it listens on (127.0.0.1), then serves until killed.
"""
import socket
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

KEY = sys.argv[1].encode()
server = MCPServer("legacy-sse")


@server.tool()
def echo(text: str) -> str:
    """Send the text back."""
    return text


def require_key(app):
    """The upstream's own credential check: 401 unless X-API-Key is the expected key."""

    async def checked(scope, receive, send):
        if scope["type"] == "http" and dict(scope["headers"]).get(b"x-api-key") != KEY:
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"missing or wrong X-API-Key\n"})
            return
        await app(scope, receive, send)

    return checked


sock = socket.socket()
sock.bind(("127.0.0.1", 0))
# Listening before the port is printed: a connection made at once is queued, not refused (the test
# failed on a loaded machine with the sidecar's 502 while uvicorn was still starting).
sock.listen(128)
print(sock.getsockname()[1], flush=True)
config = uvicorn.Config(require_key(server.sse_app()), log_level="warning")
uvicorn.Server(config).run(sockets=[sock])
