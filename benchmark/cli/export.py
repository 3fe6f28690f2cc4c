"""`bench export`: a bench checkpoint written in its method's official release layout."""

from __future__ import annotations

from benchmark.cli.common import EXIT_OK, EXIT_USAGE, _fail, out


def cmd_export(checkpoint: str, target: str, encoder_only: bool) -> int:
    from pathlib import Path

    from benchmark.core.checkpoint import load, save
    from benchmark.core.errors import CheckpointError
    from benchmark.official import to_official

    path = Path(target)
    if path.exists():
        return _fail(f"output file already exists: {path}", EXIT_USAGE)
    try:
        layout, payload = to_official(load(checkpoint), encoder_only)
    except (CheckpointError, KeyError) as exc:
        return _fail(f"cannot export {checkpoint}: {exc}", EXIT_USAGE)
    save(path, payload)
    out.print(
        f"wrote {path}: official {layout} layout ({', '.join(payload)})", highlight=False, markup=False, soft_wrap=True
    )
    return EXIT_OK
