"""Adds ``vitkit/configs/sam2`` to every Hydra config search path (lowest priority).

SAM2 composes its model configs with ``compose(config_name=config_file)`` inside the Hydra context that
``import sam2`` opens on its own package, so a config shipped by another package is found only through
the search path. With this plugin installed, ``build_sam2(config_file="sam2_vit_dino.yaml")`` works.

The directory is located with ``importlib.util.find_spec`` (no import of vitkit or torch while Hydra
scans plugins) and holds only the ``sam2_vit_*.yaml`` files, so other Hydra applications see nothing
else. A command-line ``hydra.searchpath=[...]`` override cannot replace this plugin for sam2: Hydra looks up
the primary config (``config_file``) before it applies that override. Configs of your own that list these
files in their defaults can use ``hydra: {searchpath: [pkg://vitkit.configs.sam2]}`` instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def vitkit_sam2_config_dir() -> Path | None:
    spec = importlib.util.find_spec("vitkit")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        d = Path(root) / "configs" / "sam2"
        if d.is_dir():
            return d
    return None


class VitkitSAM2SearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        d = vitkit_sam2_config_dir()
        if d is not None:
            search_path.append(provider="vitkit", path=f"file://{d}")
