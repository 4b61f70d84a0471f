"""Package discovery for arrayopt (the metadata lives in pyproject.toml).

``backends/`` is installed as ``arrayopt.backends`` (``package-dir`` in pyproject.toml).
setuptools' ``find`` names packages after their folders, so it cannot find the
subpackages of a mapped folder by itself: they are found here and renamed, so that a new
subpackage under ``arrayopt/`` or ``backends/`` is never left out of the wheel
(``tests/test_packaging.py`` checks the built wheel). ``tests`` and ``asv_bench`` do not ship.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["arrayopt", "arrayopt.*"])
packages += ["arrayopt.backends"] + [f"arrayopt.backends.{p}" for p in find_packages("backends")]
setup(packages=packages)
