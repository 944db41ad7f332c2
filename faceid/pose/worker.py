"""prepare-pose's local worker process (:func:`faceid.pose.clips.make_in_processes`):
``python -m faceid.pose.worker``, started by the stage, never by a user.

Reads JSON lines on stdin: first ``{"cfg": <prepare_pose settings>, "staging": <folder>}``, then one
:class:`~faceid.pose.clips.ClipJob` a line; answers each with the clip's outcome, one JSON line on
stdout (anything else the libraries print goes to stderr). Ends at the end of its input (also when
the stage that started it dies). Models that cannot be built: one ``{"fatal": <message>}`` line.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (libraries) go to stderr, not the answers

    from faceid.config import PreparePoseConfig
    from faceid.errors import FaceidError
    from faceid.pose.clips import ClipJob, ClipMaker

    first = sys.stdin.readline()
    if not first:
        return
    setup = json.loads(first)
    maker = ClipMaker(PreparePoseConfig(**setup["cfg"]), setup["staging"])
    try:
        maker.build()
    except FaceidError as exc:
        answers.write(json.dumps({"fatal": str(exc)}) + "\n")
        return
    try:
        for line in sys.stdin:
            job = ClipJob(**json.loads(line))
            answers.write(json.dumps(maker.make_one(job)) + "\n")
    finally:
        maker.close()


if __name__ == "__main__":
    main()
