import os

# The Triton tests run the kernels on CPU tensors through the interpreter. Triton reads this
# when @triton.jit decorates, so it must be set before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
