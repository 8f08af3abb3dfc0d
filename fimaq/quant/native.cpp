// fimaq's native kernels: fused fake quantization with straight-through derivatives and QDrop, and
// a step's QDrop input mix; one pass over memory each, the eager values bit for bit
// (fimaq/quant/native.py builds and calls them).
//
// Fake quantization:
// For every element, in the order of the eager kernel's operations (fimaq/quant/ste.py), so that
// every value is the same bit for bit:
//   v = x / s;  r = rint(v) (half to even);  rc = clamp(r, -zp, qmax - zp);  inside = (r == rc)
//   out = rc * s;  ds = rc - v * inside;  dx = inside
// and with a QDrop byte b (kept where b < threshold, w = 1 or 0), as torch.lerp computes them:
//   out = lerp(x, out, w);  ds = ds * w;  dx = lerp(1, inside, w) = (w ? inside : 1)
// dx and ds may be null (no derivatives: a pass without autograd). Operands are strided
// n-dimensional arrays with dimensions ordered outermost first; out, dx and ds share strides.
// The backward pass (fimaq_fake_quant_backward) multiplies the upstream gradient by both.
// No fast-math, no contraction: every operation is rounded as its eager counterpart.
// Only public torch calls reach these kernels (pointers and sizes through ctypes); no symbol of
// torch's libraries is looked up.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr int kMaxDims = 8;

// A walk over an n-dimensional index space (dimensions outermost first) with the strides, in
// elements, of up to five arrays.
struct Walk {
    int nd;
    int64_t shape[kMaxDims];
    int64_t stride[5][kMaxDims];
};

struct Args {
    const float* x;
    const float* scale;
    const float* zp;
    const uint8_t* bytes;
    float* out;
    float* dx;
    float* ds;
    float qmax;
    int threshold;
    Walk walk;  // arrays: x, scale, zero point, bytes, outputs
};

inline float lerp(float a, float b, float w) {
    // torch.lerp's formula (exact here: w is 0 or 1); both sides computed, then one selected
    const float low = a + w * (b - a);
    const float high = b - (b - a) * (1.0f - w);
    return std::fabs(w) < 0.5f ? low : high;
}

inline float clamp(float r, float lo, float hi) {
    // as torch.clamp: a NaN stays NaN
    return r < lo ? lo : (r > hi ? hi : r);
}

template <bool Mask, bool Derivatives>
inline void element(float xv, float s, float z, float qmax, bool kept, float* out, float* dx, float* ds) {
    const float v = xv / s;
    const float r = std::rint(v);
    const float rc = clamp(r, -z, qmax - z);
    const float inside = r == rc ? 1.0f : 0.0f;
    const float q = rc * s;
    if (!Mask) {
        *out = q;
        if (Derivatives) {
            *dx = inside;
            *ds = rc - v * inside;
        }
        return;
    }
    const float w = kept ? 1.0f : 0.0f;
    *out = lerp(xv, q, w);
    if (Derivatives) {
        *dx = lerp(1.0f, inside, w);
        *ds = (rc - v * inside) * w;
    }
}

// n contiguous elements of x and the outputs, with a contiguous run of bytes (Mask), one zero point
// and one scale (ScaleRun false) or a contiguous run of scales (true); vectorised.
template <bool Mask, bool Derivatives, bool ScaleRun>
void contiguous(const float* __restrict x, const float* __restrict sp, float z, const uint8_t* __restrict b,
                int thr, float qmax, float* __restrict out, float* __restrict dx, float* __restrict ds,
                int64_t n) {
    const float s0 = *sp;
    for (int64_t i = 0; i < n; ++i) {
        float o, d = 0.0f, e = 0.0f;
        element<Mask, Derivatives>(x[i], ScaleRun ? sp[i] : s0, z, qmax, Mask && b[i] < thr, &o, &d, &e);
        out[i] = o;
        if (Derivatives) {
            dx[i] = d;
            ds[i] = e;
        }
    }
}

