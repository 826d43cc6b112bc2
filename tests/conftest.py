"""Fixtures shared by test modules: a real headless Chromium (.ci/browser.sh installs it and
chromedriver), a two-node SLURM cluster (tests/slurm_cluster.py), and the `needs` mark
(tests/needs.py): without an optional part a test skips, except under CI=true where it fails."""

from __future__ import annotations

import pytest

from tests.needs import needs


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs(part): skip without the part (tests/needs.py), fail under CI=true"
    )


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        for part in mark.args:
            needs(part)


@pytest.fixture(scope="session")
def two_node_cluster():
    """A private two-node SLURM cluster (tests/slurm_cluster.py: node1 and node2, each with its own
    network namespace, address, hostname and node-local folder), for the whole session."""
    from tests.slurm_cluster import started

    with started(nodes=2) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def browser():
    chromium, chromedriver = needs("chromium")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-client-side-phishing-detection",
        "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
        "--no-first-run",
        "--no-default-browser-check",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
