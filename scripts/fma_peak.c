/* f32 FMA peak of this CPU on 1 and 2 threads: 12 independent FMA chains per thread, AVX-512
   (16-wide) when the compiler targets it, else AVX2 (8-wide). The AVX2-only variant is
   ../shared/bench/fma_peak.c; this one adds the AVX-512 width for machines that have it.
   Build and run: gcc -O3 -march=native -pthread scripts/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#define N 100000000L
#define CHAINS 12
#ifdef __AVX512F__
#define W 16
typedef __m512 vec;
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define STORE _mm512_storeu_ps
#else
#define W 8
typedef __m256 vec;
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define STORE _mm256_storeu_ps
#endif
static void *run(void *out) {
    vec x[CHAINS], m = SET1(0.999999f), c = SET1(1e-7f);
    for (int i = 0; i < CHAINS; i++) x[i] = SET1((float)i);
    for (long n = 0; n < N; n++)
        for (int i = 0; i < CHAINS; i++) x[i] = FMA(x[i], m, c);
    float s = 0, t[W];
    for (int i = 0; i < CHAINS; i++) { STORE(t, x[i]); s += t[0]; }
    *(float *)out = s;
    return 0;
}
int main(void) {
    printf("vector width %d floats\n", W);
    for (int th = 1; th <= 2; th++) {
        pthread_t t[2]; float r[2]; struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (int i = 0; i < th; i++) pthread_create(&t[i], 0, run, &r[i]);
        for (int i = 0; i < th; i++) pthread_join(t[i], 0);
        clock_gettime(CLOCK_MONOTONIC, &b);
        double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9;
        printf("%d thread(s): %.1f GFLOP/s (%.2f s)\n", th, th * N * (double)CHAINS * W * 2 / s / 1e9, s);
    }
    return 0;
}