template <bool Mask, bool Derivatives, bool ScaleRun>
void gathered(const float* x, int64_t sx, const float* sp, float z, const uint8_t* b, int64_t sb, int thr,
              float qmax, float* out, float* dx, float* ds, int64_t n) {
    if (sx == 1 && (!Mask || sb == 1)) {
        contiguous<Mask, Derivatives, ScaleRun>(x, sp, z, b, thr, qmax, out, dx, ds, n);
        return;
    }
    // x or the bytes strided (a permuted operand written in its logical order, or bytes drawn in
    // x's memory order): gathered into small contiguous blocks first, so that the arithmetic stays
    // vectorised
    constexpr int64_t kBlock = 512;
    float xblock[kBlock];
    uint8_t block[kBlock];
    for (int64_t i = 0; i < n; i += kBlock) {
        const int64_t m = n - i < kBlock ? n - i : kBlock;
        const float* xs = x + i;
        if (sx != 1) {
            for (int64_t j = 0; j < m; ++j) xblock[j] = x[(i + j) * sx];
            xs = xblock;
        }
        const uint8_t* bs = Mask ? b + i : nullptr;
        if (Mask && sb != 1) {
            for (int64_t j = 0; j < m; ++j) block[j] = b[(i + j) * sb];
            bs = block;
        }
        contiguous<Mask, Derivatives, ScaleRun>(xs, ScaleRun ? sp + i : sp, z, bs, thr, qmax, out + i,
                                                Derivatives ? dx + i : nullptr, Derivatives ? ds + i : nullptr,
                                                m);
    }
}

// One run along the innermost dimension: n elements from the given offsets.
template <bool Mask, bool Derivatives>
void run(const Args& a, const int64_t* off, int64_t n) {
    const int last = a.walk.nd - 1;
    const int64_t(&st)[5][kMaxDims] = a.walk.stride;
    const int64_t sx = st[0][last], ss = st[1][last], sz = st[2][last], sb = st[3][last], so = st[4][last];
    const int64_t ox = off[0], os = off[1], oz = off[2], ob = off[3], oo = off[4];
    const float* x = a.x + ox;
    const float* sp = a.scale + os;
    const float* zp = a.zp + oz;
    const uint8_t* b = Mask ? a.bytes + ob : nullptr;
    float* out = a.out + oo;
    float* dx = Derivatives ? a.dx + oo : nullptr;
    float* ds = Derivatives ? a.ds + oo : nullptr;
    const float qmax = a.qmax;
    const int thr = a.threshold;
    if (so == 1 && sz == 0 && (ss == 0 || ss == 1)) {
        if (ss == 0) gathered<Mask, Derivatives, false>(x, sx, sp, *zp, b, sb, thr, qmax, out, dx, ds, n);
        else gathered<Mask, Derivatives, true>(x, sx, sp, *zp, b, sb, thr, qmax, out, dx, ds, n);
        return;
    }
    for (int64_t i = 0; i < n; ++i) {
        float o, d = 0.0f, e = 0.0f;
        element<Mask, Derivatives>(x[i * sx], sp[i * ss], zp[i * sz], qmax, Mask && b[i * sb] < thr, &o, &d, &e);
        out[i * so] = o;
        if (Derivatives) {
            dx[i * so] = d;
            ds[i * so] = e;
        }
    }
}

// Elements [begin, end) of the walk, in runs along the innermost dimension: f(offsets, n).
template <typename F>
void walk_range(const Walk& w, int arrays, int64_t begin, int64_t end, F f) {
    int64_t idx[kMaxDims];
    int64_t rest = begin;
    for (int d = w.nd - 1; d >= 0; --d) {
        idx[d] = rest % w.shape[d];
        rest /= w.shape[d];
    }
    const int last = w.nd - 1;
    int64_t pos = begin;
    while (pos < end) {
        int64_t off[5] = {0, 0, 0, 0, 0};
        for (int k = 0; k < arrays; ++k) {
            for (int d = 0; d < w.nd; ++d) off[k] += idx[d] * w.stride[k][d];
        }
        int64_t n = w.shape[last] - idx[last];
        if (n > end - pos) n = end - pos;
        f(off, n);
        pos += n;
        idx[last] += n;
        for (int d = last; d > 0 && idx[d] == w.shape[d]; --d) {
            idx[d] = 0;
            ++idx[d - 1];
        }
    }
}

// Elements [0, n) in contiguous ranges on up to `threads` threads: f(begin, end) (ATen's grain: no
// threads below 32768 elements).
template <typename F>
void flat_all(int64_t n, int threads, F f) {
    const int k = threads > 1 && n >= 32768 ? threads : 1;
#pragma omp parallel for num_threads(k) schedule(static)
    for (int c = 0; c < k; ++c) {
        const int64_t chunk = (n + k - 1) / k;
        const int64_t begin = c * chunk, end = begin + chunk < n ? begin + chunk : n;
        if (begin < end) f(begin, end);
    }
}

// The whole walk on up to `threads` threads, split into contiguous ranges of its elements.
template <typename F>
void walk_all(const Walk& w, int arrays, int threads, F f) {
    int64_t numel = 1;
    for (int d = 0; d < w.nd; ++d) numel *= w.shape[d];
    flat_all(numel, threads, [&](int64_t begin, int64_t end) { walk_range(w, arrays, begin, end, f); });
}

