"""Where a source folder's items are: the folder itself, or one sub-folder per item."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from subtomo.errors import SubtomoError


def item_folders(root: Path, what: str, holds_item: Callable[[Path], bool],
                 skip: Callable[[Path], bool] = lambda d: False) -> list[Path]:
    """``[root]`` when it holds an item itself (or has no sub-folders), else its sub-folders, sorted.

    Parameters
    ----------
    root : Path
        The folder given with ``--source-dir``.
    what : str
        What the folder holds, for the message when it does not exist.
    holds_item : callable
        Whether a folder holds one item itself (its files, not sub-folders).
    skip : callable
        Sub-folders that are never items (a program's own output folders).

    Returns
    -------
    list of Path
        The item folders.
    """
    if not root.is_dir():
        raise SubtomoError(f"{root}: folder not found. Give --source-dir, the folder of the {what}.")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not skip(d))
    return subdirs if subdirs and not holds_item(root) else [root]
