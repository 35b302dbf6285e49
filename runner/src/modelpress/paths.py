"""The one resolver for every path a job reads or writes inside a place it was given.

A claim, a scratch folder and a source model are boundaries: a relative path from a URI, an S3
key or a hub file list must land inside its boundary after symbolic links are followed, or the job
stops with the offending path named. Nothing here touches torch, so the runner, the engine and the
operator's tests all use it.
"""

import os
from pathlib import Path, PurePosixPath

from modelpress.engine.errors import ModelPressError


class PathEscape(ModelPressError):
    """A path that would leave the place it was confined to: bad input, never worth a retry."""


def climbs(relative: str) -> bool:
    """Whether a relative path, by its text alone, could leave the folder it is read in: absolute, `..`, `\\` or NUL."""
    return relative.startswith("/") or "\\" in relative or "\0" in relative or ".." in PurePosixPath(relative).parts


def confined(root: Path, relative: str, follow_last: bool = True) -> Path:
    """`root / relative`, refused when `relative` is absolute, climbs with `..`, or a link leads out of `root`.

    With `follow_last=False` only the folders on the way are resolved: the caller acts on the last
    entry itself (replaces or removes a link, never writes through it).
    """
    if climbs(relative):
        raise PathEscape(f"{relative!r} leaves {root}")
    target = root.joinpath(*PurePosixPath(relative).parts)
    real_root = root.resolve()
    real = target.resolve() if follow_last else target.parent.resolve()
    if real != real_root and not real.is_relative_to(real_root):
        raise PathEscape(f"{relative!r} leads out of {root} (to {real})")
    return target


def source_root(model_dir: Path) -> Path:
    """The folder a model's files may link into: the repository folder of a hub cache snapshot, else the model's own."""
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--"):
        return model_dir.parent.parent  # snapshots/<rev>/x links to ../../blobs/<hash>
    return model_dir


def escaping_links(model_dir: Path) -> list[tuple[str, str]]:
    """Every symbolic link in a model folder that resolves outside `source_root`: (file, what the link says)."""
    root = source_root(model_dir).resolve()
    found = []
    for folder, dirs, files in os.walk(model_dir):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            if path.is_symlink():
                if not path.resolve().is_relative_to(root):
                    found.append((path.relative_to(model_dir).as_posix(), os.readlink(path)))
    return found


def refuse_escaping_links(model_dir: Path, field: str) -> None:
    """Stop before a model whose files link outside it is read: its output would carry what the link reached."""
    links = escaping_links(model_dir)
    if links:
        name, target = links[0]
        more = f" (and {len(links) - 1} more)" if len(links) > 1 else ""
        raise PathEscape(f"{field}: {name} is a symbolic link to {target}, outside the model folder{more}; "
                         "replace it with the file itself")
