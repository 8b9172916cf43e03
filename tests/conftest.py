import os

import torch

# The Triton tests run the kernels compiled for the GPU when a CUDA device is visible, and on CPU
# tensors through the interpreter otherwise, or when SPARSE_OPS_TRITON_INTERPRET=1 asks for the
# interpreter on a GPU machine. Triton reads TRITON_INTERPRET when @triton.jit decorates, so it
# must be set before any kernel module is imported.
if os.environ.get("SPARSE_OPS_TRITON_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "1"
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk caches, private to this test run: inductor's FX-graph / AOT caches
# outlive a change of a custom op's schema (seen here: a cached graph called gated_ffn_backward
# with the previous argument list after the schema gained two tensors).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparse_ops_inductor_")
