"""Hydra composition for every vitkit command: one helper, the global Hydra state left as it was found."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["compose"]


def compose(overrides: list[str] | None = None, config_name: str = "train",
            config_dir: str | os.PathLike | None = None):
    """Compose a config with command-line style overrides (``key=value``, ``group=option``).

    Args:
        overrides: Hydra overrides.
        config_name: the config to compose (``train``, ``stream/default``...; a file name without ``.yaml``).
        config_dir: a directory of YAML files; None composes vitkit's packaged configs (``vitkit.configs``).

    Another Hydra context that is open (e.g. sam2's, opened on import) is restored afterwards, so composing
    here never changes what the caller's own ``hydra.compose`` sees.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        if config_dir is None:
            context = initialize_config_module(config_module="vitkit.configs", version_base=None)
        else:
            context = initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None)
        with context:
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    finally:
        restore_gh_from_backup(backup)
