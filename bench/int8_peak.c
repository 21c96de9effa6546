// The CPU's own ceiling for the INT8 latency table: u8 x s8 multiply-accumulates per second of one
// core, in the instruction the int8 kernels of onnxruntime and OpenVINO (oneDNN) use on it —
// AVX512-VNNI's vpdpbusd (64 MACs into 16 int32 lanes), or, without VNNI, AVX2's
// vpmaddubsw + vpmaddwd + vpaddd (32 MACs). Twelve independent accumulator chains hide the
// instruction latency, and distinct operands keep the compiler from merging them. Compiled and run
// by bench/latency.py (gcc -O3 -DUSE_VNNI -mavx512f -mavx512bw -mavx512vnni, or -mavx2).
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 12

int main(void) {
    long iters = 50000000;
#ifdef USE_VNNI
    const double macs_per_op = 64;
    __m512i a = _mm512_set1_epi8(3), b[CHAINS], c[CHAINS];
    for (int k = 0; k < CHAINS; k++) { b[k] = _mm512_set1_epi8((char)(k + 1)); c[k] = _mm512_setzero_si512(); }
#else
    const double macs_per_op = 32;
    __m256i a = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1), b[CHAINS], c[CHAINS];
    for (int k = 0; k < CHAINS; k++) { b[k] = _mm256_set1_epi8((char)(k + 1)); c[k] = _mm256_setzero_si256(); }
#endif
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < CHAINS; k++) {
#ifdef USE_VNNI
            c[k] = _mm512_dpbusd_epi32(c[k], a, b[k]);
#else
            c[k] = _mm256_add_epi32(c[k], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b[k]), ones));
#endif
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    long check = 0;
    for (int k = 0; k < CHAINS; k++) {
#ifdef USE_VNNI
        check += _mm512_reduce_add_epi32(c[k]);
#else
        check += _mm256_extract_epi32(c[k], 0);
#endif
    }
    printf("%.3f %ld\n", iters * CHAINS * macs_per_op / seconds / 1e9, check);
    return 0;
}
