// The CUDA backend's kernels, compiled at run time by NVRTC (`nvrtc.rs`). The tests also
// compile this file for the CPU (`tests/cuda_host/cuda_host.h`) and check every kernel there
// against the CPU backend, so it includes nothing and uses only what that header provides.
#define GEMV_ROWS 8

// E4M3FN: a sign, 4 exponent bits (bias 7) and 3 mantissa bits; no infinities, and
// S.1111.111 is NaN.
__device__ __forceinline__ float e4m3fn(unsigned int code) {
    unsigned int exp = (code >> 3) & 15u, man = code & 7u;
    float v;
    if (exp == 15u && man == 7u) {
        v = __int_as_float(0x7fc00000);
    } else if (exp == 0u) {
        v = (float)man * 0.001953125f;  // man / 8 * 2^-6
    } else {
        v = __int_as_float(((exp + 120u) << 23) | (man << 20));  // 2^(exp - 7) * (1 + man / 8)
    }
    return (code & 128u) ? -v : v;
}

// y[i, row] = sum over c of x[i, c] * fp8(w[row, c]) * scales[row / br, c / bc], i < m <= 8,
// for one weight row, by one warp (every lane: the shuffles need them all).
__device__ __forceinline__ void fp8_gemv_row(const unsigned char* __restrict__ w,
                                             const float* __restrict__ scales,
                                             const float* __restrict__ x,
                                             float* __restrict__ y, int row, int n, int k,
                                             int m, int br, int bc) {
    int lane = threadIdx.x & 31;
    int scale_cols = (k + bc - 1) / bc;
    const float* s = scales + (long long)(row / br) * scale_cols;
    const unsigned char* wr = w + (long long)row * k;
    float acc[GEMV_ROWS];
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; i++) acc[i] = 0.0f;
    if ((k & 3) == 0 && (bc & 3) == 0) {
        // Four codes a lane (128 bytes a warp) from rows that start 4-byte aligned; the four
        // share a block, since blocks are a multiple of four columns wide.
        const unsigned int* w4 = (const unsigned int*)wr;
        for (int c4 = lane; c4 < (k >> 2); c4 += 32) {
            unsigned int codes = w4[c4];
            int c = c4 << 2;
            float sc = s[c / bc];
            float v0 = e4m3fn(codes & 255u) * sc, v1 = e4m3fn((codes >> 8) & 255u) * sc;
            float v2 = e4m3fn((codes >> 16) & 255u) * sc, v3 = e4m3fn(codes >> 24) * sc;
#pragma unroll
            for (int i = 0; i < GEMV_ROWS; i++) {
                if (i < m) {
                    const float* xi = x + (long long)i * k + c;
                    acc[i] += v0 * xi[0] + v1 * xi[1] + v2 * xi[2] + v3 * xi[3];
                }
            }
        }
    } else {
        for (int c = lane; c < k; c += 32) {
            float v = e4m3fn(wr[c]) * s[c / bc];
#pragma unroll
            for (int i = 0; i < GEMV_ROWS; i++) {
                if (i < m) acc[i] += v * x[(long long)i * k + c];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < GEMV_ROWS; i++) {
        float a = acc[i];
        for (int o = 16; o > 0; o >>= 1) a += __shfl_down_sync(0xffffffffu, a, o);
        if (lane == 0 && i < m) y[(long long)i * n + row] = a;
    }
}

// fp8_gemv_row for every row of w, a warp per row.
extern "C" __global__ void fp8_gemv(const unsigned char* __restrict__ w,
                                    const float* __restrict__ scales,
                                    const float* __restrict__ x, float* __restrict__ y,
                                    int n, int k, int m, int br, int bc) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;  // the whole warp
    fp8_gemv_row(w, scales, x, y, row, n, k, m, br, bc);
}

// One product of fp8_gemv_grouped: fp8_gemv's arguments.
struct Fp8Product {
    const unsigned char* w;
    const float* scales;
    const float* x;
    float* y;
    int n, k, m, br, bc;
};

// fp8_gemv of many products in one launch (a MoE layer's experts, attention's heads): product
// blockIdx.y, its rows by the warps of blockIdx.x as fp8_gemv's; a block past its product's
// rows returns.
extern "C" __global__ void fp8_gemv_grouped(const Fp8Product* __restrict__ products) {
    const Fp8Product p = products[blockIdx.y];
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= p.n) return;  // the whole warp
    fp8_gemv_row(p.w, p.scales, p.x, p.y, row, p.n, p.k, p.m, p.br, p.bc);
}

