"""Die (``os._exit``, as abruptly as SIGKILL) at one chosen instant of a save.

    python crash_at.py DIR before-first-commit   # history appended, first manifest never written
                                                 # (DIR/.bestsave/<run>/bestsave.json)
    python crash_at.py DIR after-commit          # epoch 2's manifest written, nothing renamed yet
    python crash_at.py DIR replacing-a-folder    # epoch 1's last (a folder) renamed over epoch
                                                 # 0's, which is moved aside, not yet deleted

DIR may be a URL (``s3://bucket/run``); a third argument gives its fsspec options as JSON. The
run monitors ``val_loss`` over the scores 0.5, 0.4, 0.3 (each a new best) with
``save_last=True``; each checkpoint holds the text ``epoch N`` (in the file ``weights`` of a
folder, for ``replacing-a-folder``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import bestsave.store
from bestsave import BestSaver
from bestsave.layout import MANIFEST
from bestsave.store import TMP_PREFIX

SCORES = [0.5, 0.4, 0.3]


def main(dirpath: str, point: str, storage_options: dict[str, Any]) -> None:
    epoch = {"now": -1}
    for store in (bestsave.store.LocalStore, bestsave.store.FsspecStore):
        write_text, rename = store.write_text, store.rename

        def dying_write_text(self: Any, name: str, text: str, write_text: Any = write_text) -> None:
            if point == "before-first-commit" and name.rsplit("/", 1)[-1] == MANIFEST:
                os._exit(9)
            write_text(self, name, text)

        def dying_rename(self: Any, src: str, dst: str, rename: Any = rename) -> None:
            if point == "after-commit" and epoch["now"] == 2:
                os._exit(9)
            rename(self, src, dst)

        store.write_text = dying_write_text  # type: ignore[method-assign]
        store.rename = dying_rename  # type: ignore[method-assign]
    rmtree = shutil.rmtree

    def dying_rmtree(path: str, *args: Any, **kwargs: Any) -> None:
        if point == "replacing-a-folder" and os.path.basename(path).startswith(TMP_PREFIX):
            os._exit(9)
        rmtree(path, *args, **kwargs)

    bestsave.store.shutil.rmtree = dying_rmtree  # type: ignore[assignment]

    def write(path: str, e: int) -> None:
        if point == "replacing-a-folder":
            os.mkdir(path)
            path = os.path.join(path, "weights")
        with open(path, "w") as f:
            f.write(f"epoch {e}")

    saver = BestSaver(
        dirpath,
        monitor="val_loss",
        save_last=True,
        async_write=False,
        trackers=(),
        storage_options=storage_options,
    )
    for e, score in enumerate(SCORES):
        epoch["now"] = e
        saver.step(e, {"val_loss": score}, write=lambda p, e=e: write(p, e))
    sys.exit("the crash point was never reached")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
