"""Which folders are packages: qcompare/ as it stands, and the built-in plugins, which live in plugins/
and import as ``qcompare_plugins``. Everything else about the project is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

# namespace discovery: the toy world's folders of data (model/, data/, tasks/) are packages too
CORE = find_namespace_packages(include=["qcompare", "qcompare.*"], exclude=["*__pycache__*"])
PLUGINS = ["qcompare_plugins"] + ["qcompare_plugins." + p
                                  for p in find_namespace_packages("plugins", exclude=["*__pycache__*"])]

setup(packages=CORE + PLUGINS, package_dir={"qcompare_plugins": "plugins"})
