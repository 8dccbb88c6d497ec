"""Helpers for the team tests: a small git + DVC project of raw digits, servers started on
127.0.0.1 and always stopped, Debian's Chromium."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from tests.support import command_env, copy_project, run, small_params

MODELS = ("dense", "numpy_mlp", "logreg")
PER_CLASS = 30  # raw digits per class: 300 images, 30 of them test images


def http_ok(url: str) -> bool:
    """True when GET url answers 200 within 5 s."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


@contextmanager
def serving(
    args: list[str], *, cwd: Path, env: dict[str, str], ready_url: str, timeout: float
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
        while not http_ok(ready_url):
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