// The bf16 bits of v, rounded to nearest even; a NaN stays a NaN.
__device__ __forceinline__ unsigned short bf16_bits(float v) {
    unsigned int bits = __float_as_uint(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        bits |= 0x00400000u;
    } else {
        bits += 0x7fffu + ((bits >> 16) & 1u);
    }
    return (unsigned short)(bits >> 16);
}

// out = bf16(fp8(w) * scales), rounded to nearest even, over a grid-stride loop.
extern "C" __global__ void fp8_to_bf16(const unsigned char* __restrict__ w,
                                       const float* __restrict__ scales,
                                       unsigned short* __restrict__ out,
                                       int rows, int cols, int br, int bc) {
    long long total = (long long)rows * cols;
    int scale_cols = (cols + bc - 1) / bc;
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        int r = (int)(i / cols), c = (int)(i % cols);
        out[i] = bf16_bits(e4m3fn(w[i]) * scales[(long long)(r / br) * scale_cols + c / bc]);
    }
}

// For rows laid out [gate (width) | up (width)]: silu(gate) * up, rows × width values, into
// out_f32 or, rounded, into out_bf16 (the other is null), over a grid-stride loop.
extern "C" __global__ void silu_mul(const float* __restrict__ gate_up,
                                    float* __restrict__ out_f32,
                                    unsigned short* __restrict__ out_bf16, int rows, int width) {
    long long total = (long long)rows * width;
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        long long r = i / width, c = i % width;
        float g = gate_up[r * 2 * width + c], u = gate_up[r * 2 * width + width + c];
        float v = g / (1.0f + expf(-g)) * u;
        if (out_bf16) {
            out_bf16[i] = bf16_bits(v);
        } else {
            out_f32[i] = v;
        }
    }
}

// The maximum (max != 0) or the sum of v over the block's threads, returned to every thread;
// `red` holds one value per warp. Every thread of the block calls it.
__device__ float block_reduce(float v, float* red, int max) {
    for (int o = 16; o > 0; o >>= 1) {
        float t = __shfl_xor_sync(0xffffffffu, v, o);
        v = max ? fmaxf(v, t) : v + t;
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < warps ? red[lane] : (max ? __int_as_float(0xff800000) : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        float t = __shfl_xor_sync(0xffffffffu, v, o);
        v = max ? fmaxf(v, t) : v + t;
    }
    __syncthreads();  // red is free again
    return v;
}

// One sequence's scores for `causal_softmax`: `rows` rows of `cols` at `scores`, row r
// belonging to query r / heads, which sees the first first + r / heads columns.
struct SoftmaxPart {
    float* scores;
    int rows, cols, heads, first;
};

// The scaled, causally masked softmax of every part's scores: each row's visible columns
// scaled and softmaxed, the rest set to zero. A part per row of the grid's blocks, a block per
// row of scores with the grid's stride.
extern "C" __global__ void causal_softmax(const SoftmaxPart* __restrict__ parts, float scale) {
    __shared__ float red[32];
    const SoftmaxPart p = parts[blockIdx.y];
    for (int r = blockIdx.x; r < p.rows; r += gridDim.x) {
        float* row = p.scores + (long long)r * p.cols;
        int visible = p.first + r / p.heads;
        if (visible > p.cols) visible = p.cols;
        float m = __int_as_float(0xff800000);
        for (int c = threadIdx.x; c < visible; c += blockDim.x) m = fmaxf(m, row[c] * scale);
        m = block_reduce(m, red, 1);
        float s = 0.0f;
        for (int c = threadIdx.x; c < visible; c += blockDim.x) {
            float e = expf(row[c] * scale - m);
            row[c] = e;
            s += e;
        }
        s = block_reduce(s, red, 0);
        float inv = 1.0f / s;
        for (int c = threadIdx.x; c < visible; c += blockDim.x) row[c] *= inv;
        for (int c = visible + threadIdx.x; c < p.cols; c += blockDim.x) row[c] = 0.0f;
    }
}

// Copies rows first .. first + rows of a paged cache into `flat` ([rows, width]), or `flat`
// into those rows (to_pages != 0). The cache's row g is row g % page_rows of page
// pages[g / page_rows], a device address; a page holds page_rows rows of width floats. A block
// per row, with the grid's stride.
extern "C" __global__ void paged_rows(float* __restrict__ flat,
                                      const unsigned long long* __restrict__ pages, int first,
                                      int rows, int width, int page_rows, int to_pages) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        long long g = (long long)first + r;
        float* row = (float*)pages[g / page_rows] + (g % page_rows) * (long long)width;
        float* f = flat + (long long)r * width;
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            if (to_pages) {
                row[c] = f[c];
            } else {
                f[c] = row[c];
            }
        }
    }
}

