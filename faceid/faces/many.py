"""Many identities as one job: ``faceid crop-faces`` / ``embed-faces`` on a folder of identity folders.

The rule, the same for both stages: a folder that holds no input of one identity directly (no photo
for crop-faces: :func:`faceid.faces.crop.holds_identities`; no ``manifest.parquet`` for embed-faces:
:func:`faceid.faces.embed.holds_identities`) but visible sub-folders is a folder of identities. Each
visible sub-folder is one identity, processed into ``<output>/<sub-folder name>/`` exactly as a single
run would write it, with the models loaded once for all. Hidden entries (``.name``: lock files,
temporary folders) are ignored. Each identity takes its own output lock and is written atomically:
an identity that fails (no usable photo, two people, a lock held by another run) keeps its output
as it was, and the others go on; the job then fails at the end, naming each failed identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from faceid.errors import FaceidError, InputError
from faceid.io import require_dir


def identity_folders(parent: Path, output_dir: Path, what: str) -> list[Path]:
    """The visible sub-folders of ``parent``, by name; the output may be neither ``parent`` nor inside
    one of them (it would replace or become an identity's input)."""
    parent = require_dir(parent, what)
    folders = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"{parent}: no identity folders (expected {what})")
    out = Path(output_dir).resolve()
    if out == parent.resolve() or any(out == f.resolve() or f.resolve() in out.parents for f in folders):
        raise InputError(f"{output_dir}: the output must be a folder outside the identity folders of {parent}")
    return folders


def each_identity(stage: str, folders: list[Path], output_dir: Path, check: Callable[[Path], object],
                  open_models: Callable[[], contextlib.AbstractContextManager],
                  process: Callable[[Path, Path, object, str], dict]) -> dict[str, dict]:
    """``{identity: summary}``: ``process(folder, output_dir / folder.name, models, progress label)`` per
    identity folder, with ``models`` from ``open_models()`` opened once, after ``check(folder)`` has
    looked at every identity's inputs (a failed check is that identity's failure). Progress and each
    outcome are printed; raises :class:`InputError` at the end if any identity failed."""
    output_dir = Path(output_dir)
    n = len(folders)
    failed: dict[str, str] = {}
    for folder in folders:
        try:
            check(folder)
        except (FaceidError, OSError) as exc:
            failed[folder.name] = str(exc)
    print(f"{stage}: {n} identities in {folders[0].parent} -> {output_dir}/<identity>/")
    done: dict[str, dict] = {}
    with open_models() if len(failed) < n else contextlib.nullcontext() as models:
        for k, folder in enumerate(folders, start=1):
            name = folder.name
            if name not in failed:
                print(f"{stage} [{k}/{n}] {name}", flush=True)
                try:
                    done[name] = process(folder, output_dir / name, models, f"{stage} {k}/{n} {name}")
                except (FaceidError, OSError) as exc:
                    failed[name] = str(exc)
            if name in failed:
                print(f"{stage} [{k}/{n}] {name}: FAILED, {output_dir / name} left as it was: "
                      f"{failed[name].splitlines()[0]}", flush=True)
    print(f"{stage}: {len(done)}/{n} identities done" + (f", {len(failed)} failed: {', '.join(sorted(failed))}" if failed else ""))
    if failed:
        details = "\n".join(f"  {name}: " + msg.replace("\n", "\n    ") for name, msg in sorted(failed.items()))
        raise InputError(f"{len(failed)} of {n} identities failed (their outputs are left as they were; "
                         f"{len(done)} done):\n{details}")
    return done
