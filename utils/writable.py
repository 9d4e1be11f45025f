"""Checks that an output file can be written, made before any work starts (a result path that fails only after
a whole evaluation or sweep has run loses that run)."""
import os


class PathError(ValueError):
    """An output path that cannot be written; the message names the flag and the path."""


def check_writable(path: str, flag: str, create_folders: bool = False) -> None:
    """PathError unless `path` can be written: its folder exists (or, with create_folders, the nearest
    existing ancestor) and is writable, and path itself is not a folder."""
    if not path:
        raise PathError(f"{flag}: empty path")
    if os.path.isdir(path):
        raise PathError(f"{flag} {path}: is a folder, expected a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if create_folders:
        while not os.path.exists(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise PathError(f"{flag} {path}: {folder} is a file, not a folder")
    if not os.path.isdir(folder):
        raise PathError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PathError(f"{flag} {path}: folder {folder} is not writable")
