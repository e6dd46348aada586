import { test } from "node:test";
import assert from "node:assert/strict";

import { checkAddress } from "../sidecar.js";

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
