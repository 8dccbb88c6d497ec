"""Helpers for the team tests: a small git + DVC project of raw digits, servers started on
127.0.0.1 and always stopped (the team MLflow server of scripts/team-server among them), Debian's
Chromium."""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from tests.support import ROOT, command_env, copy_project, free_port, run, small_params

MODELS = ("dense", "numpy_mlp", "logreg")
PER_CLASS = 30  # raw digits per class: 300 images, 30 of them test images


def http_ok(url: str, cafile: Path | None = None) -> bool:
    """True when GET url answers 200 within 5 s (https: verified against cafile, which may not
    exist yet)."""
    try:
        context = ssl.create_default_context(cafile=cafile) if cafile else None
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


@contextmanager
def serving(
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    ready_url: str,
    timeout: float,
    cafile: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """Start a server in its own process group, wait (bounded) for ready_url, always stop it."""
    word = re.sub(r"[^A-Za-z0-9]+", "-", args[1])  # `serve`, or a URI: `models-imgpipe-dense-1`
    log_path = cwd / f"{Path(args[0]).name}-{word}-{int(time.time() * 1000)}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while not http_ok(ready_url, cafile):
            if process.poll() is not None or time.monotonic() > deadline:
                state = "exited" if process.poll() is not None else f"not ready after {timeout} s"
                pytest.fail(f"{' '.join(args)} {state}:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group (the server and its workers), SIGKILL it after 20 s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)
    except ProcessLookupError:
        pass


def write_raw_digits(folder: Path) -> int:
    """The first PER_CLASS of scikit-learn's digits of each class as PNG class folders."""
    from imgpipe.demo import digits_images, png_bytes

    pixels, labels = digits_images()
    written = 0
    for digit in range(10):
        (folder / str(digit)).mkdir(parents=True)
        for index in (labels == digit).nonzero()[0][:PER_CLASS]:
            (folder / str(digit) / f"{index:04d}.png").write_bytes(png_bytes(pixels[index]))
            written += 1
    return written


def make_project(origin: Path, *, models: tuple[str, ...] = MODELS) -> int:
    """A git repository at origin holding the project's code, small params (only `models`)
    and `dvc add`ed raw digits, committed; returns the number of raw images."""
    copy_project(origin)
    # cheap models (dense, numpy_mlp, logreg or some of them) on one 16x16 view
    params = small_params(origin / "params.yaml", dict.fromkeys(models, "gray16"), epochs=3)
    params["data"]["raw"] = "data/raw/digits"
    params["tabulate"]["workers"] = 2
    (origin / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    raw_files = write_raw_digits(origin / "data" / "raw" / "digits")
    env = command_env()
    run(["git", "init", "-q", "-b", "main"], origin, env)
    run(["dvc", "add", "data/raw/digits"], origin, env)
    run(["git", "add", "-A"], origin, env)
    run(["git", "commit", "-q", "-m", "project with raw digits"], origin, env)
    return raw_files


def missing_system_program(message: str) -> NoReturn:
    """A test's system program (a Debian package) is not installed: skipped here, a failure
    under CI (`CI` set), where .ci/run installs every one of them."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def chromium_paths() -> tuple[str, str]:
    """Debian's chromium and chromedriver; skipped here when absent, a failure under CI."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    missing_system_program(
        "needs Debian's chromium and chromium-driver packages (apt-get install ...)"
    )


def headless_chromium(
    window_size: str, *arguments: str, logging_prefs: dict[str, str] | None = None
) -> Any:
    """Debian's Chromium, headless, driven by Selenium through Debian's chromedriver (Selenium
    Manager never downloads one); `arguments` are more Chromium switches."""
    browser, driver_path = chromium_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={window_size}",
        *arguments,
    ):
        options.add_argument(argument)
    if logging_prefs:
        options.set_capability("goog:loggingPrefs", logging_prefs)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")
        return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


def missing_texts(driver: Any, texts: list[str]) -> list[str]:
    """Those of `texts` that no displayed element of the page shows as its whole text."""
    absent = []
    for text in texts:
        elements = driver.find_elements("xpath", f"//*[normalize-space(text())='{text}']")
        if not any(element.is_displayed() for element in elements):
            absent.append(text)
    return absent


def click_if_shown(driver: Any, xpath: str) -> bool:
    """Click the first displayed element matching xpath; False when there is none."""
    for element in driver.find_elements("xpath", xpath):
        if element.is_displayed():
            driver.execute_script("arguments[0].click();", element)
            return True
    return False


def mlflow_compare_view(page: str, texts: list[str], shot: Path, window: str) -> list[str]:
    """Open an MLflow compare-runs page in headless Chromium, tidy it for a picture (no
    assistant panel, no charts, only differing params), save a screenshot to `shot`, and
    return those of `texts` it does not show (a failure with the page text if none appear)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium(window)
    try:
        driver.set_page_load_timeout(60)
        driver.get(page)
        try:
            wait = WebDriverWait(driver, 60, poll_frequency=1)
            wait.until(lambda d: not missing_texts(d, texts[:1]))
        except Exception:
            driver.save_screenshot(str(shot))
            body = driver.find_element("tag name", "body").text
            pytest.fail(f"{texts[0]!r} not on {page} after 60 s; page text:\n{body[:3000]}")
        click_if_shown(driver, "//button[@aria-label='Close']")
        click_if_shown(driver, "//div[@role='button'][normalize-space(.)='Visualizations']")
        click_if_shown(driver, "//button[@aria-label='Parameters - Show diff only']")
        time.sleep(1)  # let the toggles re-render before looking and taking the picture
        absent = missing_texts(driver, texts)
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    return absent


def refresh_screenshot(shot: Path, picture: Path) -> None:
    """With IMGPIPE_UPDATE_SCREENSHOT set, copy a test's screenshot into docs/ (64 colours)."""
    if os.environ.get("IMGPIPE_UPDATE_SCREENSHOT"):
        from PIL import Image

        with Image.open(shot) as image:
            image.convert("RGB").quantize(colors=64).save(picture, optimize=True)


# --------------------------------------------------------------------------- the team server

TEAM_SERVER = ROOT / "scripts" / "team-server"


def require_postgres() -> None:
    """Debian's PostgreSQL server programs; skipped here when absent, a failure under CI."""
    if shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return
    missing_system_program("needs PostgreSQL's server programs: apt-get install postgresql")


@contextmanager
def python_open_to_others() -> Iterator[None]:
    """Let other users pass through the folders above this Python (here /root, mode 0700):
    run as root, scripts/team-server runs `mlflow server` as its own unprivileged user, which
    must run this environment. o+x only (others may pass, not list); the last of the tests
    using it at once (xdist workers) puts the modes back, as the first one found them."""
    if os.geteuid() != 0:
        yield
        return
    state = Path(tempfile.gettempdir()) / "imgpipe-python-open-to-others.json"
    with (
        Path(f"{state}.users").open("a") as users,  # shared by each test that needs it
        Path(f"{state}.lock").open("a") as changing,  # held while modes change
    ):
        fcntl.flock(users, fcntl.LOCK_SH)  # first: waits while the last one puts modes back
        with _held(changing):
            saved = json.loads(state.read_text()) if state.exists() else {}
            for place in {Path(sys.executable), Path(sys.prefix), Path(sys.base_prefix)}:
                for folder in place.resolve().parents:
                    mode = stat.S_IMODE(folder.stat().st_mode)
                    if not mode & 0o001:
                        saved.setdefault(str(folder), mode)
                        folder.chmod(mode | 0o001)
            state.write_text(json.dumps(saved))
        try:
            yield
        finally:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last one?
            except BlockingIOError:
                pass  # no: another one still runs, and puts them back
            else:
                with _held(changing):
                    for folder, mode in json.loads(state.read_text()).items():
                        Path(folder).chmod(mode)
                    state.unlink()


@contextmanager
def _held(lock_file: Any) -> Iterator[None]:
    """An exclusive flock on an open file for a block."""
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(lock_file, fcntl.LOCK_UN)


@dataclass(frozen=True)
class TeamServer:
    """A running `scripts/team-server`: its https URL, folder, certificate, database port and
    generated secrets."""

    url: str
    folder: Path
    cert: Path
    db_port: int
    secrets: dict[str, str]  # db_password, admin_password, flask_secret_key
    process: subprocess.Popen


@contextmanager
def team_server(*extra: str) -> Iterator[TeamServer]:
    """`scripts/team-server start` in a fresh folder on two free ports (HTTPS with the
    self-signed certificate it makes, passwords generated), always stopped and removed.

    The folder is made under /tmp, not pytest's own (closed to other users): PostgreSQL and
    MLflow run as unprivileged users when the tests run as root, and must reach their folder.
    """
    require_postgres()
    parent = Path(tempfile.mkdtemp(prefix="imgpipe-team-server-"))
    parent.chmod(0o755)
    folder = parent / "server"
    port, db_port = free_port(), free_port()
    url = f"https://127.0.0.1:{port}"
    args = [str(TEAM_SERVER), "start", str(folder), "--port", str(port)]
    args += ["--db-port", str(db_port), "--workers", "1", *extra]
    cert = folder / "tls" / "cert.pem"
    try:
        with (
            python_open_to_others(),
            serving(
                args,
                cwd=parent,
                env=command_env(),
                ready_url=f"{url}/health",
                timeout=180,
                cafile=cert,
            ) as process,
        ):
            lines = (folder / "secrets").read_text().splitlines()
            secrets = dict(line.split("=", 1) for line in lines if not line.startswith("#"))
            yield TeamServer(url, folder, cert, db_port, secrets, process)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
