// Grouped, strided GEMM that applies one Kronecker-sparse (KS) factor — and its
// two backward products — without any permute/copy around it.
//
// A KS factor with pattern (a, b, c, d) has a twiddle T of shape (a, d, b, c).
// For every group g = (i, k) with i < a, k < d it is a small dense GEMM whose
// rows/columns sit at stride d in the activations. All three products are
//
//     out[g, p, q] = sum_r  L[g, p, r] * R[g, q, r]
//
// with element addresses  X_SI*i + X_SK*k + X_SP*p + X_SR*r  (and _SQ for q):
//
//   forward      y[B,i,j,k]  = sum_l  x[B,i,l,k] T[i,k,j,l]     p=B  q=j  r=l
//   grad input   dx[B,i,l,k] = sum_j dy[B,i,j,k] T[i,k,j,l]     p=B  q=l  r=j
//   grad twiddle dT[i,k,j,l] = sum_B dy[B,i,j,k] x[B,i,l,k]     p=j  q=l  r=B  (ATOMIC_OUT, split over B)
//
// Kernels: ks_gemm_simt (CUDA cores, every dtype) and ks_gemm_mma (tensor cores,
// mma.sync m16n8k16, float16 / bfloat16 only). Both are output-stationary and
// accumulate in float32. The batch size is a runtime argument, so one compiled
// module serves every batch.
//
// Dequantize-fused forward (TW_FORMAT 1 or 2): the twiddle payload is stored as
//   q      int8 (TW_FORMAT 1) or fp8 e4m3fn (TW_FORMAT 2), shape (a, d, b, c), C order
//   scale  float32, shape (a, d, b, 1), C order: one scale per output row j of each block
// and the factor is T[i,k,j,l] = scale[i,k,j] * q[i,k,j,l]. Because the scale only
// depends on the output row, it is applied to the float32 accumulator in registers
// (S_SI, S_SK, S_SQ are its strides along i, k, q).
//
// Compile-time constants come in as -D options; the defaults below describe the
// forward product of the pattern (1, 64, 64, 1) so that `nvcc -c ks_gemm.cu` works.
#include "ks_common.cuh"

#ifndef N_I
#define N_I 1  // a
#endif
#ifndef N_K
#define N_K 1  // d
#endif
#ifndef L_SI
#define L_SI 64
#endif
#ifndef L_SK
#define L_SK 1
#endif
#ifndef L_SP
#define L_SP 64
#endif
#ifndef L_SR
#define L_SR 1
#endif
#ifndef R_SI
#define R_SI 4096
#endif
#ifndef R_SK
#define R_SK 4096
#endif
#ifndef R_SQ
#define R_SQ 64
#endif
#ifndef R_SR
#define R_SR 1
#endif
#ifndef O_SI
#define O_SI 64
#endif
#ifndef O_SK
#define O_SK 1
#endif
#ifndef O_SP
#define O_SP 64
#endif
#ifndef O_SQ
#define O_SQ 1
#endif
#ifndef S_SI
#define S_SI 64
#endif
#ifndef S_SK
#define S_SK 64
#endif
#ifndef S_SQ
#define S_SQ 1
#endif
#ifndef ATOMIC_OUT
#define ATOMIC_OUT 0  // 1: out is float32 and partial sums over r are atomically added
#endif
// Tile: BP x BQ outputs for each of BD consecutive k, reduced in chunks of BR.
#ifndef BP
#define BP 64
#endif
#ifndef BQ
#define BQ 64
#endif
#ifndef BR
#define BR 16
#endif
#ifndef BD
#define BD 1
#endif
// ks_gemm_simt: each thread owns TP x TQ outputs of one k.
#ifndef TP
#define TP 4
#endif
#ifndef TQ
#define TQ 4
#endif
// ks_gemm_mma: each warp owns a 32 x WN output tile of one k (WN in {8, 16, 32}).
#ifndef WN
#define WN 32
#endif

