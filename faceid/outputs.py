"""Where a stage may write: the one rule, checked by every stage before any work (CLI, DVC and KFP alike).

**Folders.** A stage writes only into a folder that is

- absent (it is created),
- empty, or
- a previous output of the *same* stage: it holds the marker file ``.faceid-output.json`` that the
  stage writes into every output folder, ``{"stage": "<stage>"}`` (plus ``"identities": true`` for the
  parent folder of a many-identities run of crop-faces / embed-faces, whose sub-folders are each a
  single run's output). The marker's bytes are fixed per stage (no time, no host), so DVC and KFP see
  the same folder hash for the same outputs. Outputs written by faceid before the marker existed are
  recognised by the files that stage always writes (:data:`LEGACY`: e.g. crop-faces'
  ``manifest.parquet`` + ``contact_sheet.png`` + ``summary.txt``; batch-infer's manifest by its
  columns), so reruns and ``dvc repro`` on existing data folders keep working; the next run adds
  the marker.

Anything else is refused with an :class:`~faceid.errors.InputError` naming both paths and what to do,
before a model loads, Ray starts or a lock file is created: a non-empty folder faceid did not write,
the output of another stage, a path that is a file, a path under a file, and an output that equals,
holds or lies inside one of the stage's inputs (paths compared after resolving symlinks and ``..``).

**Files** (``infer --output x.mp4``, ``similarity --output report.json``): refused when the path is a
folder, lies under a file, equals an input or lies inside an input folder. An existing file is
replaced only when it is of the kind the stage writes, told by its content: for infer an MP4 video
(an ISO media ``ftyp`` box, as every faceid render starts with), for similarity a JSON report with
``metric`` and ``videos``; anything else (a photo, a text file, a user's notes) is refused.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from faceid.errors import InputError

MARKER = ".faceid-output.json"


def _cli(stage: str) -> str:
    return stage.replace("_", "-")


def marker_bytes(stage: str, identities: bool = False) -> bytes:
    """The marker's content: the same bytes for every output of ``stage`` (DVC hashes output folders)."""
    body = {"stage": stage, **({"identities": True} if identities else {})}
    return (json.dumps(body, sort_keys=True) + "\n").encode()


def mark(folder: str | Path, stage: str, identities: bool = False) -> None:
    """Write the marker into ``folder`` (a stage's temporary output folder before its rename, or the
    output folder of a stage that writes in place)."""
    path = Path(folder) / MARKER
    data = marker_bytes(stage, identities)
    if not path.is_file() or path.read_bytes() != data:
        path.write_bytes(data)


def written_by(folder: str | Path) -> dict | None:
    """The marker of ``folder`` as a dict, or None (no marker, or not one faceid wrote)."""
    try:
        body = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("stage"), str) else None


# --------------------------------------------------------------------------- outputs of earlier versions


def _files(*names: str) -> Callable[[Path], bool]:
    return lambda folder: all((folder / n).exists() for n in names)


def _parquet_columns(path: Path, columns: set[str]) -> bool:
    try:
        import pyarrow.parquet as pq

        return columns <= set(pq.read_schema(path).names)
    except Exception:  # not a Parquet file: not ours
        return False


def is_json_report(*keys: str) -> Callable[[Path], bool]:
    """A JSON object holding ``keys`` (a report faceid wrote)."""

    def check(path: Path) -> bool:
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(body, dict) and all(k in body for k in keys)

    return check


def _test_weights(folder: Path) -> bool:
    """A make-test-weights folder: its ``model_index.json`` carries the test-weights key (that is its
    marker; the folder is a diffusers model, so nothing else is added to it)."""
    try:
        # base_model.TEST_WEIGHTS_MARKER, spelled out: importing base_model would make it a DVC code dep of every stage
        return "_faceid_test_weights" in json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


LEGACY: dict[str, Callable[[Path], bool]] = {
    "sample_data": lambda f: (f / "identities").is_dir() and (f / "videos" / "captions.csv").is_file(),
    "crop_faces": lambda f: _files("contact_sheet.png", "summary.txt")(f)
    and _parquet_columns(f / "manifest.parquet", {"name", "sha256", "status", "reason"}),
    "embed_faces": lambda f: (f / "embeddings.safetensors").is_file()
    and is_json_report("embedder", "inliers")(f / "report.json"),
    "prepare_pose": lambda f: (f / "clips").is_dir()
    and _parquet_columns(f / "manifest.parquet", {"clip_id", "pose_path", "checksum", "status"}),
    "train_lora": lambda f: (f / "face_mapper.safetensors").is_file()
    and is_json_report("card_version")(f / "identity.json"),
    "train_shared": lambda f: False,  # new with its marker: no earlier version wrote it
    "render_validation": lambda f: is_json_report("gate", "clips")(f / "metrics.json"),
    "batch_infer": lambda f: _parquet_columns(f / "manifest.parquet", {"key", "pose_video", "output", "status"}),
    "make_test_weights": _test_weights,
}
"""Per stage: does a folder without a marker hold that stage's output as earlier faceid versions wrote it
(make-test-weights: always so, see :func:`_test_weights`)?"""


