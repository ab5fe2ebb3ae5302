"""Real-browser harness: serve notebooks with Voila or JupyterLab 4 on localhost, drive them with Debian's headless
Chromium.

Voila executes a notebook when its page loads and renders the widgets, so "run the notebook, then interact" is one
page load; in JupyterLab the page runs "Run All" through the app's command registry once the kernel is ready.
Playwright (the Python package, its bundled driver) controls the system Chromium at CHROMIUM; its own browser
download is never used. Everything a failing run needs to be understood (a screenshot, the server's log, the
errors in the page) goes into the assertion message.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REQUIRED_MODULES = ("playwright", "voila", "jupyterlab")


@dataclass(frozen=True)
class WidgetTarget:
    """A notebook to open, the slider to move (by its description label) and the summary whose text must follow."""

    notebook: str  # path relative to the served root (the repository root)
    slider: str = "tau_token"  # the slider's description, matched exactly
    summary: str = ".lazymar-summary"  # CSS selector of the summary widget
    key: str = "ArrowRight"  # key pressed on the slider handle (ArrowUp for a vertical slider)
    presses: int = 1  # how many times; each press moves the slider one step and syncs it to the kernel
    load_timeout_s: float = 60.0  # the notebook executes on page load: time until the summary is shown
    update_timeout_s: float = 20.0  # time for the kernel to recompute the summary after the move


def missing_requirements() -> list[str]:
    """What the browser test lacks on this machine (empty when it can run)."""
    missing = [] if CHROMIUM.exists() else [f"{CHROMIUM} (apt-get install chromium)"]
    missing += [f"python package {name!r} (pip install -e '.[test]')" for name in REQUIRED_MODULES
                if importlib.util.find_spec(name) is None]
    return missing


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Process ids below pid (Linux /proc), children first; the kernels Voila starts run in their own sessions,
    so they are found through the parent links rather than a process group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class NotebookServer:
    """A notebook server on 127.0.0.1:port in a subprocess serving root_dir (Voila or JupyterLab); use it as a
    context manager (always stopped, kernels included). Subclasses give the command and how a page runs a
    notebook (:meth:`open`)."""

    name = "server"

    def __init__(self, root_dir: Path, log_path: Path, start_timeout_s: float = 90.0):
        self.root_dir = Path(root_dir).resolve()
        self.log_path = Path(log_path)
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def page_path(self, notebook: str) -> str:
        raise NotImplementedError

    def url_for(self, notebook: str, query: str = "") -> str:
        """The page that shows notebook (a path relative to root_dir)."""
        if not (self.root_dir / notebook).is_file():
            raise FileNotFoundError(f"notebook not found: {self.root_dir / notebook}")
        return f"{self.base_url}/{self.page_path(quote(Path(notebook).as_posix()))}" + (f"?{query}" if query else "")

    def open(self, page, notebook: str, query: str = "", timeout_s: float = 120.0) -> None:
        """Load the notebook's page and have it run (Voila runs it on load, and may take long on a busy machine
        to send the first bytes: the wait is the target's load time, not Playwright's default 30 s)."""
        page.goto(self.url_for(notebook, query), wait_until="commit", timeout=timeout_s * 1000)

    def after_page(self) -> None:
        """Called when a test's page closes."""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_since(0, chars)

    def log_since(self, offset: int, chars: int = 4000) -> str:
        """The last chars of what the server logged after byte offset (one test's share of a shared log)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return f"<no {self.name} log>"
        return text[-chars:] or "<empty>"

    def environment(self) -> dict:
        runtime_dir = self.log_path.parent / "jupyter-runtime"
        runtime_dir.mkdir(parents=True, exist_ok=True)
        return dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime_dir), JUPYTER_PLATFORM_DIRS="1",
                    PYDEVD_DISABLE_FILE_VALIDATION="1")

    def start(self) -> "NotebookServer":
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(), cwd=self.root_dir, env=self.environment(), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)  # polling interval while the server boots
        self.stop()
        raise RuntimeError(f"{self.name} did not answer on {self.base_url} within {self.start_timeout_s:.0f} s:\n"
                           f"{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the server and every process it started (kernels included); SIGKILL after 10 s."""
        if self.process is None:
            return
        process, self.process = self.process, None
        below = _descendants(process.pid)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for pid in below:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in below:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> "NotebookServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class VoilaServer(NotebookServer):
    """Voila: executes a notebook when its page loads and renders only the widgets and outputs."""

    name = "Voila"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "voila", str(self.root_dir), "--no-browser", "--Voila.ip=127.0.0.1",
                f"--Voila.port={self.port}", "--Voila.port_retries=0", "--show_tracebacks=True"]

    def page_path(self, notebook: str) -> str:
        return f"voila/render/{notebook}"


