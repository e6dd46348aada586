"""The client under test for the MCP conformance suite's client `auth/*` scenarios: the product.

The suite runs `python3 client.py <server-url>` with MCP_CONFORMANCE_SCENARIO (and, for scenarios
with pre-registered clients, MCP_CONFORMANCE_CONTEXT) set. This adapter does what a person does with
mcp-credentials, and nothing an MCP client does itself:

1. writes a standalone McpCredential for <server-url> (the source chosen from the scenario's context:
   client credentials with the given secret or key, else a sign-in with `grant: authorizationCode`,
   with the pre-registered client when the context names one) and the secret files it references;
2. starts `mcp-credentials-sidecar standalone` on free loopback ports;
3. for a sign-in credential, runs `mcp-credentials-sidecar login`, whose browser is
   `follow-redirects` (the suite's authorization server approves at once);
4. connects the official MCP Python SDK, with no credential of its own, to the sidecar's
   http://127.0.0.1:<port>/conformance, and initializes, lists tools and calls `test-tool`;
5. when the calls fail and the sidecar's status page says the credential "needs more consent" (an
   upstream's 403 insufficient_scope: a step-up), runs `login` again, as the page says, and repeats
   the calls (at most MAX_STEP_UPS times).

Exit status 0 when the MCP calls succeeded. Everything the sidecar logs goes to stderr, which the
suite keeps in its results directory.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import anyio
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

HERE = Path(__file__).resolve().parent
NAME = "conformance"
# How long the client waits for the sidecar to start, for `login`, for the credential, and for the
# MCP calls: together under the suite's --timeout (90 s, tests/conformance/run), so the client
# always stops its sidecar itself.
READY_WAIT_SECONDS = 25
# Sign-ins for more consent the client does, as a person would: the sidecar asks for at most 3.
MAX_STEP_UPS = 3


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), "client.py:", *parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def credential(scenario: str, ctx: dict, url: str, secrets: Path) -> tuple[dict, bool]:
    """The McpCredential spec for this scenario, and whether it needs a sign-in."""

    def secret(name: str, key: str, value: str) -> dict:
        (secrets / name).mkdir(parents=True, exist_ok=True)
        path = secrets / name / key
        path.write_text(value)
        path.chmod(0o600)
        return {"name": name, "key": key}

    if "private_key_pem" in ctx:  # auth/client-credentials-jwt
        oauth2 = {
            "grant": "clientCredentials",
            "clientId": ctx["client_id"],
            "clientAuth": "privateKeyJwt",
            "privateKey": secret("client", "key.pem", ctx["private_key_pem"]),
        }
        return {"upstream": url, "source": {"oauth2": oauth2}}, False
    if scenario.startswith("auth/client-credentials"):  # -basic
        oauth2 = {
            "grant": "clientCredentials",
            "clientId": ctx["client_id"],
            "clientAuth": "clientSecretBasic",
            "clientSecret": secret("client", "secret", ctx["client_secret"]),
        }
        return {"upstream": url, "source": {"oauth2": oauth2}}, False
    if "idp_id_token" in ctx:  # auth/cross-app-access-complete-flow
        # The person's ID token from the enterprise IdP, exchanged there for an ID-JAG, redeemed
        # with the JWT-bearer grant at the MCP server's (discovered) authorization server.
        exchange = {
            "grant": "jwtBearer",
            "clientId": ctx["client_id"],
            "clientSecret": secret("client", "secret", ctx["client_secret"]),
            "subject": {"secretKeyRef": secret("idp", "id-token", ctx["idp_id_token"])},
            "crossAppAccess": {
                "tokenUrl": ctx["idp_token_endpoint"],
                "clientId": ctx["idp_client_id"],
            },
        }
        return {"upstream": url, "source": {"tokenExchange": exchange}}, False
    # Every other scenario is a person signing in with nothing but the server's URL, or with the
    # client the authorization server's operator registered for them (auth/pre-registration).
    # The Client ID Metadata Document URL the suite's reference client uses: its authorization
    # servers accept it without fetching it; the sign-in uses it only where the server advertises
    # client_id_metadata_document_supported, and registers dynamically elsewhere.
    oauth2 = {
        "grant": "authorizationCode",
        "signIn": {"clientMetadataUrl": "https://conformance-test.local/client-metadata.json"},
    }
    if "client_id" in ctx:
        oauth2["clientId"] = ctx["client_id"]
        if "client_secret" in ctx:
            oauth2["clientSecret"] = secret("client", "secret", ctx["client_secret"])
    return {"upstream": url, "source": {"oauth2": oauth2}}, True


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def needs_more_consent(admin: int) -> bool:
    """Whether the sidecar's status page says a person must sign in for more scopes."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as r:
            return "needs more consent" in r.read().decode()
    except OSError:
        return False