bool make_walk(Walk& w, int nd, const int64_t* shape, const int64_t* const* strides, int arrays) {
    if (nd < 1 || nd > kMaxDims) return false;
    w.nd = nd;
    for (int d = 0; d < nd; ++d) {
        w.shape[d] = shape[d];
        for (int k = 0; k < arrays; ++k) w.stride[k][d] = strides[k] ? strides[k][d] : 0;
    }
    return true;
}

template <bool Mask, bool Derivatives>
void forward(const Args& a, int threads) {
    walk_all(a.walk, 5, threads, [&a](const int64_t* off, int64_t n) { run<Mask, Derivatives>(a, off, n); });
}

// Rows [0, rows) of a contiguous (rows, cols) array on up to `threads` threads (ATen's grain).
template <typename F>
void rows_all(int64_t rows, int64_t cols, int threads, F f) {
    const int k = threads > 1 && rows * cols >= 32768 ? threads : 1;
#pragma omp parallel for num_threads(k) schedule(static)
    for (int64_t r = 0; r < rows; ++r) f(r);
}

}  // namespace

extern "C" {

// Shapes and strides (in elements) with dimensions ordered outermost first.
int fimaq_fake_quant(const float* x, const float* scale, const float* zp, const uint8_t* bytes,
                     float* out, float* dx, float* ds, float qmax, int threshold, int nd,
                     const int64_t* shape, const int64_t* sx, const int64_t* ss, const int64_t* sz,
                     const int64_t* sb, const int64_t* so, int threads) {
    if ((dx == nullptr) != (ds == nullptr)) return 1;
    Args a;
    a.x = x;
    a.scale = scale;
    a.zp = zp;
    a.bytes = bytes;
    a.out = out;
    a.dx = dx;
    a.ds = ds;
    a.qmax = qmax;
    a.threshold = threshold;
    const int64_t* strides[5] = {sx, ss, sz, bytes ? sb : nullptr, so};
    if (!make_walk(a.walk, nd, shape, strides, 5)) return 1;
    const bool mask = bytes != nullptr, derivatives = dx != nullptr;
    if (mask && derivatives) forward<true, true>(a, threads);
    else if (mask) forward<true, false>(a, threads);
    else if (derivatives) forward<false, true>(a, threads);
    else forward<false, false>(a, threads);
    return 0;
}

// The backward pass, in place, over n elements of one dense layout shared by the three arrays:
// dx = dx * g and ds = ds * g (either may be null: not wanted); the caller sums ds over the
// broadcast dimensions (torch's reduction order).
int fimaq_fake_quant_backward(const float* g, float* dx, float* ds, int64_t n, int threads) {
    if (n < 0) return 1;
    flat_all(n, threads, [=](int64_t begin, int64_t end) {
        const int64_t m = end - begin;
        const float* __restrict gp = g + begin;
        float* __restrict xp = dx ? dx + begin : nullptr;
        float* __restrict sp = ds ? ds + begin : nullptr;
        if (xp && sp) {
            for (int64_t i = 0; i < m; ++i) {
                const float gi = gp[i];
                xp[i] = xp[i] * gi;
                sp[i] = sp[i] * gi;
            }
        } else if (xp) {
            for (int64_t i = 0; i < m; ++i) xp[i] = xp[i] * gp[i];
        } else if (sp) {
            for (int64_t i = 0; i < m; ++i) sp[i] = sp[i] * gp[i];
        }
    });
    return 0;
}

// A reconstruction step's QDrop input mix: rows idx[i] of the cached float and quantized inputs
// (a and b, contiguous (*, cols)), out[i] = lerp(a[idx[i]], b[idx[i]], w) with w = 1 where the byte is
// below the threshold, else 0: the values of index_select and torch.lerp with the 0/1 float mask.
int fimaq_mix_rows(const float* a, const float* b, const int64_t* idx, int64_t count, const uint8_t* bytes,
                   int threshold, float* out, int64_t rows, int64_t cols, int threads) {
    if (rows < 0 || cols < 0) return 1;
    for (int64_t r = 0; r < rows; ++r) {
        if (idx[r] < 0 || idx[r] >= count) return 2;
    }
    rows_all(rows, cols, threads, [=](int64_t r) {
        const int64_t src = idx[r] * cols, o = r * cols;
        const float* __restrict ap = a + src;
        const float* __restrict bp = b + src;
        const uint8_t* __restrict kp = bytes + o;
        float* __restrict dst = out + o;
        for (int64_t i = 0; i < cols; ++i) dst[i] = lerp(ap[i], bp[i], kp[i] < threshold ? 1.0f : 0.0f);
    });
    return 0;
}

}  // extern "C"
