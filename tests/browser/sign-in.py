"""A person at a browser, for the sign-in tests: Debian's Chromium, headless, driven by Playwright
(its Python package, no browser download: the system's chromium is used). It opens the
authorization URL, signs in on oidc-provider's login page (any name and password), answers its
consent page, and follows the redirect to the loopback listener of `mcp-credentials-sidecar login`.

python3 sign-in.py [--deny] <authorization-url>   exit 0 when the listener's page says "Signed in"
(or, with --deny, when consent was refused and the listener says the sign-in failed).
python3 sign-in.py --status-page <status-page-url>  the same, started with the "Sign in" button of
the standalone sidecar's status page.
"""
import shutil
import sys

from playwright.sync_api import sync_playwright

deny = "--deny" in sys.argv
url = [a for a in sys.argv[1:] if not a.startswith("--")][0]
chromium = shutil.which("chromium") or shutil.which("chromium-browser")
if chromium is None:
    sys.exit("chromium is not installed (apt-get install chromium)")

with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
    page = browser.new_page()
    page.goto(url)
    if "--status-page" in sys.argv:
        # The person presses the page's button, which sends the browser to the authorization server.
        page.click("button:has-text('Sign in')")
        page.wait_for_load_state()
    for _ in range(5):
        # What the person saw, for a failing test's output (no secrets: the code is single use).
        print(f"page: {page.url.split('?')[0]} {page.title()!r}", file=sys.stderr)
        if page.url.startswith("http://127.0.0.1") and "/callback" in page.url:
            break
        if page.locator("input[name=login]").count():
            page.fill("input[name=login]", "alice")
            page.fill("input[name=password]", "correct horse")
            page.click("button[type=submit]")
        elif deny and page.locator("a", has_text="Cancel").count():
            page.click("a:has-text('Cancel')")
        elif page.locator("button[type=submit]").count():
            page.click("button[type=submit]")
        page.wait_for_load_state()
    text = page.inner_text("body")
    browser.close()
print(text, file=sys.stderr)
sys.exit(0 if ("Signed in" in text) != deny else 1)
