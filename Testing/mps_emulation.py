"""Apple's MPS device, emulated on the CPU for tests: what fails for a Mac user fails here too.

MPS has no float64: creating or converting a float64 tensor on it raises ``TypeError`` (PyTorch's
``aten/src/ATen/mps/EmptyTensor.cpp``), an MPS tensor has no ``.numpy()``, and torch 2.4-2.8 (the oldest this
project supports) have no MPS kernel for ``max_pool3d`` and ``avg_pool3d`` (``NotImplementedError`` unless
``PYTORCH_ENABLE_MPS_FALLBACK=1`` was set before torch was imported; 2.9 added both). Inside :func:`emulated_mps`,
tensors made with ``device="mps"`` (a factory, ``.to("mps")``) and everything computed from them are CPU tensors
tagged as MPS (their ``.device`` says ``mps``); a float64 result, ``.numpy()`` or one of those pooling ops on a
tagged tensor raises as on a Mac, and ``.cpu()`` / ``.to("cpu")`` remove the tag. Not emulated: the rule that an op
may not mix MPS and CPU tensors (the model's own weights stay on the CPU here), and MPS's speed.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

MPS_FLOAT64 = "Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64. " \
              "Please use float32 instead."
_TO_CPU = {torch.Tensor.cpu}
#: ops without an MPS kernel in torch 2.4-2.8 (native_functions.yaml lists CPU and CUDA only; MPS came in 2.9)
NO_MPS_KERNEL = ("max_pool3d", "max_pool3d_with_indices", "avg_pool3d")


class MPSTensor(torch.Tensor):
    """A CPU tensor that says it lives on MPS (the emulation's tag)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:  # noqa: D401 - what the library reads to choose where to compute
        return torch.device("mps")

    @property
    def is_mps(self) -> bool:
        return True


def _device_type(device):
    """``"mps"``, ``"cpu"``, ... for a device argument (a tensor's: the emulated one), None for none or a dtype."""
    if isinstance(device, torch.Tensor):
        return device.device.type
    try:
        return None if device is None or isinstance(device, torch.dtype) else torch.device(device).type
    except (TypeError, RuntimeError):
        return None


def _plain(value):
    return value.as_subclass(torch.Tensor) if isinstance(value, MPSTensor) else value


def _device_argument(func, args, kwargs):
    """The device a call asks for: its ``device=`` keyword, or ``Tensor.to``'s first argument after self."""
    if "device" in kwargs:
        return kwargs["device"]
    if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], torch.dtype):
        return args[1]
    return None


class _EmulatedMPS(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        tagged_input = any(isinstance(a, MPSTensor) for a in tree_flatten((args, kwargs))[0])
        target = _device_argument(func, args, kwargs)
        kind = _device_type(target)
        to_mps, to_cpu = kind == "mps", kind == "cpu" or func in _TO_CPU
        name = getattr(func, "__name__", "")
        if tagged_input and name in NO_MPS_KERNEL:
            raise NotImplementedError(f"The operator 'aten::{name}' is not currently implemented for the MPS device. "
                                      "As a temporary fix, you can set the environment variable "
                                      "`PYTORCH_ENABLE_MPS_FALLBACK=1` to use the CPU as a fallback for this op.")
        if func is torch.Tensor.numpy and tagged_input:
            raise TypeError("can't convert mps:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        if to_mps:  # create or move on the CPU, then tag
            if "device" in kwargs:
                kwargs["device"] = "cpu"
            else:
                args = (args[0], "cpu", *args[2:]) if not isinstance(args[1], torch.Tensor) else \
                    (args[0], args[1].dtype, *args[2:])
        out = func(*tree_map(_plain, args), **tree_map(_plain, kwargs))
        if to_cpu or not (to_mps or tagged_input):
            return out

        def tag(value):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                if value.dtype == torch.float64:
                    raise TypeError(MPS_FLOAT64)
                return value.as_subclass(MPSTensor)
            return value
        return tree_map(tag, out)


@contextlib.contextmanager
def emulated_mps() -> Iterator[None]:
    """Run the block with the MPS rules above (``torch.device("mps")`` tensors are tagged CPU tensors)."""
    with _EmulatedMPS():
        yield