#if ATOMIC_OUT
typedef float out_t;
#else
typedef act_t out_t;
#endif

#define NKT ((N_K + BD - 1) / BD)

// Block index -> (k0, p0, q0, i), k tiles fastest: when d > 1 a block reads only BD
// consecutive elements of each 32-byte sector, and its k neighbours, running at the
// same time, read the rest of that sector from L2 instead of HBM.
struct TileOrigin {
    int p0, q0, k0, i;
};

__device__ __forceinline__ TileOrigin tile_origin(int P, int Q) {
    int bx = blockIdx.x;
    const int n_pt = (P + BP - 1) / BP;
    const int n_qt = (Q + BQ - 1) / BQ;
    TileOrigin t;
    t.k0 = (bx % NKT) * BD;
    bx /= NKT;
    t.p0 = (bx % n_pt) * BP;
    bx /= n_pt;
    t.q0 = (bx % n_qt) * BQ;
    t.i = bx / n_qt;
    return t;
}

__device__ __forceinline__ void store_out(out_t* __restrict__ O, const float* __restrict__ S, int i, int k,
                                          long long p, int q, float v) {
#if TW_FORMAT != 0
    v *= S[(long long)i * S_SI + (long long)k * S_SK + (long long)q * S_SQ];
#endif
    const long long o = (long long)i * O_SI + (long long)k * O_SK + p * O_SP + (long long)q * O_SQ;
#if ATOMIC_OUT
    atomicAdd(O + o, v);
#else
    O[o] = float_to_act(v);
#endif
}

#define NT_P (BP / TP)
#define NT_Q (BQ / TQ)
#define SIMT_THREADS (BD * NT_Q * NT_P)

// Args: L, R, S (scales, unused when TW_FORMAT == 0), O, sizes P, Q, Rn and the
// r range handled by blockIdx.z: [z * r_chunk, (z + 1) * r_chunk).
extern "C" __global__ void __launch_bounds__(SIMT_THREADS)
ks_gemm_simt(const act_t* __restrict__ L, const tw_t* __restrict__ R, const float* __restrict__ S,
             out_t* __restrict__ O, int P, int Q, int Rn, int r_chunk) {
    // r-major so that the inner loop reads TP (TQ) values of one r that are
    // consecutive along p (q) for neighbouring threads.
    __shared__ float sL[BR * BP * BD];  // [r][p][k]
    __shared__ float sR[BR * BQ * BD];  // [r][q][k]
    const int tid = threadIdx.x;
    const int kk = tid % BD;
    const int qt = (tid / BD) % NT_Q;
    const int pt = tid / (BD * NT_Q);
    const TileOrigin t = tile_origin(P, Q);
    const int r_begin = blockIdx.z * r_chunk;
    const int r_end = min(Rn, r_begin + r_chunk);
    const act_t* Lg = L + (long long)t.i * L_SI;
    const tw_t* Rg = R + (long long)t.i * R_SI;

    float acc[TP][TQ];
#pragma unroll
    for (int ip = 0; ip < TP; ++ip)
#pragma unroll
        for (int iq = 0; iq < TQ; ++iq) acc[ip][iq] = 0.f;

    for (int r0 = r_begin; r0 < r_end; r0 += BR) {
        for (int e = tid; e < BP * BR * BD; e += SIMT_THREADS) {
            int p, r, d;
            unflatten3<axis_key(L_SP, BP), axis_key(L_SR, BR), axis_key(L_SK, BD), BP, BR, BD>(e, p, r, d);
            const bool inside = t.p0 + p < P && r0 + r < r_end && t.k0 + d < N_K;
            sL[(r * BP + p) * BD + d] =
                inside ? act_to_float(Lg[(long long)(t.p0 + p) * L_SP + (long long)(r0 + r) * L_SR +
                                         (long long)(t.k0 + d) * L_SK])
                       : 0.f;
        }
        for (int e = tid; e < BQ * BR * BD; e += SIMT_THREADS) {
            int q, r, d;
            unflatten3<axis_key(R_SQ, BQ), axis_key(R_SR, BR), axis_key(R_SK, BD), BQ, BR, BD>(e, q, r, d);
            const bool inside = t.q0 + q < Q && r0 + r < r_end && t.k0 + d < N_K;
            sR[(r * BQ + q) * BD + d] =
                inside ? tw_to_float(Rg[(long long)(t.q0 + q) * R_SQ + (long long)(r0 + r) * R_SR +
                                        (long long)(t.k0 + d) * R_SK])
                       : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < BR; ++r) {
            float lv[TP], rv[TQ];
#pragma unroll
            for (int ip = 0; ip < TP; ++ip) lv[ip] = sL[(r * BP + pt + ip * NT_P) * BD + kk];
#pragma unroll
            for (int iq = 0; iq < TQ; ++iq) rv[iq] = sR[(r * BQ + qt + iq * NT_Q) * BD + kk];
#pragma unroll
            for (int ip = 0; ip < TP; ++ip)
#pragma unroll
                for (int iq = 0; iq < TQ; ++iq) acc[ip][iq] = fmaf(lv[ip], rv[iq], acc[ip][iq]);
        }
        __syncthreads();
    }

    const int k = t.k0 + kk;
#pragma unroll
    for (int ip = 0; ip < TP; ++ip) {
        const int p = t.p0 + pt + ip * NT_P;
#pragma unroll
        for (int iq = 0; iq < TQ; ++iq) {
            const int q = t.q0 + qt + iq * NT_Q;
            if (p < P && q < Q && k < N_K) store_out(O, S, t.i, k, p, q, acc[ip][iq]);
        }
    }
}

