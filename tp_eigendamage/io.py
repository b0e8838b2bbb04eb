"""Saving and loading pruned models (KFE blocks included) as one file.

A pruned model no longer matches its architecture's constructor, so a state dict alone cannot
be loaded into a freshly built model. :func:`save` therefore pickles the WHOLE module with
``torch.save`` — its classes come from torch, timm and tp_eigendamage, so loading needs those
packages and nothing else — together with a small header::

    {"format": "tp_eigendamage.model", "format_version": 1,
     "versions": {"tp_eigendamage": ..., "torch": ..., "torch_pruning": ..., "timm": ...},
     "metadata": {...user JSON-like data...}, "model": <nn.Module>}
"""
from __future__ import annotations

import io
import os
import pickle
import tempfile
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ._version import versions
from .errors import InvalidArgumentError, ModelFileError

__all__ = ["save", "load", "load_with_metadata", "FORMAT", "FORMAT_VERSION"]

FORMAT = "tp_eigendamage.model"
FORMAT_VERSION = 1


def save(model: nn.Module, path: str, metadata: Optional[dict] = None) -> None:
    """Write ``model`` (any ``nn.Module``, e.g. a pruned timm model) and ``metadata`` to ``path``.

    The file is written to a temporary name and renamed, so ``path`` never holds half a file.

    Raises:
        ModelFileError: the folder of ``path`` does not exist.
        InvalidArgumentError: ``model`` is not a module, ``path`` is a directory, the metadata
            or the model cannot be pickled.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"save() needs an nn.Module, got {type(model).__name__}")
    if os.path.isdir(path):
        raise InvalidArgumentError(f"{path!r} is a directory; give a file path to save to, e.g. "
                                   f"{os.path.join(path, 'model.pt')!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ModelFileError(f"directory {directory!r} does not exist; create it before saving to {path!r}")
    _check_metadata(metadata)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(),
               "metadata": dict(metadata or {}), "model": model}
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise InvalidArgumentError(f"the model cannot be pickled ({exc}); remove hooks, lambdas or other local "
                        "objects attached to it before saving") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_metadata(metadata: Optional[dict]) -> None:
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidArgumentError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        torch.save(dict(metadata or {}), io.BytesIO())
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise InvalidArgumentError(f"the metadata cannot be pickled ({exc}); keep it to plain data "
                                   "(numbers, strings, lists, dicts, tensors)") from exc


def load_with_metadata(path: str, map_location=None) -> Tuple[nn.Module, dict]:
    """``(model, header)`` from a file written by :func:`save`; ``header`` lacks the model.

    This UNPICKLES the file (``torch.load(weights_only=False)``), which can run arbitrary code:
    load only files you trust.
    """
    if not os.path.isfile(path):
        raise ModelFileError(f"model file {path!r} does not exist; give the path written by tp_eigendamage.save")
    not_ours = (f"{path!r} is not a tp_eigendamage model file (write one with tp_eigendamage.save(model, path)); "
                "a plain state_dict must be loaded with model.load_state_dict into the pruned architecture")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise ModelFileError(f"{not_ours} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("model"), nn.Module):
        raise ModelFileError(not_ours)
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"{path!r} has format version {payload['format_version']}, newer than this "
                         f"tp_eigendamage reads ({FORMAT_VERSION}); upgrade tp_eigendamage")
    model = payload.pop("model")
    return model, payload


def load(path: str, map_location=None) -> nn.Module:
    """The model saved at ``path`` by :func:`save` (unpickles: trusted files only).

    Raises:
        ModelFileError: no such file, not a tp_eigendamage model file, or a newer format.
    """
    return load_with_metadata(path, map_location)[0]
