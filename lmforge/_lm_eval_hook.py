"""Make plain `lm_eval --model lmforge` work with lm-eval 0.4.x, which has no plugin lookup for models.

lm-eval finds a model type only in its own registry, filled when `lm_eval.models` is imported; it reads no
entry points. A one-line `lmforge_lm_eval.pth` in site-packages (written by `scripts/setup.sh` when lm-eval
is installed, or by `python -m lmforge._lm_eval_hook install`) runs `install()` at interpreter start. That
adds an import hook which waits for `lm_eval.models` to finish loading and then registers "lmforge" as a
*lazy* entry (the string "module:attr"), so nothing of ours, torch included, is imported until lm-eval asks
for the model. Processes that never import lm_eval pay for one tiny module and one finder on sys.meta_path.

This module must stay import-light and must never raise at startup: a broken hook would break every Python
process in the environment.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

TARGET = "lm_eval.models"
MODEL_NAME = "lmforge"
LAZY_PATH = "lmforge.eval.lm_eval_adapter:LMForgeLM"
PTH_NAME = "lmforge_lm_eval.pth"
# One line (site.py runs .pth lines that start with "import"); an uninstalled lmforge leaves it silent.
PTH_LINE = ('import sys; exec("try:\\n import lmforge._lm_eval_hook as h; h.install()\\n'
            'except ImportError:\\n pass")\n')


def register_lazily() -> None:
    """Add "lmforge" to lm-eval's model registry without importing the adapter (it loads on first use)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=LAZY_PATH)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of `lm_eval.models` so registration runs right after it."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 (importlib's protocol)
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):  # noqa: ANN001
            exec_module(module)
            try:
                register_lazily()
            except Exception as exc:  # noqa: BLE001 (lm_eval itself must keep working)
                print(f"lmforge: could not register the lm_eval model type: {exc}", file=sys.stderr)

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Put the hook on sys.meta_path once (called from the .pth file at interpreter start)."""
    try:
        if any(isinstance(f, _AfterImport) for f in sys.meta_path):
            return
        if TARGET in sys.modules:  # lm_eval already imported (install() called late, e.g. from a test)
            register_lazily()
            return
        sys.meta_path.insert(0, _AfterImport())
    except Exception:  # noqa: BLE001 (never break interpreter start)
        pass


def site_packages() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


def write_pth(directory: Path | None = None) -> Path:
    """Write the one-line .pth that calls install() at interpreter start; returns its path."""
    target = (directory or site_packages()) / PTH_NAME
    tmp = target.with_suffix(".tmp")
    tmp.write_text(PTH_LINE)
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["install"]:
        print(f"wrote {write_pth()}")
        return 0
    if args == ["uninstall"]:
        path = site_packages() / PTH_NAME
        path.unlink(missing_ok=True)
        print(f"removed {path}")
        return 0
    print("usage: python -m lmforge._lm_eval_hook install|uninstall", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
