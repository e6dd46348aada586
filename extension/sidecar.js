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

async function call(p, path, init = {}) {
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
