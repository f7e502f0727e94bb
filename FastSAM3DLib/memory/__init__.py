"""Memorizing SAM (Shao, Shen, Unberath 2024) as a plug-in: memory banks and memory attention in one encoder block.

Use::

    from FastSAM3DLib.memory import attach_memory, load_bank
    handle = attach_memory(model, load_bank("bank.safetensors", model))   # refused if it does not fit the model
    ...                                     # every encoder call now retrieves k entries and mixes their memory
    handle.detach()                         # the model is exactly as before

or ``build_model(name, checkpoint="cached", memory="bank.safetensors")`` (``memory={"bank": ..., "k": 5}`` for
other settings); on the command line ``segment --memory BANK`` and ``evaluate --memory BANK``; in Slicer the
effect's "Memory bank" option (Model options).

* :mod:`.bank`: the bank file (one ``.safetensors``, provenance in its header), loading and fit checks.
* :mod:`.header`: the header alone, without PyTorch (the effect's bank menu).
* :mod:`.retrieval`: descriptors and exact kNN.
* :mod:`.settings`: the plug-in's choices and defaults, without PyTorch.
* :mod:`.plugin`: :func:`attach_memory` and the mixing rules (``"attention"``, ``"values"``, ``"released"``).
* :mod:`.build`: making a bank from labelled data with our own encoder.
* :mod:`.evaluation`: memory on/off evaluation with the leakage guard, and the paired statistics.
* :mod:`.cli`: ``python -m FastSAM3DLib memory build|inspect`` and the ``--memory`` options.

Nothing heavy is imported here until a name is used.
"""

_EXPORTS = {
    "MemoryBank": "bank",
    "MemoryBankError": "header",
    "load_bank": "bank",
    "save_bank": "bank",
    "read_bank_metadata": "header",
    "find_banks": "header",
    "check_fits": "bank",
    "checkpoint_sha256": "header",
    "default_block": "bank",
    "encoder_sha256": "bank",
    "attach_memory": "plugin",
    "attached_memory": "plugin",
    "detach_memory": "plugin",
    "MemoryHandle": "plugin",
    "MemoryOverflowError": "plugin",
    "memory_weights": "plugin",
    "RULES": "settings",
    "knn": "retrieval",
    "describe": "retrieval",
    "DESCRIPTORS": "retrieval",
    "build_bank": "build",
    "record_kv": "build",
    "inspect_text": "build",
    "evaluate_with_memory": "evaluation",
    "paired_comparison": "evaluation",
    "add_subcommands": "cli",
    "add_memory_arguments": "cli",
    "attach_from_args": "cli",
    "memory_options": "cli",
    "main": "cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    """Import public names on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'FastSAM3DLib.memory' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