// Columns src_col .. src_col + cols of every (row, head) of `src` into columns dst_col .. of
// the same (row, head) of the destination, in f32 or rounded to bf16 (whichever of dst_f32 and
// dst_bf16 is not null): element (r, h, c) of a side is at r * row + h * head + col + c. It
// moves attention's per-head slices between the batch's [rows, heads, ...] layout and the
// per-head products' [heads, rows, ...] one. Grid-stride over rows × heads × cols.
extern "C" __global__ void heads_copy(const float* __restrict__ src, int src_row, int src_head,
                                      int src_col, float* __restrict__ dst_f32,
                                      unsigned short* __restrict__ dst_bf16, int dst_row,
                                      int dst_head, int dst_col, int rows, int heads,
                                      int cols) {
    long long total = (long long)rows * heads * cols;
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        long long c = i % cols, h = i / cols % heads, r = i / cols / heads;
        float v = src[r * src_row + h * src_head + src_col + c];
        long long at = r * dst_row + h * dst_head + dst_col + c;
        if (dst_bf16) {
            dst_bf16[at] = bf16_bits(v);
        } else {
            dst_f32[at] = v;
        }
    }
}

// RMSNorm of the first `cols` values of each row of `x` (row stride `stride`), times `weight`,
// into `[rows, cols]` in f32 and rounded to bf16 (into each of out_f32 and out_bf16 that is not
// null), as transformers computes it: w * (v / sqrt(mean(v^2) + eps)). One block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, int stride,
                                    const float* __restrict__ weight, float eps,
                                    float* __restrict__ out_f32,
                                    unsigned short* __restrict__ out_bf16, int rows, int cols) {
    __shared__ float red[32];
    int r = blockIdx.x;
    if (r >= rows) return;  // the whole block
    const float* row = x + (long long)r * stride;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += row[c] * row[c];
    s = block_reduce(s, red, 0);
    float inv = 1.0f / sqrtf(s / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = weight[c] * (row[c] * inv);
        long long at = (long long)r * cols + c;
        if (out_bf16) out_bf16[at] = bf16_bits(v);
        if (out_f32) out_f32[at] = v;
    }
}

// Rotates columns col .. col + 2 * pairs of every (row, head) of x in place (element (r, h, c)
// at r * row + h * head + c) by row r's angles: cos_sin holds per row `pairs` (cos, sin)
// pairs. Interleaved checkpoints rotate (x[2i], x[2i + 1]), the others (x[i], x[i + pairs]).
// Grid-stride over rows × heads × pairs.
extern "C" __global__ void rope_rotate(float* __restrict__ x, int row, int head, int col,
                                       int rows, int heads, int pairs,
                                       const float* __restrict__ cos_sin, int interleave) {
    long long total = (long long)rows * heads * pairs;
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        long long p = i % pairs, h = i / pairs % heads, r = i / pairs / heads;
        float* at = x + r * row + h * head + col;
        long long a = interleave ? 2 * p : p, b = interleave ? 2 * p + 1 : p + pairs;
        float c = cos_sin[(r * pairs + p) * 2], s = cos_sin[(r * pairs + p) * 2 + 1];
        float x1 = at[a], x2 = at[b];
        at[a] = x1 * c - x2 * s;
        at[b] = x2 * c + x1 * s;
    }
}

// Whether (v, i) comes before (w, j) in top-k order: the larger value first, ties to the
// lower index.
__device__ __forceinline__ int ranks_before(float v, int i, float w, int j) {
    return v > w || (v == w && i < j);
}

// The first of the warp's candidates (*v, *at) in top-k order, left in every lane; an index
// of -1 is no candidate.
__device__ __forceinline__ void warp_best(float* v, int* at) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, *v, o);
        int j = __shfl_xor_sync(0xffffffffu, *at, o);
        if (j >= 0 && (*at < 0 || ranks_before(w, j, *v, *at))) {
            *v = w;
            *at = j;
        }
    }
}

// The first of the block's candidates (v, *i) in top-k order, returned to every thread with
// its index in *i; an index of -1 is no candidate. `red` and `red_i` hold one per warp.
// Every thread of the block calls it.
__device__ float block_best(float v, int* i, float* red, int* red_i) {
    warp_best(&v, i);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        red[warp] = v;
        red_i[warp] = *i;
    }
    __syncthreads();
    v = lane < warps ? red[lane] : 0.0f;
    *i = lane < warps ? red_i[lane] : -1;
    warp_best(&v, i);
    __syncthreads();  // red is free again
    return v;
}

