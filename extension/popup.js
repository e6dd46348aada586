// The popup: pairing, and each site's state as the sidecar sees it, with a button that grants
// access to a site (the browser asks the person) and one that opens it to sign in again.

import { hostPermission } from "./cookies.js";
import * as sidecar from "./sidecar.js";

const $ = (id) => document.getElementById(id);

function show(error) {
  $("error").textContent = error || "";
}

async function render(sites) {
  const list = $("sites");
  list.replaceChildren();
  for (const site of sites || []) {
    const origins = [hostPermission(site.url)];
    const granted = await chrome.permissions.contains({ origins });
    const li = document.createElement("li");
    li.dataset.credential = site.credential;
    const state = document.createElement("span");
    state.className = `state ${site.state === "live" ? "live" : ""}`;
    state.textContent = granted ? site.state : "no access yet";
    li.append(`${site.site} (${site.credential}): `, state);
    if (site.message && site.state !== "live") {
      const m = document.createElement("span");
      m.className = "message";
      m.textContent = site.message;
      li.append(m);
    }
    const button = document.createElement("button");
    if (!granted) {
      button.textContent = `Allow access to ${site.site}`;
      // A user gesture: the browser shows the person which site is asked for.
      button.onclick = async () => {
        if (await chrome.permissions.request({ origins })) await sync();
      };
    } else {
      button.textContent = site.state === "live" ? "Open" : "Sign in again";
      button.onclick = () => chrome.tabs.create({ url: site.signInUrl });
    }
    li.append(" ", button);
    list.append(li);
  }
}

async function sync() {
  const answer = await chrome.runtime.sendMessage({ type: "sync" });
  if (answer?.error) return show(answer.error);
  const failed = (answer.results || []).filter((r) => r.error);
  show(failed.map((r) => `${r.credential}: ${r.error}`).join("; "));
  await render(answer.sites);
}

$("pair").onsubmit = async (event) => {
  event.preventDefault();
  try {
    const address = sidecar.checkAddress($("address").value.trim());
    const code = $("code").value.trim();
    // Checked against the sidecar before it is kept.
    await sidecar.sites({ address, code });
    await chrome.storage.local.set({ address, code });
    $("code").value = "";
    $("pair").hidden = true;
    await sync();
  } catch (e) {
    show(`pairing failed: ${e.message}`);
  }
};

(async () => {
  const p = await sidecar.pairing();
  if (!p) return;
  $("address").value = p.address;
  $("pair").hidden = true;
  await sync().catch((e) => show(e.message));
})();