#if DTYPE_ID != 0
#define WM 32
#define WARPS_P (BP / WM)
#define WARPS_Q (BQ / WN)
#define MMA_THREADS (32 * BD * WARPS_P * WARPS_Q)
#define PITCH (BR + 8)  // 16-bit elements per staged row; the +8 makes fragment loads bank-conflict free
#define MMA_STAGE_BYTES (2 * BD * (BP + BQ) * PITCH)
#define MMA_OUT_BYTES (4 * BD * BP * BQ)
#define MMA_SMEM_BYTES (MMA_STAGE_BYTES > MMA_OUT_BYTES ? MMA_STAGE_BYTES : MMA_OUT_BYTES)

// D += A * B for one m16n8k16 tile; fragment layouts as in the PTX ISA guide.
__device__ __forceinline__ void mma_16816(float c[4], const unsigned int a[4], const unsigned int b[2]) {
#if DTYPE_ID == 1
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ unsigned int load_pair(const unsigned short* at) {
    return *reinterpret_cast<const unsigned int*>(at);
}

// Tensor-core variant: L (p x r) is the row-major A operand, R (q x r) the
// column-major B operand; both are staged in shared memory with r contiguous.
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
ks_gemm_mma(const act_t* __restrict__ L, const tw_t* __restrict__ R, const float* __restrict__ S,
            out_t* __restrict__ O, int P, int Q, int Rn, int r_chunk) {
    __shared__ __align__(16) unsigned char smem[MMA_SMEM_BYTES];
    unsigned short* sL = reinterpret_cast<unsigned short*>(smem);  // [k][p][PITCH]
    unsigned short* sR = sL + BD * BP * PITCH;                      // [k][q][PITCH]
    float* sO = reinterpret_cast<float*>(smem);                     // [k][p][q], reused after the main loop
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int wq = warp % WARPS_Q;
    const int wp = (warp / WARPS_Q) % WARPS_P;
    const int wk = warp / (WARPS_Q * WARPS_P);
    const int g = lane >> 2;  // "groupID" of the PTX fragment layouts
    const int tg = lane & 3;  // "threadID_in_group"
    const TileOrigin t = tile_origin(P, Q);
    const int r_begin = blockIdx.z * r_chunk;
    const int r_end = min(Rn, r_begin + r_chunk);
    const act_t* Lg = L + (long long)t.i * L_SI;
    const tw_t* Rg = R + (long long)t.i * R_SI;

    float acc[2][WN / 8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < WN / 8; ++ni)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.f;

    for (int r0 = r_begin; r0 < r_end; r0 += BR) {
        for (int e = tid; e < BP * BR * BD; e += MMA_THREADS) {
            int p, r, d;
            unflatten3<axis_key(L_SP, BP), axis_key(L_SR, BR), axis_key(L_SK, BD), BP, BR, BD>(e, p, r, d);
            const bool inside = t.p0 + p < P && r0 + r < r_end && t.k0 + d < N_K;
            // a zero bit pattern is +0.0 in float16 and bfloat16 alike
            sL[(d * BP + p) * PITCH + r] = inside ? Lg[(long long)(t.p0 + p) * L_SP +
                                                       (long long)(r0 + r) * L_SR + (long long)(t.k0 + d) * L_SK]
                                                  : (act_t)0;
        }
        for (int e = tid; e < BQ * BR * BD; e += MMA_THREADS) {
            int q, r, d;
            unflatten3<axis_key(R_SQ, BQ), axis_key(R_SR, BR), axis_key(R_SK, BD), BQ, BR, BD>(e, q, r, d);
            const bool inside = t.q0 + q < Q && r0 + r < r_end && t.k0 + d < N_K;
            act_t v = 0;
            if (inside) {
                const tw_t raw = Rg[(long long)(t.q0 + q) * R_SQ + (long long)(r0 + r) * R_SR +
                                    (long long)(t.k0 + d) * R_SK];
#if TW_FORMAT == 0
                v = raw;
#else
                v = float_to_act(tw_to_float(raw));  // int8 and e4m3 values are exact in fp16 and bf16
#endif
            }
            sR[(d * BQ + q) * PITCH + r] = v;
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < BR; ks += 16) {
            unsigned int a[2][4], b[WN / 8][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const unsigned short* base = sL + (wk * BP + wp * WM + mi * 16 + g) * PITCH + ks + 2 * tg;
                a[mi][0] = load_pair(base);
                a[mi][1] = load_pair(base + 8 * PITCH);
                a[mi][2] = load_pair(base + 8);
                a[mi][3] = load_pair(base + 8 * PITCH + 8);
            }
#pragma unroll
            for (int ni = 0; ni < WN / 8; ++ni) {
                const unsigned short* base = sR + (wk * BQ + wq * WN + ni * 8 + g) * PITCH + ks + 2 * tg;
                b[ni][0] = load_pair(base);
                b[ni][1] = load_pair(base + 8);
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < WN / 8; ++ni) mma_16816(acc[mi][ni], a[mi], b[ni]);
        }
        __syncthreads();
    }

    // Stage the accumulators so the global stores run along the output's fast axis
    // (k when d > 1), which the fragment layout does not.
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < WN / 8; ++ni) {
            const int row = wp * WM + mi * 16 + g;
            const int col = wq * WN + ni * 8 + 2 * tg;
            float* at = sO + (wk * BP + row) * BQ + col;
            at[0] = acc[mi][ni][0];
            at[1] = acc[mi][ni][1];
            at[8 * BQ] = acc[mi][ni][2];
            at[8 * BQ + 1] = acc[mi][ni][3];
        }
    __syncthreads();
    for (int e = tid; e < BP * BQ * BD; e += MMA_THREADS) {
        int p, q, d;
        unflatten3<axis_key(O_SP, BP), axis_key(O_SQ, BQ), axis_key(O_SK, BD), BP, BQ, BD>(e, p, q, d);
        if (t.p0 + p < P && t.q0 + q < Q && t.k0 + d < N_K)
            store_out(O, S, t.i, t.k0 + d, t.p0 + p, t.q0 + q, sO[(d * BP + p) * BQ + q]);
    }
}
#endif
