"""A person at their browser, for the browser-session test: Debian's Chromium, headless (the new
headless mode, which runs extensions), with the unpacked extension of extension/ loaded, driven by
Playwright (its Python package, no browser download: the system's chromium is used).

python3 extension.py [--as-shipped] <site-url> <extension-dir>, then one command a line on stdin, each answered by
one line on stdout ("ok <details>" or "error <why>"):

  sign-in                 signs in on the site's login form (user alice)
  sign-out                follows the site's "Sign out" link
  pair <address> <code>   pairs the extension in its popup (the code comes on stdin, not argv)
  popup                   opens the popup; answers each site's line, as JSON

The permission prompt for the site cannot be clicked in headless Chromium, so the test build of the
extension (a copy in a temporary directory) declares the site in `host_permissions`, which an
unpacked extension gets at install: the only difference from extension/ is that manifest line.
Everything else (pairing, the cookie matching, onChanged, the popup) is the extension's own code.
With --as-shipped the manifest is left as it is: the extension has access to no site.
"""
import json
import os
import shutil
import sys
import tempfile
import urllib.parse

from playwright.sync_api import sync_playwright

as_shipped = "--as-shipped" in sys.argv
site, source = [a for a in sys.argv[1:] if not a.startswith("--")][:2]
chromium = shutil.which("chromium") or shutil.which("chromium-browser")
if chromium is None:
    sys.exit("chromium is not installed (apt-get install chromium)")

work = tempfile.mkdtemp(prefix="mcp-extension-")
extension = os.path.join(work, "extension")
shutil.copytree(source, extension, ignore=shutil.ignore_patterns("test", "node_modules", "package*.json"))
if not as_shipped:
    manifest_file = os.path.join(extension, "manifest.json")
    manifest = json.load(open(manifest_file))
    u = urllib.parse.urlsplit(site)
    manifest["host_permissions"] = [f"{u.scheme}://{u.hostname}/*"]
    json.dump(manifest, open(manifest_file, "w"))


def answer(line):
    print(line, flush=True)


def popup_lines(popup):
    popup.wait_for_selector("#sites li", timeout=20000)
    return [
        {"credential": li.get_attribute("data-credential"), "text": li.inner_text()}
        for li in popup.query_selector_all("#sites li")
    ]


with sync_playwright() as p:
    context = p.chromium.launch_persistent_context(
        os.path.join(work, "profile"),
        executable_path=chromium,
        headless=True,
        args=[
            "--headless=new",
            "--no-sandbox",
            f"--disable-extensions-except={extension}",
            f"--load-extension={extension}",
        ],
    )
    worker = context.service_workers[0] if context.service_workers else context.wait_for_event("serviceworker", timeout=30000)
    extension_id = worker.url.split("/")[2]
    print(f"extension {extension_id} loaded", file=sys.stderr, flush=True)
    page = context.new_page()
    for line in sys.stdin:
        command, *args = line.split()
        try:
            if command == "sign-in":
                page.goto(site + "/")
                page.fill("input[name=user]", "alice")
                page.fill("input[name=password]", "correct horse")
                page.click("button[type=submit]")
                page.wait_for_load_state()
                text = page.inner_text("body")
                answer("ok signed in" if "Signed in as alice" in text else f"error the site says {text!r}")
            elif command == "sign-out":
                page.goto(site + "/")
                page.click("text=Sign out")
                page.wait_for_load_state()
                answer("ok signed out")
            elif command == "pair":
                popup = context.new_page()
                popup.goto(f"chrome-extension://{extension_id}/popup.html")
                popup.fill("#address", args[0])
                popup.fill("#code", args[1])
                popup.click("#pair-button")
                lines = popup_lines(popup)
                error = popup.inner_text("#error")
                popup.close()
                answer(f"error {error}" if error else "ok " + json.dumps(lines))
            elif command == "popup":
                popup = context.new_page()
                popup.goto(f"chrome-extension://{extension_id}/popup.html")
                lines = popup_lines(popup)
                popup.close()
                answer("ok " + json.dumps(lines))
            else:
                answer(f"error unknown command {command}")
        except Exception as e:  # the test reads the answer; the browser stays up
            answer(f"error {type(e).__name__}: {e}".replace("\n", " "))
    context.close()
shutil.rmtree(work, ignore_errors=True)
