# Drives headless Chromium (Debian's `chromium`) over the DevTools protocol on a pipe
# (--remote-debugging-pipe: JSON messages ending in NUL, browser reads fd 3, writes fd 4) to
# watch privlink's status page in ONE page load:
#   browse_status.py URL ENDPOINT_JSON SCREENSHOT_DIR PHASES_JSON   (ENDPOINT_JSON: a name or null)
# PHASES_JSON is a list of what the page must come to show, in order: {"shot": the screenshot's
# name, "status": the endpoint's status word (a relay's page) or "link": the first relay link's
# state (an agent's), "connections": the endpoint's open connections listed (a relay's page; on
# an agent's, every stream listed), and optionally
# "denials" / "failed": at least that many highlighted refusals / bad ends in the event list, "series": an outcome
# the connections chart draws, "code": an event code listed, "peers": the peers chart's last
# value}. For each phase it waits until the same page — refreshing itself — shows it, takes a
# screenshot (<shot>.png), prints "seen <shot> <what the page showed> <its file>", and
# before the next phase waits for a line on stdin (the test changes something). Every wait has
# a deadline; on one it prints what the page showed and exits 1.
import base64, json, os, selectors, shutil, subprocess, sys, tempfile, time

url, endpoint, shots = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
phases = json.loads(sys.argv[4])
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

# What the page shows: the endpoint's row (status attribute, badge), every endpoint's reason as
# text, the open connections of the endpoint, the event list (codes, highlighted refusals, its
# text), what the charts draw, and how many elements the page holds that its own markup and
# script never make (markup smuggled in through a name or a reason would add some).
PROBE = """(() => {
  const row = [...document.querySelectorAll('#endpoints tr')]
    .find((r) => r.dataset.endpoint === %s);
  const badge = row && row.querySelector('.badge');
  const open = [...document.querySelectorAll('#connections tr')]
    .filter((r) => r.dataset.endpoint === %s || (%s === null && r.dataset.endpoint));
  const link = document.querySelector('#links tr[data-state]');
  const events = [...document.querySelectorAll('#events tr[data-code]')];
  const denials = events.filter((r) => r.classList.contains('denial'));
  const failed = events.filter((r) => r.classList.contains('failed'));
  const peers = document.querySelector('#legend-peers li');
  return JSON.stringify({ status: row ? row.dataset.status : null,
                          link: link ? link.dataset.state : null,
                          badge: badge ? badge.textContent : null,
                          summary: document.getElementById('summary')?.textContent,
                          connections: open.length,
                          client: open.length ? open[0].cells[0].textContent : null,
                          reasons: [...document.querySelectorAll('#endpoints .reason')]
                            .map((r) => r.textContent),
                          codes: events.map((r) => r.dataset.code),
                          denials: denials.map((r) => r.textContent),
                          failed: failed.map((r) => r.textContent),
                          events_text: events.map((r) => r.textContent).join('\\n'),
                          series: [...document.querySelectorAll('#chart-ended polyline')]
                            .map((l) => l.dataset.series),
                          bytes_lines: document.querySelectorAll('#chart-bytes polyline').length,
                          peers: peers ? peers.textContent : null,
                          smuggled: document.querySelectorAll(
                            'img, iframe, object, embed, b, i, u, a, form input:not(#token)')
                            .length });
})()""" % (json.dumps(endpoint), json.dumps(endpoint), json.dumps(endpoint))


def shown():
    result = call("Runtime.evaluate", {"expression": PROBE, "returnByValue": True}, session)
    if "exceptionDetails" in result or "value" not in result.get("result", {}):
        # Still loading (or the page broke: then the deadline reports what was seen).
        return {"status": None, "badge": None, "link": None, "error": json.dumps(result)[:500]}
    return json.loads(result["result"]["value"])


def shows(page, phase):
    return (("status" not in phase
             or (page["status"] == phase["status"] and page["badge"] == phase["status"]))
            and ("link" not in phase or page.get("link") == phase["link"])
            and page.get("connections") == phase["connections"]
            and len(page.get("denials", [])) >= phase.get("denials", 0)
            and len(page.get("failed", [])) >= phase.get("failed", 0)
            and ("series" not in phase or phase["series"] in page.get("series", []))
            and ("code" not in phase or phase["code"] in page.get("codes", []))
            and ("peers" not in phase or page.get("peers") == phase["peers"]))


def wait_for(phase):
    deadline = time.monotonic() + WAIT
    last = None
    while time.monotonic() < deadline:
        last = shown()
        if shows(last, phase):
            return last
        time.sleep(0.1)
    fail("the page never showed %s; it showed %s" % (json.dumps(phase), json.dumps(last)))


def screenshot(name):
    # The whole page, not only the window.
    size = call("Runtime.evaluate", {
        "expression": "JSON.stringify([document.documentElement.scrollWidth, "
                      "document.documentElement.scrollHeight])",
        "returnByValue": True}, session)["result"]["value"]
    width, height = json.loads(size)
    clip = {"x": 0, "y": 0, "width": width, "height": min(height, 8000), "scale": 1}
    data = call("Page.captureScreenshot",
                {"format": "png", "captureBeyondViewport": True, "clip": clip}, session)["data"]
    path = os.path.join(shots, name)
    with open(path, "wb") as f:
        f.write(base64.b64decode(data))
    return path


for number, phase in enumerate(phases):
    if number > 0 and not sys.stdin.readline():
        fail("the test went away")
    seen = wait_for(phase)
    shot = screenshot(phase["shot"] + ".png")
    print("seen %s %s %s" % (phase["shot"], json.dumps(seen), shot), flush=True)
call("Browser.close")
browser.wait(timeout=WAIT)
shutil.rmtree(profile, ignore_errors=True)
