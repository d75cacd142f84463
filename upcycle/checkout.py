"""Top-level folders of a checkout that share a name with another distribution's import.

The repository keeps `adapters/` and `kernels/` at its top level; setup.cfg installs them as
`upcycle.adapters` and `upcycle.kernels`. Python puts the folder it starts from first on
`sys.path` (`python -c`, `python -m`, a script's own folder), so from the repository root the
folders are also importable as `adapters` and `kernels`, names that belong to AdapterHub's
`adapters` and to the Hub's `kernels` (which transformers >= 5.25 imports). Each folder's
`__init__.py` therefore starts with

    if __name__ != "upcycle.kernels":
        from upcycle.checkout import hand_over
        hand_over(__name__, __file__)

which replaces the module being imported with the one that the same import finds when the
checkout is not on `sys.path`, or raises ModuleNotFoundError when there is none. `import
kernels` then gives what it gives anywhere else. This module imports the standard library only:
it runs in the middle of other packages' imports (transformers imports `kernels` while it is
itself being imported).
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _same_folder(entry: str, folder: str) -> bool:
    try:
        return os.path.samefile(entry or os.curdir, folder)
    except OSError:
        return False


def hand_over(name: str, init_file: str) -> None:
    """Make the import of `name` now running load the installed module of that name instead.

    `init_file` is the `__init__.py` of the checkout's folder that Python found first. The
    search repeats with every `sys.path` entry that is the checkout's root left out, through
    all import finders (site-packages, editable installs, zip files). The found module takes
    this one's place in `sys.modules`, which is what the import statement returns.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    saved_path = sys.path[:]
    sys.modules.pop(name, None)
    try:
        sys.path[:] = [entry for entry in saved_path if not _same_folder(entry, root)]
        spec = importlib.util.find_spec(name)
    finally:
        sys.path[:] = saved_path
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
