import { test } from "node:test";
import assert from "node:assert/strict";

import { checkAddress, checkSidecar, expectedProof } from "../sidecar.js";

test("the sidecar's address is a loopback http origin", () => {
  assert.equal(checkAddress("http://127.0.0.1:7008"), "http://127.0.0.1:7008");
  assert.equal(checkAddress("http://localhost:7008/browser"), "http://localhost:7008");
  assert.equal(checkAddress("http://[::1]:7008"), "http://[::1]:7008");
});

test("the pairing code and the cookies never go to another machine", () => {
  for (const address of [
    "http://192.168.1.5:7008",
    "https://127.0.0.1:7008",
    "http://127.0.0.1.evil.example:7008",
    "http://localhost.evil.example",
    "http://user@evil.example",
    "file:///tmp/x",
  ]) {
    assert.throws(() => checkAddress(address), /this machine/, address);
  }
  assert.throws(() => checkAddress("not a url"));
});

const code = "pairing-code-for-tests-0123456789abcdef";

test("the proof expected of the sidecar is the one it computes", async () => {
  // The value of core's the_sidecars_proof_is_hmac_sha256_of_the_nonce_keyed_with_the_code.
  assert.equal(await expectedProof(code, "nonce-1"), "OwQLWevBI9dJk05kgrPCMALOx1nk3Ks05YyyFYcbK_8");
});

/** A program at the sidecar's address that answers the challenge with `prove(nonce)`. */
function program(prove) {
  const asked = [];
  const fetchFn = async (url, init) => {
    asked.push({ url, headers: init.headers });
    const nonce = init.headers["x-mcp-credentials-nonce"];
    return { ok: true, status: 200, json: async () => ({ proof: await prove(nonce) }) };
  };
  return { asked, fetchFn };
}

test("the paired sidecar passes the check with a fresh challenge each time", async () => {
  const sidecar = program((nonce) => expectedProof(code, nonce));
  const p = { address: "http://127.0.0.1:7008", code };
  await checkSidecar(p, sidecar.fetchFn);
  await checkSidecar(p, sidecar.fetchFn);
  assert.equal(sidecar.asked[0].url, "http://127.0.0.1:7008/browser/hello");
  const [a, b] = sidecar.asked.map((r) => r.headers["x-mcp-credentials-nonce"]);
  assert.ok(a.length >= 43 && a !== b);
  // The check itself never carries the code.
  assert.ok(!JSON.stringify(sidecar.asked).includes(code));
});

test("a program without the code, or replaying an old proof, is refused", async () => {
  const p = { address: "http://127.0.0.1:7008", code };
  const impostor = program(async () => "made-up");
  await assert.rejects(checkSidecar(p, impostor.fetchFn), /does not hold this pairing code/);
  const old = await expectedProof(code, "an-earlier-nonce-0123456789");
  await assert.rejects(checkSidecar(p, program(async () => old).fetchFn), /does not hold this pairing code/);
  const otherCode = program((nonce) => expectedProof("another code", nonce));
  await assert.rejects(checkSidecar(p, otherCode.fetchFn), /nothing was sent/);
});
