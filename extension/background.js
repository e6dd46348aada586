// The service worker: sends each needed site's cookies to the paired sidecar after pairing, when the
// popup asks, whenever a cookie the browser would send to one of those sites changes, and every 5
// minutes (a change made while the sidecar was down). Only sites the sidecar lists and the person
// granted access to are ever read.

import { cookiesFor, forSidecar, hostPermission, wouldSend } from "./cookies.js";
import * as sidecar from "./sidecar.js";

/** Sends the cookies of `site` (its credential, url), if the person granted access to it. */
async function sendSite(p, site) {
  const origins = [hostPermission(site.url)];
  if (!(await chrome.permissions.contains({ origins }))) return { credential: site.credential, skipped: "no access" };
  const all = await chrome.cookies.getAll({ url: site.url });
  const cookies = cookiesFor(all, site.url).map(forSidecar);
  await sidecar.send(p, site.credential, cookies);
  return { credential: site.credential, sent: cookies.length };
}

/** Asks the sidecar what it needs and sends every granted site's cookies. */
async function syncAll() {
  const p = await sidecar.pairing();
  if (!p) return { error: "not paired" };
  const sites = await sidecar.sites(p);
  const results = [];
  for (const site of sites) {
    try {
      results.push(await sendSite(p, site));
    } catch (e) {
      results.push({ credential: site.credential, error: String(e.message || e) });
    }
  }
  return { results, sites: await sidecar.sites(p) };
}

// Changes come in bursts (a sign-in sets several cookies, a sign-out removes them): one send per
// site after the burst.
const pending = new Map();
chrome.cookies.onChanged.addListener(async ({ cookie }) => {
  const { sites } = await chrome.storage.local.get("sites");
  for (const site of sites || []) {
    if (!wouldSend(cookie, site.url)) continue;
    clearTimeout(pending.get(site.credential));
    pending.set(
      site.credential,
      setTimeout(async () => {
        pending.delete(site.credential);
        const p = await sidecar.pairing();
        if (p) await sendSite(p, site).catch((e) => console.warn("mcp-credentials:", site.credential, e.message));
      }, 300),
    );
  }
});

chrome.runtime.onMessage.addListener((message, _sender, reply) => {
  if (message?.type === "sync") {
    syncAll().then(reply, (e) => reply({ error: String(e.message || e) }));
    return true;
  }
});

chrome.runtime.onStartup.addListener(() => syncAll().catch(() => {}));
// A change sent while the sidecar was not running is not lost: every few minutes the sites are
// sent again (the sidecar writes nothing when they are unchanged).
chrome.alarms.create("sync", { periodInMinutes: 5 });
chrome.alarms.onAlarm.addListener((alarm) => {
  if (alarm.name === "sync") syncAll().catch(() => {});
});
chrome.permissions.onAdded.addListener(() => syncAll().catch(() => {}));
