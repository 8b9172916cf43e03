// Compiler hints shared by the CPU kernels.
//
// SPARSE_OPS_CLONES: the function is compiled three times (AVX-512, AVX2+FMA, baseline x86-64)
// and the loader picks the best the CPU has, so `#pragma omp simd` loops use wide vectors
// while the extension still loads on any x86-64 machine (the build itself has no -march).
// SPARSE_OPS_INLINE: forces the helpers into their cloned callers, so they are vectorised
// for the caller's target.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSE_OPS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPARSE_OPS_CLONES
#endif
#define SPARSE_OPS_INLINE __attribute__((always_inline)) inline
