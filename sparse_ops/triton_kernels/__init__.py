"""Triton kernels (GPU path; CPU tensors only under TRITON_INTERPRET=1). One module per family.

Imported lazily by the ops (sparse_ops.ops.*) when the triton backend is chosen, so that
importing sparse_ops never requires triton.
"""