def wait_for(url: str, want: int, sidecar: subprocess.Popen, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sidecar.poll() is not None:
            raise SystemExit(f"client.py: the sidecar exited with status {sidecar.returncode}")
        if get(url) == want:
            return True
        time.sleep(0.1)
    return False


async def use(url: str) -> None:
    with anyio.fail_after(READY_WAIT_SECONDS):
        await calls(url)


async def calls(url: str) -> None:
    async with streamable_http_client(url) as streams:
        async with ClientSession(streams[0], streams[1]) as session:
            await session.initialize()
            tools = await session.list_tools()
            log("tools:", [t.name for t in tools.tools])
            result = await session.call_tool("test-tool", {})
            if result.is_error:
                raise SystemExit(f"client.py: test-tool failed: {result.content}")
            log("test-tool:", [getattr(c, "text", c) for c in result.content])


def main() -> int:
    log("started")
    # The suite ends a client that runs past its timeout with SIGTERM: stop the sidecar then too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    server_url = sys.argv[-1]
    scenario = os.environ.get("MCP_CONFORMANCE_SCENARIO", "")
    ctx = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
    sidecar_bin = os.environ.get("MCP_CONFORMANCE_SIDECAR") or str(
        HERE.parent.parent / "target" / "debug" / "mcp-credentials-sidecar"
    )
    work = Path(tempfile.mkdtemp(prefix="mcp-conformance-"))
    secrets = work / "secrets"
    secrets.mkdir(mode=0o700)
    spec, sign_in = credential(scenario, ctx, server_url, secrets)
    doc = {
        "apiVersion": "mcpcredentials.dev/v1alpha1",
        "kind": "McpCredential",
        "metadata": {"name": NAME},
        "spec": spec,
    }
    config = work / "mcpcredentials.yaml"
    config.write_text(json.dumps(doc, indent=2))  # JSON is YAML
    log("scenario", scenario, "credential:", json.dumps(spec))

    listen, admin = free_port(), free_port()
    env = dict(
        os.environ,
        MCP_SIDECAR_LISTEN=f"127.0.0.1:{listen}",
        MCP_SIDECAR_ADMIN_LISTEN=f"127.0.0.1:{admin}",
        # The suite's servers are on localhost over plain http.
        MCP_SIDECAR_DISCOVERY_ALLOW_LOOPBACK="true",
        RUST_LOG=os.environ.get("RUST_LOG", "info"),
        NO_COLOR="1",
    )
    sidecar = subprocess.Popen(
        [sidecar_bin, "standalone", str(config), str(secrets)], env=env, stdout=sys.stderr
    )
    try:
        if not wait_for(f"http://127.0.0.1:{admin}/healthz", 200, sidecar, READY_WAIT_SECONDS):
            log("the sidecar's /healthz did not answer 200")
            return 1
        def login() -> bool:
            browser = HERE / "follow-redirects"
            run = subprocess.run(
                [sidecar_bin, "login", NAME, str(config), str(secrets), "--browser-command", str(browser)],
                env=env,
                stdout=sys.stderr,
                timeout=READY_WAIT_SECONDS,
            )
            log("login exited with", run.returncode)
            return run.returncode == 0

        if sign_in and not login():
            return 1
        if not wait_for(f"http://127.0.0.1:{admin}/readyz", 200, sidecar, READY_WAIT_SECONDS):
            log("the sidecar did not become ready (no credential)")
            # Still try the MCP calls: what the agent sees is the product's answer.
        step_ups = 0
        while True:
            try:
                anyio.run(use, f"http://127.0.0.1:{listen}/{NAME}")
                return 0
            except Exception as e:  # noqa: BLE001 - a step-up may cure it, else the log says why
                if not (sign_in and step_ups < MAX_STEP_UPS and needs_more_consent(admin)):
                    raise
                step_ups += 1
                log("the calls failed:", repr(e), "- the status page asks for more consent: signing in again")
                if not login():
                    return 1
                # The new sign-in is served once the status page no longer asks for it.
                deadline = time.monotonic() + READY_WAIT_SECONDS
                while needs_more_consent(admin) and time.monotonic() < deadline:
                    time.sleep(0.1)
    except Exception as e:  # noqa: BLE001 - the suite wants an exit status, the log says why
        log("failed:", repr(e))
        return 1
    finally:
        sidecar.terminate()
        try:
            sidecar.wait(10)
        except subprocess.TimeoutExpired:
            sidecar.kill()


if __name__ == "__main__":
    sys.exit(main())