# JupyterLab user settings of the test server: no autosave (the served checkout must not change), and widget
# comms over kernel subshells as JupyterLab 4.6 does by default (ipykernel 7 runs each subshell in its own thread)
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/kernels-settings.jupyterlab-settings": {"commsOverSubshells": "perCommTarget"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
}


class JupyterLabServer(NotebookServer):
    """JupyterLab 4 without a token, its app object exposed to the page (``window.jupyterapp``) so that a test
    can run all cells as the "Run All" command does; settings and workspaces live in the log's folder."""

    name = "JupyterLab"

    def environment(self) -> dict:
        env = super().environment()
        settings = self.log_path.parent / "lab-settings"
        for name, values in LAB_SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        workspaces = self.log_path.parent / "lab-workspaces"
        workspaces.mkdir(parents=True, exist_ok=True)
        config = self.log_path.parent / "jupyter-config"
        config.mkdir(parents=True, exist_ok=True)
        return dict(env, JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(workspaces),
                    JUPYTER_CONFIG_DIR=str(config))

    def command(self) -> list[str]:
        return [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", "--IdentityProvider.token=",
                "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={self.root_dir}",
                "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
                "jupyterlab.NeverCheckForUpdate",
                # checkpoints (made when a notebook opens) go beside the log, not into the served checkout
                f"--FileCheckpoints.checkpoint_dir={self.log_path.parent / 'checkpoints'}"]

    pages = 0

    def page_path(self, notebook: str) -> str:
        """A fresh workspace per page (``?reset``): only this notebook opens, not the tabs of earlier pages."""
        JupyterLabServer.pages += 1
        return f"lab/workspaces/test{JupyterLabServer.pages}/tree/{notebook}"

    def open(self, page, notebook: str, query: str = "", timeout_s: float = 120.0) -> None:
        page.goto(self.url_for(notebook, "reset"), wait_until="commit", timeout=timeout_s * 1000)
        page.wait_for_function(
            "(path) => window.jupyterapp && window.jupyterapp.shell.currentWidget"
            " && window.jupyterapp.shell.currentWidget.sessionContext"
            " && window.jupyterapp.shell.currentWidget.context.path === path", arg=Path(notebook).as_posix(),
            timeout=timeout_s * 1000)
        page.evaluate("""async () => {
            const panel = window.jupyterapp.shell.currentWidget;
            await panel.context.ready;
            await panel.sessionContext.ready;
            await window.jupyterapp.commands.execute('notebook:run-all-cells');
        }""")

    def after_page(self) -> None:
        """Shut down the kernels the page started (a closed tab leaves its kernel running)."""
        with urllib.request.urlopen(self.base_url + "/api/sessions", timeout=10) as response:
            sessions = json.load(response)
        for session in sessions:
            request = urllib.request.Request(f"{self.base_url}/api/sessions/{session['id']}", method="DELETE")
            urllib.request.urlopen(request, timeout=30).close()


