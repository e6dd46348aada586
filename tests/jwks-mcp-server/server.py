"""An MCP server from the official Python SDK (MCPServer, streamable HTTP at /mcp) that accepts
only JWTs minted for it by the mcp-credentials operator, validated the standard way: PyJWT's
PyJWKClient fetches the operator's JWKS (found through the issuer's
/.well-known/openid-configuration) and checks the signature, `iss`, `aud` and `exp`.

python3 server.py <issuer> [<namespace>]   prints the port it listens on (127.0.0.1), then serves
until killed. Its audience is its own URL, http://127.0.0.1:<port>/mcp. With <namespace>, it also
accepts only tokens minted in that namespace: the claim `mcpcredentials.dev/namespace`, which the
operator sets and no McpCredential can, must name it (what the README asks of a shared upstream).
"""
import json
import socket
import sys
import urllib.request

import jwt
import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer

ISSUER = sys.argv[1]
NAMESPACE = sys.argv[2] if len(sys.argv) > 2 else None
NAMESPACE_CLAIM = "mcpcredentials.dev/namespace"
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
PORT = sock.getsockname()[1]
AUDIENCE = f"http://127.0.0.1:{PORT}/mcp"


class OperatorJwks:
    """A TokenVerifier: the operator's JWKS, discovered from its issuer on first use."""

    def __init__(self):
        self.client = None

    def jwks(self):
        if self.client is None:
            with urllib.request.urlopen(f"{ISSUER}/.well-known/openid-configuration") as r:
                config = json.load(r)
            if config["issuer"] != ISSUER:
                raise RuntimeError(f"the discovery document names issuer {config['issuer']!r}")
            self.client = jwt.PyJWKClient(config["jwks_uri"])
        return self.client

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            key = self.jwks().get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=["ES256", "RS256"],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["iss", "sub", "aud", "iat", "exp", "jti"]},
            )
        except jwt.PyJWTError as e:
            print(f"rejected a token: {type(e).__name__}", file=sys.stderr, flush=True)
            return None
        if NAMESPACE is not None and claims.get(NAMESPACE_CLAIM) != NAMESPACE:
            print("rejected a token: minted in another namespace", file=sys.stderr, flush=True)
            return None
        return AccessToken(
            token=token,
            client_id=claims["sub"],
            scopes=[],
            expires_at=claims["exp"],
            resource=AUDIENCE,
            subject=claims["sub"],
            claims=claims,
        )


server = MCPServer(
    "jwks-protected",
    token_verifier=OperatorJwks(),
    auth=AuthSettings(issuer_url=ISSUER, resource_server_url=AUDIENCE, validate_token_resource=True),
)


@server.tool()
def whoami() -> str:
    """The subject of the caller's token."""
    token = get_access_token()
    return token.subject if token else "anonymous"


# Listening before the port is printed, so that a client connecting at once is queued, not refused.
sock.listen(128)
print(PORT, flush=True)
config = uvicorn.Config(server.streamable_http_app(), log_level="warning")
uvicorn.Server(config).run(sockets=[sock])
