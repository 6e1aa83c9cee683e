"""
`make dev`: an editable install in compat mode gives a twistd that finds the
roller plugin in the checkout.  The default editable mode does not: its
import hook serves the C{roller} package but puts nothing on C{sys.path}, so
Twisted's plugin scan never sees C{twisted/plugins/roller_plugin.py} and
C{twistd roller --help} prints twistd's own usage.

The install goes into a private prefix (C{--no-deps --no-build-isolation}:
the dependencies are the test venv's), from a copy of the checkout's
packaging files, and twistd runs from a directory outside it, against a
view of the venv's site-packages without the roller the venv itself has
installed, so only the editable install can provide the plugin.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from roller.testing.process import REPO_ROOT

#: What the editable install needs from the checkout.
PACKAGING = ("setup.py", "pyproject.toml", "README.md", "roller", "twisted", "templates", "static")

TWISTD = """
import site, sys
site.addsitedir({base!r})
for extra in {extra!r}:
    site.addsitedir(extra)  # processes the editable install's .pth
import roller
print("roller from", roller.__file__, flush=True)
sys.argv = ["twistd", "roller", "--help"]
from twisted.scripts.twistd import run
run()
"""


def _site_without_roller(venv_site: Path, dest: Path) -> Path:
    """Symlinks to everything in the venv's site-packages except roller and its twistd plugin."""
    dest.mkdir()
    for entry in venv_site.iterdir():
        if entry.name in ("twisted", "roller") or entry.name.startswith(("roller-", "__editable__")) \
                or (entry.suffix == ".pth" and "roller" in entry.name):
            continue
        (dest / entry.name).symlink_to(entry)
    twisted = dest / "twisted"
    twisted.mkdir()
    for entry in (venv_site / "twisted").iterdir():
        if entry.name != "plugins":
            (twisted / entry.name).symlink_to(entry)
    plugins = twisted / "plugins"
    plugins.mkdir()
    for entry in (venv_site / "twisted" / "plugins").iterdir():
        if entry.name not in ("roller_plugin.py", "dropin.cache", "__pycache__"):
            (plugins / entry.name).symlink_to(entry)
    return dest


def _twistd_roller_help(base: Path, extra: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", "-S", "-c", TWISTD.format(base=str(base), extra=extra)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_editable_compat_install_gives_twistd_the_roller_plugin(tmp_path: Path) -> None:
    venv_site = Path(sysconfig.get_paths()["purelib"])
    if not (venv_site / "twisted" / "plugins").is_dir():
        pytest.skip("Twisted is not installed in a site-packages directory")
    checkout = tmp_path / "checkout"
    for name in PACKAGING:
        source = Path(REPO_ROOT) / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc",
                                                                                  "dropin.cache"))
        else:
            checkout.mkdir(exist_ok=True)
            shutil.copy2(source, checkout / name)
    prefix = tmp_path / "prefix"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--no-index", "-e", str(checkout), "--config-settings", "editable_mode=compat",
         "--prefix", str(prefix)],
        capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    [prefix_site] = {p.parent for p in prefix.glob("lib/python*/site-packages/*.pth")}
    base = _site_without_roller(venv_site, tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # Without the editable install this environment has no roller at all: the check below means something.
    bare = _twistd_roller_help(base, [], elsewhere)
    assert bare.returncode != 0 and "No module named 'roller'" in bare.stderr, bare.stdout + bare.stderr

    done = _twistd_roller_help(base, [str(prefix_site)], elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"roller from {checkout / 'roller' / '__init__.py'}" in done.stdout
    usage = done.stdout
    assert "Usage: twistd [options] roller [options]" in usage, usage
    for option in ("--config", "--demo", "--auth"):
        assert option in usage, usage
