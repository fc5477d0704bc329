"""qcompare's built-in plugins. Each module registers through the entry-point group
``qcompare`` in pyproject.toml, exactly as a third-party package would."""