// The k first of v[0 .. n) in top-k order, in k rounds, each the block's first value after
// the one the last round took: thread 0 writes the values to `values` (unless null) and the
// indices (exact as floats) to `at`. Every thread of the block calls it.
__device__ void block_top_k(const float* v, int n, int k, float* values, float* at, float* red,
                            int* red_i) {
    float last = 0.0f;
    int last_at = -1;
    for (int round = 0; round < k; round++) {
        float best = 0.0f;
        int best_at = -1;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            float c = v[i];
            if (last_at >= 0 && !ranks_before(last, last_at, c, i)) continue;
            if (best_at < 0 || ranks_before(c, i, best, best_at)) {
                best = c;
                best_at = i;
            }
        }
        last = block_best(best, &best_at, red, red_i);
        last_at = best_at;
        if (threadIdx.x == 0) {
            if (values) values[round] = last;
            at[round] = (float)last_at;
        }
    }
}

#define ROUTE_MAX_EXPERTS 1024
#define ROUTE_MAX_GROUPS 64
#define ROUTE_GREEDY 0
#define ROUTE_GROUP_LIMITED_GREEDY 1
#define ROUTE_NOAUX_TC 2

// A MoE gate's routing of each row of its logits [rows, experts], as the CPU's
// Router::route_row: scores (sigmoid, plus `bias` for selection, for noaux_tc; softmax for
// the V2 methods), the topk_group best of n_group groups kept (ranked by the sum of their
// best two choices for noaux_tc, by their best score for group-limited greedy), the top_k
// best experts (ties to the lower index), and their weights (noaux_tc's renormalised when
// `norm`, then all scaled). Writes out[r * top_k + k] = weight and
// out[(rows + r) * top_k + k] = expert (exact as a float). One block per row; experts <=
// ROUTE_MAX_EXPERTS, n_group <= ROUTE_MAX_GROUPS.
extern "C" __global__ void gate_route(const float* __restrict__ logits, int rows, int experts,
                                      const float* __restrict__ bias, int method, int n_group,
                                      int topk_group, int top_k, int norm, float scaling,
                                      float* __restrict__ out) {
    __shared__ float scores[ROUTE_MAX_EXPERTS];
    __shared__ float choice[ROUTE_MAX_EXPERTS];
    __shared__ float group_score[ROUTE_MAX_GROUPS];
    __shared__ int kept[ROUTE_MAX_GROUPS];
    __shared__ float red[32];
    __shared__ int red_i[32];
    int r = blockIdx.x;
    if (r >= rows) return;  // the whole block
    const float* l = logits + (long long)r * experts;
    float neg_inf = __int_as_float(0xff800000);
    if (method == ROUTE_NOAUX_TC) {
        for (int e = threadIdx.x; e < experts; e += blockDim.x) {
            float s = 1.0f / (1.0f + expf(-l[e]));
            scores[e] = s;
            choice[e] = s + bias[e];
        }
    } else {
        float m = neg_inf;
        for (int e = threadIdx.x; e < experts; e += blockDim.x) m = fmaxf(m, l[e]);
        m = block_reduce(m, red, 1);
        float s = 0.0f;
        for (int e = threadIdx.x; e < experts; e += blockDim.x) {
            float v = expf(l[e] - m);
            scores[e] = v;
            s += v;
        }
        s = block_reduce(s, red, 0);
        for (int e = threadIdx.x; e < experts; e += blockDim.x) {
            scores[e] /= s;
            choice[e] = scores[e];
        }
    }
    __syncthreads();
    if (method != ROUTE_GREEDY) {
        int per_group = experts / n_group;
        for (int g = threadIdx.x; g < n_group; g += blockDim.x) {
            const float* c = choice + g * per_group;
            float best = neg_inf, second = neg_inf;
            for (int j = 0; j < per_group; j++) {
                if (c[j] > best) {
                    second = best;
                    best = c[j];
                } else if (c[j] > second) {
                    second = c[j];
                }
            }
            int two = method == ROUTE_NOAUX_TC && per_group >= 2;
            group_score[g] = two ? best + second : best;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int g = 0; g < n_group; g++) kept[g] = 0;
            for (int t = 0; t < topk_group && t < n_group; t++) {
                int best = -1;
                for (int g = 0; g < n_group; g++) {
                    if (!kept[g] && (best < 0 || group_score[g] > group_score[best])) best = g;
                }
                kept[best] = 1;
            }
        }
        __syncthreads();
        float fill = method == ROUTE_NOAUX_TC ? neg_inf : 0.0f;
        for (int e = threadIdx.x; e < experts; e += blockDim.x) {
            if (!kept[e / per_group]) choice[e] = fill;
        }
        __syncthreads();
    }
    float* weights = out + (long long)r * top_k;
    float* picked = out + ((long long)rows + r) * top_k;
    block_top_k(choice, experts, top_k, 0, picked, red, red_i);
    if (threadIdx.x == 0) {
        // The V2 routers weigh by the (masked) scores they chose by, and never renormalise.
        const float* by = method == ROUTE_NOAUX_TC ? scores : choice;
        float sum = 0.0f;
        for (int k = 0; k < top_k; k++) {
            weights[k] = by[(int)picked[k]];
            sum += weights[k];
        }
        float divisor = method == ROUTE_NOAUX_TC && norm ? sum + 1e-20f : 1.0f;
        for (int k = 0; k < top_k; k++) weights[k] = weights[k] / divisor * scaling;
    }
}

