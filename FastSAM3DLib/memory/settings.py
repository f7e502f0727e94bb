"""The memory plug-in's choices and defaults, without PyTorch: the command line builds its ``--memory-*`` options
from them on a computer that only talks to a server (see :mod:`.plugin` for what they mean)."""

RULES = ("attention", "values", "released")
RETRIEVALS = ("knn", "random")
DEFAULT_K = 3
DEFAULT_LOCAL_RATIO = 0.3
#: how ``memory build`` crops a structure: on its label (the papers' protocol) or around its deepest voxel
CROPS = ("gt", "click")
#: storage types of a bank's keys and values (names of torch dtypes)
KV_DTYPE_NAMES = ("float16", "float32", "bfloat16")
#: retrieval descriptors (:mod:`.retrieval` registers one function under each name)
DESCRIPTOR_NAMES = ("pooled32", "pooled16", "voxels")
