"""A headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages ended by NUL on file descriptors 3 and 4), so the browser tests need no client
library, no port and no network."""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import signal
import shutil
import subprocess
import tempfile
import time

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--force-device-scale-factor=1", "--hide-scrollbars", "--remote-debugging-pipe"]


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    def __init__(self, exe: str, width: int = 1280, height: int = 1000, timeout: float = 30.0):
        self.timeout, self.events, self._buf, self._id = timeout, [], b"", 0
        self._profile = tempfile.mkdtemp(prefix="pk-chromium-")
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()
        # above 10 so that moving them onto 3 and 4 in the child cannot clobber one another
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]

        def onto_3_and_4():
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={self._profile}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=onto_3_and_4, close_fds=False,
                                     start_new_session=True)
        for fd in (to_child, from_child, *high):
            os.close(fd)
        try:
            page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
            self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.call(f"{domain}.enable", session=self.session)
        except BaseException:
            self.close()
            raise

    def _message(self, deadline):
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit code {self.proc.poll()})")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method, session=None, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def page(self, method, **params):
        return self.call(method, session=self.session, **params)

    def evaluate(self, expression, session=None):
        """The value of a JavaScript expression in the page, or in the frame of ``session``
        (JSON-able values only)."""
        r = self.call("Runtime.evaluate", session=session or self.session, expression=expression,
                      returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}...: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression, session=None):
        deadline = time.monotonic() + self.timeout
        while not self.evaluate(f"!!({expression})", session):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {self.timeout} s: {expression}")
            time.sleep(0.05)

    def open(self, url, ready="document.readyState === 'complete'"):
        self.page("Page.navigate", url=url)
        self.wait(ready)

    def frame_session(self):
        """The session of the page's first child frame (after ``Target.setAutoAttach``; a sandboxed
        frame runs in a process of its own, so it is a target of its own)."""
        deadline = time.monotonic() + self.timeout
        while True:
            for e in self.events:
                if e["method"] == "Target.attachedToTarget" and e["params"]["targetInfo"]["type"] == "iframe":
                    return e["params"]["sessionId"]
            if time.monotonic() > deadline:
                raise TimeoutError("no frame attached")
            self.evaluate("0")  # lets the pending events arrive
            time.sleep(0.05)

    def mouse(self, kind, x, y):
        """A real pointer event at viewport pixel (x, y): 'move' or 'click'."""
        if kind == "move":
            self.page("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
            return
        for t in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=t, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path):
        data = base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"])
        with open(path, "wb") as f:
            f.write(data)
        return path

    def close(self):
        try:
            if self.proc.poll() is None:
                try:
                    self.call("Browser.close")
                except (OSError, RuntimeError, TimeoutError):
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its renderers too: the group is ours
                    self.proc.wait()
        finally:
            for fd in (self._in, self._out):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self._profile, ignore_errors=True)