// Each row of logits [rows, vocab] reduced to what a greedy or top-k sampler needs: its k best
// values in top-k order (ties to the lower token id), their token ids (exact as floats), and
// ln(sum(exp(logits))), from the largest, at out[r * (2k + 1) ..]: values, ids, log-sum-exp.
// One block per row.
extern "C" __global__ void logits_best(const float* __restrict__ logits, int rows, int vocab,
                                       int k, float* __restrict__ out) {
    __shared__ float red[32];
    __shared__ int red_i[32];
    int r = blockIdx.x;
    if (r >= rows) return;  // the whole block
    const float* l = logits + (long long)r * vocab;
    float* o = out + (long long)r * (2 * k + 1);
    float m = __int_as_float(0xff800000);
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) m = fmaxf(m, l[c]);
    m = block_reduce(m, red, 1);
    float s = 0.0f;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) s += expf(l[c] - m);
    s = block_reduce(s, red, 0);
    block_top_k(l, vocab, k, o, o + k, red, red_i);
    if (threadIdx.x == 0) o[2 * k] = logf(s) + m;
}

// The E4M3FN code nearest to v, ties to the even code, saturating at +-448 (E4M3FN has no
// infinities; NaN becomes 448 too): the inverse of e4m3fn().
__device__ __forceinline__ unsigned int e4m3fn_code(float v) {
    unsigned int sign = (__float_as_uint(v) >> 31) << 7;
    float a = fabsf(v);
    if (!(a < 448.0f)) return sign | 0x7eu;
    if (a < 0.015625f) {  // below 2^-6: subnormal codes of 2^-9 each (8 of them is 2^-6)
        return sign | (unsigned int)rintf(a * 512.0f);
    }
    unsigned int bits = __float_as_uint(a);
    unsigned int exp = (bits >> 23) - 120u;  // 2^(e - 127) is 2^(exp - 7)
    unsigned int man = (bits >> 20) & 7u, rest = bits & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (man & 1u))) man++;
    unsigned int code = (exp << 3) + man;  // a carry out of the mantissa raises the exponent
    return sign | (code > 0x7eu ? 0x7eu : code);
}

// Each row of x [rows, k] quantised to E4M3FN by blocks of 128 columns, as DeepSeek-V3's
// activations are for its FP8 products: scale = the block's largest |value| / 448 (1 for a
// block of zeros), codes[r, c] = e4m3fn_code(x[r, c] / scale), scales[r * blocks + b] = scale
// (blocks = ceil(k / 128)). A block of 128 threads per (block of columns, row), with the
// grid's stride over rows.
extern "C" __global__ void quantize_fp8_rows(const float* __restrict__ x, int rows, int k,
                                             unsigned char* __restrict__ codes,
                                             float* __restrict__ scales) {
    __shared__ float red[32];
    int b = blockIdx.x, blocks = (k + 127) / 128, c = b * 128 + threadIdx.x;
    if (b >= blocks) return;  // the whole block
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        float v = c < k ? x[(long long)r * k + c] : 0.0f;
        float amax = block_reduce(fabsf(v), red, 1);
        float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
        if (c < k) codes[(long long)r * k + c] = (unsigned char)e4m3fn_code(v / scale);
        if (threadIdx.x == 0) scales[(long long)r * blocks + b] = scale;
    }
}

// y[i] += x[i] for len values (the residual stream and a block's output). Grid-stride.
extern "C" __global__ void add_into(float* __restrict__ y, const float* __restrict__ x,
                                    long long len) {
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += step) {
        y[i] += x[i];
    }
}
