"""Where results live: a local folder, or a URI that pyarrow understands (s3://, gs://, ...)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs

# Every planned trial of an experiment, written by the sweep beside Tune's files.
PLAN_FILE = "tune_kd_plan.json"


class Storage:
    """A results location: a local folder, or a URI pyarrow understands (s3://, gs://, ...)."""

    def __init__(self, location: str):
        if "://" in location:
            self.uri = location.rstrip("/")
            self.fs, self.root = pyarrow.fs.FileSystem.from_uri(self.uri)
        else:
            self.uri = str(Path(location).expanduser().resolve())
            self.fs, self.root = pyarrow.fs.LocalFileSystem(), self.uri

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pyarrow.fs.FileType.NotFound

    def write(self, content: bytes, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts[:-1]), recursive=True)
        with self.fs.open_output_stream(self.path(*parts)) as f:
            f.write(content)

    def read(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def folders(self) -> list[str]:
        if not self.exists():
            return []
        selector = pyarrow.fs.FileSelector(self.root, allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)
