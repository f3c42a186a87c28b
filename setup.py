"""Only what pyproject.toml cannot say: the package list.

The launcher lives in the repository's top-level `launcher/` folder but installs as
`modelfleet.launcher` (pyproject.toml maps the folder with `package-dir`), because a
top-level package named `launcher` in site-packages would clash with any other of that
name. Package discovery cannot find a package under another name than its folder's, so
it is added here to what discovery finds under `modelfleet/`.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["modelfleet", "modelfleet.*"]), "modelfleet.launcher"])
