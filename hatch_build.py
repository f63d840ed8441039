"""Ship ``ovis2_xinf_autoload.pth`` at the root of site-packages, editable installs too.

The ``.pth`` arms the lazy Xinference import hook in every interpreter (and in the
per-model virtualenvs Xinference creates, which process the parent's ``.pth`` files).
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PTH = "src/ovis2_xinf_autoload.pth"


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        key = "force_include_editable" if version == "editable" else "force_include"
        build_data.setdefault(key, {})[PTH] = "ovis2_xinf_autoload.pth"
