"""Segment with a FastSAM3D server instead of a local model: :class:`RemoteSession` (numpy + standard library).

``RemoteSession(url, model, volume)`` behaves like :class:`FastSAM3DLib.session.InteractiveSession` (``add_click``,
``undo``, ``reset``, ``set_image``, ``full_mask``, ``clicks``, ``roi``, ``low_res_logits``) and gives bit for bit
the same results as a local session with the same model on this computer, because the geometry never leaves
the workstation: the client chooses the region, cuts and normalises the 128^3 model input with the library's
geometry code, sends only that (float32, losslessly compressed) and the clicks in model voxel coordinates, gets
back the 32^3 low-res logits and pastes them back itself. PyTorch is not needed (see :func:`library_geometry`).
No file name, DICOM header, patient position or voxel outside the region goes over the wire; nothing is pickled.

Failures never change the session: a refused or failed click raises (the same errors as a local session for
bad input, :class:`ServerError` subclasses for the server's refusals) and leaves clicks, result and undo history
exactly as they were. When the server restarted, expired the session, or Ray moved it to another replica, the
client opens a new session and sends the region and its last logits again: one slower click, same result.

Growth over several regions (``RemoteSession(..., grow=True)``, as ``InteractiveSession``'s, see
:mod:`FastSAM3DLib.growth`) runs its bookkeeping here and every region's decoder run on the server, one request
each, with the same results as a local session; it needs PyTorch on this computer (without it the session
segments one region per click and says so in ``growth_note``).

The token comes from the ``token`` argument or the ``FASTSAM3D_TOKEN`` environment variable, is sent only in
the ``Authorization`` header and kept only in memory, never written anywhere (keep it out of the MRML scene).

* :mod:`.client`: :class:`ServerClient` (HTTP, token, retries) and the :class:`ServerError` family;
* :mod:`.cut_and_paste`: the region's model input and the pasting back of the logits, with or without PyTorch;
* :mod:`.session`: :class:`RemoteSession`.
"""
from . import client, cut_and_paste, session
from .client import (TOKEN_ENV, ModelOutputError, ModelUnavailableError, ProtocolMismatchError, ServerAuthError,
                     ServerBusyError, ServerClient, ServerError, ServerFullError, ServerUnavailableError,
                     is_server_url)
from .cut_and_paste import library_geometry, model_input, paste_back, torch_cpu_fuses, upsample_logits
from .session import Click, ClickResult, RemoteSession, grows_by_default

__all__ = ["TOKEN_ENV", "ModelOutputError", "ModelUnavailableError", "ProtocolMismatchError", "ServerAuthError",
           "ServerBusyError", "ServerClient", "ServerError", "ServerFullError", "ServerUnavailableError",
           "is_server_url", "library_geometry", "model_input", "paste_back", "torch_cpu_fuses", "upsample_logits",
           "Click", "ClickResult", "RemoteSession", "grows_by_default", "client", "cut_and_paste", "session"]
