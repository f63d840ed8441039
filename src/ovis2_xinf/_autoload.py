"""Lazy import hook, imported at interpreter start by ``ovis2_xinf_autoload.pth``.

It must cost nothing in processes that never import Xinference: it only puts a finder
on ``sys.meta_path`` (standard library only, no I/O). When ``xinference.model.llm`` is
imported, the finder lets the real loader run the module and then hands the module to
:func:`ovis2_xinf.registration.on_llm_module_loaded`, before Xinference bootstraps its
model tables.
"""

import sys
from importlib.abc import Loader, MetaPathFinder

TARGET = "xinference.model.llm"


class _RegisteringLoader(Loader):
    def __init__(self, wrapped):
        self._wrapped = wrapped

    def __getattr__(self, name):
        return getattr(self._wrapped, name)

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)
        try:
            from ovis2_xinf.registration import on_llm_module_loaded

            on_llm_module_loaded(module)
        except Exception:  # never break Xinference because of the plugin
            import logging

            logging.getLogger("ovis2_xinf").exception("ovis2-xinf: registration failed")


class _XinferenceLLMFinder(MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    if TARGET in sys.modules:
        return
    if not any(type(f).__name__ == "_XinferenceLLMFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _XinferenceLLMFinder())


install()
