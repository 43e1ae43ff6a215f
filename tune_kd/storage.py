"""Where results live: a local folder, or a URI that pyarrow understands (s3://, gs://, ...)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pyarrow.fs

# Where sweeps write their experiments and cache their teachers, unless told otherwise.
DEFAULT_STORAGE = "results"


class Storage:
    """A results location: a local folder, or a URI pyarrow understands (s3://, gs://, ...)."""

    def __init__(self, location: str):
        if "://" in location:
            self.uri = location.rstrip("/")
            self.fs, self.root = pyarrow.fs.FileSystem.from_uri(self.uri)
        else:
            self.uri = str(Path(location).expanduser().resolve())
            self.fs, self.root = pyarrow.fs.LocalFileSystem(), self.uri
        self.local = isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pyarrow.fs.FileType.NotFound

    def is_folder(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pyarrow.fs.FileType.Directory

    def unwritable(self) -> str | None:
        """Why files cannot be written here, found without writing anything; None when they can
        (or, for an object store, when only a write would tell)."""
        if not self.local:
            return None
        folder = Path(self.root)
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            return f"cannot write to {self.uri}: {folder} is a file, not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"cannot write to {self.uri}: {folder} is read-only"
        return None

    def write(self, content: bytes, *parts: str) -> None:
        """Write a file whole or not at all: readers see the previous file or the new one.

        A local file is written to a temporary file beside it, then renamed over it. An object
        store (s3://, gs://) shows an object only once its upload completes (one PUT, or a
        multipart upload completed at close), which is atomic already."""
        self.fs.create_dir(self.path(*parts[:-1]), recursive=True)
        if not self.local:
            with self.fs.open_output_stream(self.path(*parts)) as f:
                f.write(content)
            return
        target = Path(self.path(*parts))
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(temporary, "xb") as f:
                f.write(content)
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def remove(self, *parts: str) -> None:
        """Delete one file."""
        self.fs.delete_file(self.path(*parts))

    def read(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def folders(self) -> list[str]:
        if not self.exists():
            return []
        selector = pyarrow.fs.FileSelector(self.root, allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)