def _visible(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def is_output_of(folder: str | Path, stage: str, identities: bool = False) -> bool:
    """True when ``folder`` is an output of ``stage`` (marker, or an earlier version's layout)."""
    folder = Path(folder)
    marker = written_by(folder)
    if marker is not None:
        return marker == json.loads(marker_bytes(stage, identities))
    if identities:  # a parent folder of an earlier version: only identity outputs of this stage (or empty ones)
        entries = _visible(folder)
        return bool(entries) and all(p.is_dir() and (not any(p.iterdir()) or is_output_of(p, stage)) for p in entries)
    legacy = LEGACY.get(stage)
    return legacy is not None and legacy(folder)


# --------------------------------------------------------------------------- the checks


def _paths(inputs: Iterable) -> list[tuple[Path, Path]]:
    """``[(as given, resolved)]`` of the inputs that exist as paths (None, registry names and ``models:/``
    URIs dropped: nothing on disk to overwrite; a missing input is the stage's own error)."""
    out = []
    for p in inputs:
        if p is None or str(p) == "" or "://" in str(p) or str(p).startswith("models:/") or not Path(p).exists():
            continue
        out.append((Path(p), Path(p).resolve()))
    return out


def _under_a_file(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` when it is not a folder (a file: nothing can be made under it)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _overlap(stage: str, output: Path, resolved: Path, inputs: Iterable, file: bool = False) -> None:
    for given, inp in _paths(inputs):
        if resolved == inp:
            why = "is also an input of this run"
        elif not file and inp.is_relative_to(resolved):
            why = f"holds the input {given}"
        elif resolved.is_relative_to(inp) and (not file or inp.is_dir()):
            why = f"lies inside the input {given}"
        else:
            continue
        raise InputError(f"output {output} {why}: {_cli(stage)} would replace or change its input. Choose an "
                         f"output outside {given} (e.g. a new folder beside it); nothing was changed")


def check_folder(stage: str, output: str | Path, inputs: Iterable = (), identities: bool = False) -> Path:
    """Refuse ``output`` as the output folder of ``stage`` unless the rule (module docstring) allows it;
    ``inputs``: the run's input paths (files or folders; None and registry URIs are skipped).
    ``identities``: the parent folder of a many-identities run. Returns ``output`` as a Path."""
    output = Path(output)
    resolved = output.resolve()
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} is a file; expected a folder ({_cli(stage)} writes a folder: a new or "
                         f"empty one, or its own earlier output)")
    if (blocker := _under_a_file(resolved)) is not None:
        raise InputError(f"output {output} cannot be made: {blocker} is a file, not a folder")
    _overlap(stage, output, resolved, inputs)
    if not output.is_dir() or not any(output.iterdir()) or is_output_of(output, stage, identities):
        return output
    marker = written_by(output)
    if marker is not None:
        whose = f"holds the {'many-identities ' if marker.get('identities') else ''}output of faceid {_cli(marker['stage'])}"
    else:
        whose = f"is not empty and was not written by faceid {_cli(stage)} (it has no {MARKER})"
    kind = "a folder of identity outputs" if identities else "its output"
    raise InputError(f"output folder {output} {whose}: {_cli(stage)} writes {kind} only into a new or empty folder or "
                     f"its own earlier output, as it replaces what is there. Choose another folder; nothing in "
                     f"{output} was changed")


def is_mp4(path: Path) -> bool:
    """An ISO base media file (MP4): bytes 4-8 are ``ftyp``."""
    try:
        with open(path, "rb") as f:
            return f.read(8)[4:8] == b"ftyp"
    except OSError:
        return False


def check_file(stage: str, output: str | Path, inputs: Iterable = (), *, replaceable: Callable[[Path], bool],
               what: str) -> Path:
    """Refuse ``output`` as the output file of ``stage``: a folder, a path under a file, an input or a path
    inside an input folder, or an existing file ``replaceable`` does not recognise as ``what`` (the kind
    of file the stage writes). Returns ``output`` as a Path."""
    output = Path(output)
    resolved = output.resolve()
    if output.is_dir():
        raise InputError(f"output {output} is a folder; expected the path of {what} to write "
                         f"(e.g. {output / ('out' + output.suffix if output.suffix else 'out')})")
    if (blocker := _under_a_file(resolved)) is not None:
        raise InputError(f"output {output} cannot be made: {blocker} is a file, not a folder")
    _overlap(stage, output, resolved, inputs, file=True)
    if output.exists() and not (output.is_file() and replaceable(output)):
        raise InputError(f"output {output} exists and is not {what}: {_cli(stage)} replaces only {what} (an earlier "
                         f"run's). Choose another path, or remove it yourself")
    return output


@contextlib.contextmanager
def in_place(stage: str, output: Path, identities: bool = False) -> Iterator[Path]:
    """For a stage that writes into its output folder as it goes (batch-infer, a many-identities run):
    a new or empty folder is created and marked at once (a run that stops half-way is still
    recognised as this stage's output, and resumes); an earlier version's output is marked once the
    block succeeds. When the block fails, a folder that was new or empty and holds only the marker is
    left as it was (absent, or empty). Call :func:`check_folder` first."""
    output = Path(output)
    created = not output.exists()
    fresh = created or not any(output.iterdir())
    output.mkdir(parents=True, exist_ok=True)
    if fresh:
        mark(output, stage, identities)
    try:
        yield output
    except BaseException:
        if fresh and output.is_dir() and [p.name for p in output.iterdir()] == [MARKER]:
            if created:
                shutil.rmtree(output)
            else:
                (output / MARKER).unlink()
        raise
    mark(output, stage, identities)
