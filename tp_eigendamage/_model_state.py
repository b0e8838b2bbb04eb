"""What of a model's state the package must leave as it found it: device, modes, flags, hooks."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn

__all__ = ["model_device", "restored_modes", "preserved_model_state", "grads_set_aside", "CALL_HOOKS",
           "STATE_DICT_HOOKS", "share_hooks", "has_state_dict_hooks", "adopt_modes_flags_hooks", "nearest_original"]

#: The hook tables of an ``nn.Module`` that act on a CALL (its inputs and outputs): a module
#: replaced by another computing the same function (a KFE block, its fold) keeps them.
CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
              "_backward_hooks", "_is_full_backward_hook")
#: The hook tables that act on a module's state dict (its parameter names).
STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                    "_load_state_dict_post_hooks")


def model_device(model: nn.Module, device: Optional[torch.device] = None) -> torch.device:
    """``device`` if given, else the device of the model's first parameter or buffer (CPU for
    a model without tensors)."""
    if device is not None:
        return torch.device(device)
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def restored_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit (also after an exception)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[None]:
    """Eval mode and trainable parameters inside; every mode flag and ``requires_grad`` back after.

    Parameters' ``.grad`` are never touched (gradients are taken with ``torch.autograd.grad``)
    and BatchNorm statistics do not move in eval mode. Frozen parameters are made trainable
    inside so that every layer's output carries a gradient (and is traced) like any other.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with restored_modes(model):
        try:
            model.eval()
            for p, _ in flags:
                p.requires_grad_(True)
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


@contextlib.contextmanager
def grads_set_aside(model: nn.Module) -> Iterator[None]:
    """No ``.grad`` on any parameter inside; every parameter's own ``.grad`` back after.

    For passes that take weight gradients from ``.grad`` (post-accumulate hooks), so that what
    the user had accumulated neither leaks into them nor is changed.
    """
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        for p, _ in grads:
            p.grad = None
        yield
    finally:
        for p, grad in grads:
            p.grad = grad


def share_hooks(source: nn.Module, target: nn.Module, *, state_dict: bool) -> None:
    """Give ``target`` the very hook tables of ``source`` (so the user's ``RemovableHandle``
    objects keep working): the call hooks, and the state-dict hooks if ``state_dict``."""
    for attr in CALL_HOOKS + (STATE_DICT_HOOKS if state_dict else ()):
        setattr(target, attr, getattr(source, attr))


def has_state_dict_hooks(module: nn.Module) -> bool:
    return any(getattr(module, attr) for attr in STATE_DICT_HOOKS)


def nearest_original(name: str, originals: Dict[str, nn.Module]) -> Optional[str]:
    """``name`` if it is in ``originals``, else its nearest ancestor there (a module the
    package created, e.g. a KFE block's ``rotate_in``, belongs to the layer it replaced)."""
    while name not in originals:
        if not name:
            return None
        name = name.rpartition(".")[0]
    return name


def adopt_modes_flags_hooks(result: nn.Module, original: nn.Module, *, hooks: bool) -> None:
    """Give every module of ``result`` (a changed copy of ``original``) the state its
    counterpart in ``original`` had, matched by qualified name:

    * ``training``: the module's own, or for a module created since (KFE parts, folded
      layers) that of the nearest original ancestor — the layer it replaced;
    * ``requires_grad`` of each parameter: the original parameter of the same name, else the
      same-named (or the ``weight``) parameter of the nearest original ancestor;
    * hooks (with ``hooks=True``): a module with an original of the same name gets that
      original's hook tables (the same objects, so the user's handles keep working);
      state-dict hooks only if it is still of the same type.
    """
    originals = dict(original.named_modules())
    for name, module in result.named_modules():
        source_name = nearest_original(name, originals)
        if source_name is None:
            continue
        source = originals[source_name]
        module.training = source.training
        if hooks and source_name == name:
            share_hooks(source, module, state_dict=type(source) is type(module))
        for local, param in module.named_parameters(recurse=False):
            reference = source._parameters.get(local)
            if reference is None:
                reference = source._parameters.get("weight")
            if reference is not None:
                param.requires_grad_(reference.requires_grad)
