// Which cookies the browser would send to a URL (RFC 6265 §5.1.3 domain match, §5.1.4 path match,
// Secure only over https or to loopback), for the cookies chrome.cookies gives. Pure functions:
// test/cookies.test.js runs them under `node --test`.

/** Whether `host` is loopback, where Chromium treats plain http as secure. */
export function isLoopback(host) {
  return host === "localhost" || host === "[::1]" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

/** RFC 6265 domain match of a cookie (`domain` with an optional leading dot, `hostOnly`) and `host`. */
export function domainMatches(cookie, host) {
  const domain = cookie.domain.replace(/^\./, "").toLowerCase();
  host = host.toLowerCase();
  if (host === domain) return true;
  // A host-only cookie goes to its host alone; an IP address has no subdomains.
  return !cookie.hostOnly && host.endsWith("." + domain) && !/^[\d.]+$/.test(host);
}

/** RFC 6265 path match of a cookie path and a request path. */
export function pathMatches(cookiePath, requestPath) {
  const c = cookiePath || "/";
  if (requestPath === c) return true;
  return requestPath.startsWith(c) && (c.endsWith("/") || requestPath[c.length] === "/");
}

/** Whether the browser would send `cookie` to `url`. */
export function wouldSend(cookie, url) {
  const u = new URL(url);
  if (!domainMatches(cookie, u.hostname)) return false;
  if (!pathMatches(cookie.path, u.pathname)) return false;
  return !cookie.secure || u.protocol === "https:" || isLoopback(u.hostname);
}

/** The cookies of `cookies` the browser would send to `url`, longest path first (RFC 6265 §5.4). */
export function cookiesFor(cookies, url) {
  return cookies
    .filter((c) => wouldSend(c, url))
    .sort((a, b) => (b.path || "/").length - (a.path || "/").length);
}

/** A cookie as the sidecar takes it: chrome.cookies.Cookie's fields that say where it goes. */
export function forSidecar(c) {
  return {
    name: c.name,
    value: c.value,
    domain: c.domain,
    hostOnly: Boolean(c.hostOnly),
    path: c.path || "/",
    secure: Boolean(c.secure),
    session: Boolean(c.session),
    ...(c.session || c.expirationDate === undefined ? {} : { expirationDate: c.expirationDate }),
  };
}

/** The host permission pattern that lets the extension read the cookies of `url`. */
export function hostPermission(url) {
  const u = new URL(url);
  return `${u.protocol}//${u.hostname}/*`;
}
