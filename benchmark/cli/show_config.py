"""`bench config`: the resolved config of the given overrides, printed without running anything."""

from __future__ import annotations

from benchmark.cli.common import EXIT_OK, EXIT_USAGE, _fail, out


def cmd_config(overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    from benchmark.config import load_config
    from benchmark.core.errors import ConfigError

    try:
        cfg = load_config(overrides)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    out.print(OmegaConf.to_yaml(cfg), highlight=False, markup=False, soft_wrap=True)
    return EXIT_OK
