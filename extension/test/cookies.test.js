import { test } from "node:test";
import assert from "node:assert/strict";

import { cookiesFor, domainMatches, forSidecar, hostPermission, pathMatches, wouldSend } from "../cookies.js";

const cookie = (over) => ({ name: "sid", value: "v", domain: "wiki.example.com", hostOnly: true, path: "/", secure: false, session: true, ...over });

test("a host-only cookie goes to its host only", () => {
  assert.ok(wouldSend(cookie({}), "https://wiki.example.com/mcp"));
  assert.ok(!wouldSend(cookie({}), "https://a.wiki.example.com/mcp"));
  assert.ok(!wouldSend(cookie({}), "https://example.com/"));
});

test("a domain cookie goes to the domain and its subdomains, never to a look-alike", () => {
  const c = cookie({ domain: ".example.com", hostOnly: false });
  assert.ok(wouldSend(c, "https://example.com/"));
  assert.ok(wouldSend(c, "https://wiki.example.com/mcp"));
  assert.ok(!wouldSend(c, "https://badexample.com/"));
  assert.ok(!wouldSend(c, "https://example.com.evil.test/"));
  assert.ok(domainMatches({ domain: "Example.COM", hostOnly: false }, "WIKI.example.com"));
});

test("paths match on segment boundaries", () => {
  assert.ok(pathMatches("/", "/anything"));
  assert.ok(pathMatches("/api", "/api"));
  assert.ok(pathMatches("/api", "/api/mcp"));
  assert.ok(pathMatches("/api/", "/api/mcp"));
  assert.ok(!pathMatches("/api", "/apiary"));
  assert.ok(!pathMatches("/admin", "/mcp"));
  assert.ok(!wouldSend(cookie({ path: "/admin" }), "https://wiki.example.com/mcp"));
});

test("a secure cookie goes over https or to loopback only", () => {
  const c = cookie({ secure: true });
  assert.ok(wouldSend(c, "https://wiki.example.com/"));
  assert.ok(!wouldSend(c, "http://wiki.example.com/"));
  const local = cookie({ secure: true, domain: "localhost" });
  assert.ok(wouldSend(local, "http://localhost:8080/mcp"));
  assert.ok(wouldSend(cookie({ secure: true, domain: "127.0.0.1" }), "http://127.0.0.1:9/"));
});

test("an IP address has no subdomains", () => {
  assert.ok(!wouldSend(cookie({ domain: "0.0.1", hostOnly: false }), "http://127.0.0.1/"));
});

test("ports do not separate cookies, as in browsers", () => {
  assert.ok(wouldSend(cookie({ domain: "localhost" }), "http://localhost:1234/mcp"));
});

test("the cookies for a URL: only matching ones, longest path first", () => {
  const all = [
    cookie({ name: "a", path: "/" }),
    cookie({ name: "b", path: "/mcp" }),
    cookie({ name: "c", domain: "other.example" }),
    cookie({ name: "d", path: "/admin" }),
  ];
  assert.deepEqual(cookiesFor(all, "https://wiki.example.com/mcp").map((c) => c.name), ["b", "a"]);
});

test("what the sidecar gets: where the cookie goes and when it expires, nothing else", () => {
  const chrome = { ...cookie({ session: false, expirationDate: 2000000000.5 }), storeId: "0", sameSite: "lax", httpOnly: true };
  assert.deepEqual(forSidecar(chrome), {
    name: "sid", value: "v", domain: "wiki.example.com", hostOnly: true, path: "/", secure: false, session: false,
    expirationDate: 2000000000.5,
  });
  assert.equal(forSidecar(cookie({})).expirationDate, undefined);
});

test("the host permission of a site ignores port and path", () => {
  assert.equal(hostPermission("https://wiki.example.com/api/mcp"), "https://wiki.example.com/*");
  assert.equal(hostPermission("http://localhost:8080/mcp"), "http://localhost/*");
});
