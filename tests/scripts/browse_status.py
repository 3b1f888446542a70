# Drives headless Chromium (Debian's `chromium`) over the DevTools protocol on a pipe
# (--remote-debugging-pipe: JSON messages ending in NUL, browser reads fd 3, writes fd 4) to
# watch privlink's status page in ONE page load:
#   browse_status.py URL ENDPOINT SCREENSHOT_DIR
# It waits until the endpoint's row shows Approved with one open connection listed, takes a
# screenshot, prints "seen Approved", waits for a line on stdin (the test closes the connection
# and stops the agent), waits until the same page — refreshing itself — shows Disconnected and
# no connection, takes a second screenshot and prints "seen Disconnected". Every wait has a deadline; on one it prints what the page showed and
# exits 1.
import base64, json, os, selectors, shutil, subprocess, sys, tempfile, time

url, endpoint, shots = sys.argv[1], sys.argv[2], sys.argv[3]
WAIT = 20.0

to_browser_r, to_browser_w = os.pipe()
from_browser_r, from_browser_w = os.pipe()
profile = tempfile.mkdtemp(prefix="privlink-chromium-")


def child_fds():
    # The browser reads commands on fd 3 and writes answers on fd 4. Copy both ends out of
    # the way first: either may itself be fd 3 or 4.
    commands, answers = os.dup(to_browser_r), os.dup(from_browser_w)
    os.dup2(commands, 3)
    os.dup2(answers, 4)


browser = subprocess.Popen(
    ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
     "--no-first-run", "--no-default-browser-check", "--disable-extensions",
     "--disable-background-networking", "--remote-debugging-pipe",
     "--user-data-dir=" + profile, "--window-size=1280,800", "about:blank"],
    preexec_fn=child_fds, pass_fds=(3, 4),
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
os.close(to_browser_r)
os.close(from_browser_w)
selector = selectors.DefaultSelector()
selector.register(from_browser_r, selectors.EVENT_READ)
pending = b""
next_id = 0


def fail(message):
    print("FAIL " + message, flush=True)
    browser.kill()
    browser.wait()
    shutil.rmtree(profile, ignore_errors=True)
    sys.exit(1)


def call(method, params=None, session=None, deadline=None):
    """Sends one command and returns its result, skipping events."""
    global next_id, pending
    next_id += 1
    message = {"id": next_id, "method": method, "params": params or {}}
    if session:
        message["sessionId"] = session
    os.write(to_browser_w, json.dumps(message).encode() + b"\0")
    deadline = deadline or time.monotonic() + WAIT
    while True:
        while b"\0" in pending:
            raw, pending = pending.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == next_id:
                if "error" in answer:
                    fail(method + ": " + json.dumps(answer["error"]))
                return answer.get("result", {})
        left = deadline - time.monotonic()
        if left <= 0 or not selector.select(left):
            fail("no answer from chromium to " + method)
        chunk = os.read(from_browser_r, 1 << 20)
        if not chunk:
            fail("chromium exited")
        pending += chunk


target = call("Target.createTarget", {"url": url})["targetId"]
session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

# What the page shows for the endpoint: its row's status attribute and the badge's words.
PROBE = """(() => {
  const row = [...document.querySelectorAll('#endpoints tr')]
    .find((r) => r.dataset.endpoint === %s);
  const badge = row && row.querySelector('.badge');
  const open = [...document.querySelectorAll('#connections tr')]
    .filter((r) => r.dataset.endpoint === %s);
  return JSON.stringify({ status: row ? row.dataset.status : null,
                          badge: badge ? badge.textContent : null,
                          summary: document.getElementById('summary')?.textContent,
                          connections: open.length,
                          client: open.length ? open[0].cells[0].textContent : null });
})()""" % (json.dumps(endpoint), json.dumps(endpoint))


def shown():
    result = call("Runtime.evaluate", {"expression": PROBE, "returnByValue": True}, session)
    if "exceptionDetails" in result or "value" not in result.get("result", {}):
        # Still loading (or the page broke: then the deadline reports what was seen).
        return {"status": None, "badge": None, "error": json.dumps(result)[:500]}
    return json.loads(result["result"]["value"])


def wait_for(status, connections):
    deadline = time.monotonic() + WAIT
    last = None
    while time.monotonic() < deadline:
        last = shown()
        if (last["status"] == status and last["badge"] == status
                and last.get("connections") == connections):
            return last
        time.sleep(0.1)
    fail("the page never showed %s with %d open connections; it showed %s"
         % (status, connections, json.dumps(last)))


def screenshot(name):
    data = call("Page.captureScreenshot", {"format": "png"}, session)["data"]
    path = os.path.join(shots, name)
    with open(path, "wb") as f:
        f.write(base64.b64decode(data))
    return path


seen = wait_for("Approved", 1)
print("seen Approved " + json.dumps(seen) + " " + screenshot("status-page-approved.png"),
      flush=True)
if not sys.stdin.readline():
    fail("the test went away")
seen = wait_for("Disconnected", 0)
print("seen Disconnected " + json.dumps(seen) + " " + screenshot("status-page-disconnected.png"),
      flush=True)
call("Browser.close")
browser.wait(timeout=WAIT)
shutil.rmtree(profile, ignore_errors=True)
