"""Exceptions raised by imgcurate. Each names the file and the problem."""

from __future__ import annotations


class ImgcurateError(Exception):
    """Base class of imgcurate's errors."""


class FileError(ImgcurateError, ValueError):
    """A file is unreadable or holds something other than expected; the message names the file, then the problem.

    Args:
        path: the file at fault.
        problem: what is wrong with it.
    """

    def __init__(self, path: str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.problem))


class ShardError(FileError):
    """A shard (tar or parquet) is unreadable or inconsistent.

    Args:
        path: the shard file at fault.
        problem: what is wrong with it.
    """


class AlignmentError(ImgcurateError, ValueError):
    """The metadata frame no longer lines up with the tar shards (partition i must describe tar_files[i])."""


class MissingDependencyError(ImgcurateError, ImportError):
    """An optional dependency that a step needs is not installed."""

    def __init__(self, what: str, package: str, extra: str | None = None):
        hint = f"pip install 'imgcurate[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{what} needs {package!r}, which is not installed: {hint}")


class ConfigError(ImgcurateError, ValueError):
    """A pipeline configuration is wrong: an unknown key, a missing one, or a value of the wrong type.

    The message is one line that names the key and the value.
    """


class WeightFileError(FileError):
    """A weight file is unreadable, or holds something other than the model expected.

    Args:
        path: the file (or the member of a zip) at fault.
        problem: what is wrong with it; names the layer where one is at fault.
    """


class MissingWeightsError(ImgcurateError, RuntimeError):
    """A model's pretrained weights cannot be loaded here (not in the caches, no network); the message says how to
    provide them."""


class ClusterError(ImgcurateError, RuntimeError):
    """The workers of a running cluster cannot run the pipeline: a module or package that a step needs does not import
    there, or what a step loads (weights) is not there. Raised before any work, naming what is missing and on how
    many workers."""


class ConcurrentExportError(ImgcurateError, RuntimeError):
    """Another export into the same folder ran at the same time as this one; the folder is left marked as an export
    that did not finish (it opens as an error), and rerunning one export finishes it."""


def one_line(err: BaseException) -> str:
    """An error's message on one line (its type's name when it has none), to quote inside another message."""
    return " ".join(str(err).split()) or type(err).__name__


#: The packages whose errors are an object store's answer (or its absence), not a fault of imgcurate's.
_STORE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "azure.core", "google.auth", "google.api_core",
                  "google.cloud.storage")  # fmt: skip


def from_an_object_store(err: BaseException) -> bool:
    """Whether ``err`` is an object store's answer: no credentials, an endpoint that does not answer, access denied."""
    return any(kind.__module__ == m or kind.__module__.startswith(m + ".") for kind in type(err).__mro__
               for m in _STORE_MODULES)  # fmt: skip