def launch_chromium(playwright):
    """Headless Debian Chromium driven by Playwright (never Playwright's own browser download)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def slider_locator(page, label: str):
    """The slider widget whose description is exactly label (ipywidgets 8 markup: .widget-slider > label)."""
    exact = re.compile(rf"^\s*{re.escape(label)}\s*$")
    return page.locator(".widget-slider").filter(has=page.locator(".widget-label", has_text=exact))


def slider_handle(page, label: str):
    return slider_locator(page, label).locator(".noUi-handle")


def move_slider(page, label: str, key: str = "ArrowRight", presses: int = 1) -> None:
    """Focus the slider handle and press key, as a keyboard user would; noUiSlider moves one step per press."""
    handle = slider_handle(page, label)
    handle.focus()
    for _ in range(presses):
        handle.press(key)


class NotebookPage:
    """One Chromium page on one served notebook; collects what a failure report needs (screenshots, page errors,
    the server log written meanwhile). Requests leaving the server are aborted, so the page never waits on a CDN."""

    def __init__(self, browser, server: NotebookServer, target: WidgetTarget, shot_dir: Path):
        self.server, self.target, self.shot_dir = server, target, Path(shot_dir)
        self.errors: list[str] = []
        self.log_start = server.log_path.stat().st_size if server.log_path.exists() else 0
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.context.route("**/*", self._only_local)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.page.on("console", self._on_console)

    def _only_local(self, route) -> None:
        url = route.request.url
        if url.startswith((self.server.base_url, "data:", "blob:")):
            route.continue_()
        else:
            route.abort()

    def _on_console(self, message) -> None:
        origin = (message.location or {}).get("url", "")
        if message.type == "error" and (origin.startswith(self.server.base_url) or not origin):
            self.errors.append(f"console: {message.text}")

    def open(self, query: str = "") -> None:
        self.server.open(self.page, self.target.notebook, query, timeout_s=self.target.load_timeout_s)

    @property
    def summary(self):
        return self.page.locator(self.target.summary)

    @property
    def slider(self):
        return slider_locator(self.page, self.target.slider)

    @property
    def slider_origin(self):
        """noUiSlider's handle carrier, whose inline transform places the handle."""
        return self.slider.locator(".noUi-origin")

    def slider_position(self) -> str:
        """Where the handle sits (the inline transform): changes with every step, however small."""
        return self.slider_origin.get_attribute("style") or ""

    def slider_readout(self) -> str:
        """The value as the page shows it (the readout; aria-valuenow, which noUiSlider rounds, if hidden)."""
        readout = self.slider.locator(".widget-readout")
        if readout.count() and readout.is_visible():
            return readout.inner_text().strip()
        return slider_handle(self.page, self.target.slider).get_attribute("aria-valuenow") or "?"

    def move_slider(self) -> None:
        move_slider(self.page, self.target.slider, key=self.target.key, presses=self.target.presses)

    def screenshot(self, name: str) -> str:
        """Save a full-page PNG under shot_dir; returns its path (or why it failed, so a report stays readable)."""
        path = self.shot_dir / f"{self.server.name}_{Path(self.target.notebook).stem}_{name}.png"
        try:
            self.page.screenshot(path=str(path), full_page=True)
        except Exception as error:  # the page may be gone; diagnostics must not mask the real failure
            return f"<screenshot failed: {error}>"
        return str(path)

    def report(self, what: str, shot: str) -> str:
        """A failure message: what went wrong, a fresh screenshot, the errors in the page and the server log."""
        return (f"{what}\nnotebook: {self.target.notebook}\nscreenshot: {self.screenshot(shot)}\n"
                f"errors in the page:\n{self._page_errors()}\n"
                f"{self.server.name} log during this test:\n{self.server.log_since(self.log_start)}")

    def _page_errors(self) -> str:
        """Tracebacks rendered into output areas, then JavaScript errors."""
        try:
            rendered = self.page.locator('[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
        except Exception as error:
            rendered = [f"<could not read the page: {error}>"]
        parts = [text.strip() for text in rendered + self.errors if text.strip()]
        return "\n---\n".join(parts)[-4000:] or "<none>"

    def close(self) -> None:
        self.context.close()
        self.server.after_page()
