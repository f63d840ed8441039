"""Lazy import hook, imported at interpreter start by ``ovis2_xinf_autoload.pth``.

It must cost nothing in processes that never import Xinference: it only puts a finder
on ``sys.meta_path`` (standard library only, no I/O). When one of the Xinference
modules below is imported, the finder lets the real loader run the module and then
hands it to the named function of :mod:`ovis2_xinf.registration`: for
``xinference.model.llm`` that happens before Xinference bootstraps its model tables.
"""

import sys
from importlib.abc import Loader, MetaPathFinder

TARGETS = {
    "xinference.model.llm": "on_llm_module_loaded",
    "xinference.api.restful_api": "on_restful_api_loaded",
}


class _RegisteringLoader(Loader):
    def __init__(self, wrapped, callback_name):
        self._wrapped = wrapped
        self._callback_name = callback_name

    def __getattr__(self, name):
        return getattr(self._wrapped, name)

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)
        try:
            from ovis2_xinf import registration

            getattr(registration, self._callback_name)(module)
        except Exception:  # never break Xinference because of the plugin
            import logging

            logging.getLogger("ovis2_xinf").exception("ovis2-xinf: registration failed")


class _XinferenceFinder(MetaPathFinder):
    def __init__(self):
        self.pending = set(TARGETS)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending:
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, TARGETS[fullname])
                return spec
        return None


def install() -> None:
    if not any(type(f).__name__ == "_XinferenceFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _XinferenceFinder())


install()
