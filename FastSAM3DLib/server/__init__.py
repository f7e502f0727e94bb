"""The FastSAM3D inference server: one GPU shared by many Slicer users (``python -m FastSAM3DLib.server``).

* :mod:`.protocol` -- the wire format (numpy and the standard library only; the client uses it too).
* :mod:`.engine` -- models, per-session state and the click computation (torch).
* :mod:`.app` -- the ASGI app (Starlette): auth, limits, validation, error replies.
* :mod:`.ray_serve` -- the same app as a Ray Serve deployment, sessions multiplexed onto replicas.
* :mod:`.command` -- the ``serve`` command line.

The workstation keeps the geometry (see :mod:`FastSAM3DLib.remote`): the server only ever sees 128^3 model
inputs, model-space points and low-res logits, never a file name, a DICOM header or a patient's coordinates.
Importing this package imports nothing else; the server's dependencies are the ``server`` extra.
"""
