"""Loads a script of experiments/ as a module (experiments/ is not a package the tests import from)."""

import importlib.util
import pathlib


def load(name: str):
    path = pathlib.Path(__file__).parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
