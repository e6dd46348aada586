// The paired sidecar: its address and pairing code (kept in chrome.storage.local, which only this
// extension reads), the sites it needs, and sending a site's cookies to it.

export const DEFAULT_ADDRESS = "http://127.0.0.1:7008";

/** `{address, code}`, or `null` before pairing. */
export async function pairing() {
  const { address, code } = await chrome.storage.local.get(["address", "code"]);
  return code ? { address: address || DEFAULT_ADDRESS, code } : null;
}

/** Only a loopback sidecar: the pairing code and the cookies never leave the machine. */
export function checkAddress(address) {
  const u = new URL(address);
  if (u.protocol !== "http:" || !["127.0.0.1", "localhost", "[::1]"].includes(u.hostname)) {
    throw new Error("the sidecar's address must be http://127.0.0.1:<port> (or localhost): it runs on this machine");
  }
  return u.origin;
}

const base64url = (bytes) =>
  btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");

/** What the paired sidecar answers `nonce` with: HMAC-SHA256 keyed with the code (as in the sidecar). */
export async function expectedProof(code, nonce) {
  const enc = new TextEncoder();
  const key = await crypto.subtle.importKey("raw", enc.encode(code), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return base64url(await crypto.subtle.sign("HMAC", key, enc.encode(`mcp-credentials sidecar proof\n${nonce}`)));
}

/**
 * Checks that the program at the address holds the pairing code before the code or any cookie is
 * sent to it: a program that took the sidecar's port while the sidecar was not running cannot
 * answer a fresh random challenge.
 */
export async function checkSidecar(p, fetchFn = fetch) {
  const nonce = base64url(crypto.getRandomValues(new Uint8Array(32)));
  const response = await fetchFn(checkAddress(p.address) + "/browser/hello", {
    headers: { "x-mcp-credentials-nonce": nonce },
    credentials: "omit",
    cache: "no-store",
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `the sidecar answered HTTP ${response.status}`);
  if (typeof body.proof !== "string" || body.proof !== (await expectedProof(p.code, nonce))) {
    throw new Error(
      `the program at ${p.address} does not hold this pairing code (not the paired sidecar, or a new code): nothing was sent`,
    );
  }
}

async function call(p, path, init = {}) {
  await checkSidecar(p);
  const response = await fetch(checkAddress(p.address) + path, {
    ...init,
    headers: { ...(init.headers || {}), authorization: `Bearer ${p.code}` },
    credentials: "omit",
    cache: "no-store",
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `the sidecar answered HTTP ${response.status}`);
  return body;
}

/** The sites the sidecar needs, with their states; kept for the service worker's next start. */
export async function sites(p) {
  const { sites } = await call(p, "/browser/sites");
  await chrome.storage.local.set({ sites });
  return sites;
}

/** Sends the cookies of credential `credential`. */
export function send(p, credential, cookies) {
  return call(p, "/browser/cookies", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ credential, cookies }),
  });
}
