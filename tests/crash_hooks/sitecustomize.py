"""Tests only: makes a process die, for real, on marked images. Never imported by the package.

A test copies this file into a folder of its own and puts that folder first on PYTHONPATH of
the processes it starts (a `dskd score`, and through the job's runtime_env its Ray workers, and
their decoder processes): Python imports `sitecustomize` at start-up. When a process then
imports `dskd_ray.io.images` or `dskd_ray.inference.scoring`, the functions below are wrapped:

- `decode_image` on bytes that start with `DSKD-CRASH:segv\\n` kills its process with SIGSEGV,
  `DSKD-CRASH:kill\\n` with SIGKILL (what the OOM killer sends), and `DSKD-CRASH:once-<name>\\n`
  with SIGSEGV the first time only (a file beside this one remembers), then decodes the rest;
- `BatchScorer.score_batch` on a batch holding an image whose every pixel is 13 kills its
  process with SIGKILL.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import resource
import signal
import sys
from pathlib import Path

MAGIC = b"DSKD-CRASH:"
HERE = Path(__file__).resolve().parent


def _die(sig: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
    os.kill(os.getpid(), sig)


def _patch_images(module) -> None:  # noqa: ANN001 - the module just executed
    original = module.decode_image

    def decode_image(data: bytes, size: int | None = None):  # noqa: ANN202
        if data[: len(MAGIC)] == MAGIC:
            mode, _, rest = data[len(MAGIC) :].partition(b"\n")
            if mode == b"segv":
                _die(signal.SIGSEGV)
            if mode == b"kill":
                _die(signal.SIGKILL)
            if mode.startswith(b"once-"):
                flag = HERE / f"crashed-{mode.decode()}"
                if not flag.exists():
                    flag.touch()
                    _die(signal.SIGSEGV)
                data = rest
        return original(data, size)

    module.decode_image = decode_image


def _patch_scoring(module) -> None:  # noqa: ANN001
    original = module.BatchScorer.score_batch

    def score_batch(self, images):  # noqa: ANN001, ANN202
        if len(images) and (images.reshape(len(images), -1) == 13).all(axis=1).any():
            _die(signal.SIGKILL)
        return original(self, images)

    module.BatchScorer.score_batch = score_batch


PATCHES = {"dskd_ray.io.images": _patch_images, "dskd_ray.inference.scoring": _patch_scoring}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module) -> None:  # noqa: ANN001
            execute(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
