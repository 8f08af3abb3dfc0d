// fimaq's native kernels: fused fake quantization with straight-through derivatives and QDrop,
// AdaRound's soft weight and rounding penalty, a step's QDrop input mix, and torch's CPU random
// draws; one pass over memory each, the eager values bit for bit (fimaq/quant/native.py builds and
// calls them).
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
//
// AdaRound's soft weight and rounding penalty are computed around torch's own sigmoid and power (the
// callers run those): only public torch calls, no symbol of torch's libraries.

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

// AdaRound's soft weight of one element from sig = sigmoid(alpha), in the eager SoftWeight's
// operations: y = sig * c1 + c2;  h = clamp(y, 0, 1);  inner = (h == y);  c = floor + h + zp;
// q = clamp(c, 0, qmax);  outer = (q == c);  w = (q - zp) * s. Returns the masks as bits (1: inner,
// 2: outer); w and h through references (so that the loops around stay vectorised).
inline int soft_element(float sig, float floor, float z, float s, float c1, float c2, float qmax, float& w,
                        float& h) {
    const float t = sig * c1;
    const float y = t + c2;
    const float hv = clamp(y, 0.0f, 1.0f);
    const float c = (floor + hv) + z;
    const float q = clamp(c, 0.0f, qmax);
    h = hv;
    w = (q - z) * s;
    return (hv == y ? 1 : 0) | (q == c ? 2 : 0);
}

// The gradient of alpha of one element: sigmoid_backward(((g * s) * outer + gh) * inner * c1, sig), with
// torch's sigmoid_backward a * (1 - b) * b; `Gh` false: no h gradient (nothing added)
template <bool Gh>
inline float alpha_grad(float g, float s, float outer, float gh, float inner, float sig, float c1) {
    const float gw = (g * s) * outer;
    const float t = ((Gh ? gw + gh : gw) * inner) * c1;
    return (t * (1.0f - sig)) * sig;
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

// AdaRound's soft weight from sig = sigmoid(alpha) (torch's), every array a contiguous (rows, cols) one
// but zp and scale (one per row): w, h and the masks inner and outer as floats (soft_element).
int fimaq_soft_weight(const float* sig, const float* floor, const float* zp, const float* scale, float* w,
                      float* h, float* inner, float* outer, float c1, float c2, float qmax, int64_t rows,
                      int64_t cols, int threads) {
    if (rows < 0 || cols < 0) return 1;
    rows_all(rows, cols, threads, [=](int64_t r) {
        const int64_t o = r * cols;
        const float z = zp[r], s = scale[r];
        const float* __restrict sp = sig + o;
        const float* __restrict fp = floor + o;
        float* __restrict wp = w + o;
        float* __restrict hp = h + o;
        float* __restrict ip = inner + o;
        float* __restrict op = outer + o;
        for (int64_t i = 0; i < cols; ++i) {
            const int bits = soft_element(sp[i], fp[i], z, s, c1, c2, qmax, wp[i], hp[i]);
            ip[i] = (bits & 1) ? 1.0f : 0.0f;
            op[i] = (bits & 2) ? 1.0f : 0.0f;
        }
    });
    return 0;
}

// Its backward: the gradient of alpha (alpha_grad); gh may be null.
int fimaq_soft_weight_backward(const float* g, const float* gh, const float* scale, const float* outer,
                               const float* inner, const float* sig, float* out, float c1, int64_t rows,
                               int64_t cols, int threads) {
    if (rows < 0 || cols < 0) return 1;
    rows_all(rows, cols, threads, [=](int64_t r) {
        const int64_t o = r * cols;
        const float s = scale[r];
        const float* __restrict gp = g + o;
        const float* __restrict op = outer + o;
        const float* __restrict ip = inner + o;
        const float* __restrict sp = sig + o;
        float* __restrict dst = out + o;
        if (gh != nullptr) {
            const float* __restrict hp = gh + o;
            for (int64_t i = 0; i < cols; ++i) dst[i] = alpha_grad<true>(gp[i], s, op[i], hp[i], ip[i], sp[i], c1);
        } else {
            for (int64_t i = 0; i < cols; ++i) dst[i] = alpha_grad<false>(gp[i], s, op[i], 0.0f, ip[i], sp[i], c1);
        }
    });
    return 0;
}

// AdaRound's rounding penalty sum(1 - |u|^beta), u = 2h - 1, around torch's power: u = h * 2 - 1
// and a = |u| in one pass; then the gradient's factor nan_to_num(p / u) * c (p = a^beta; NaN at
// u = 0 becomes 0, infinities the largest finite values, as torch.nan_to_num) in one pass.
int fimaq_penalty_prepare(const float* h, float* u, float* a, int64_t n, int threads) {
    if (n < 0) return 1;
    flat_all(n, threads, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const float v = h[i] * 2.0f - 1.0f;
            u[i] = v;
            a[i] = std::fabs(v);
        }
    });
    return 0;
}

int fimaq_penalty_grad(const float* p, const float* u, float c, float* out, int64_t n, int threads) {
    if (n < 0) return 1;
    const float big = std::numeric_limits<float>::max();
    flat_all(n, threads, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            float q = p[i] / u[i];
            q = q != q ? 0.0f : q;
            q = q > big ? big : (q < -big ? -big : q);
            out[i] = q * c;
        }
    });
    return 0;
}

// torch.randint(-2**63, 2**63 - 1, (count,), dtype=int64) on a CPU generator, the same values and
// the same generator state after: the Mersenne twister (mt19937) of torch's CPU generator, two
// 32-bit outputs per value (the first the high half), reduced modulo 2**64 - 1 and shifted by
// -2**63. `st` is the generator's state as torch.Generator.get_state() returns it (the legacy
// layout: `left` an int32 at byte 8, `next` a uint64 at 16, the 624 state words as uint64 from 24),
// read and updated in place; the caller checks the layout against torch once (a self-test).
int fimaq_mt_randint64(uint8_t* st, uint64_t* out, int64_t count) {
    constexpr int kN = 624, kM = 397;
    constexpr uint32_t kMatrixA = 0x9908b0dfu, kUpper = 0x80000000u, kLower = 0x7fffffffu;
    int32_t left;
    uint64_t next64;
    std::memcpy(&left, st + 8, 4);
    std::memcpy(&next64, st + 16, 8);
    const uint16_t probe = 1;
    uint8_t little;
    std::memcpy(&little, &probe, 1);
    if (left < 1 || left > kN || next64 > static_cast<uint64_t>(kN) || little != 1) return 1;
    uint32_t state[kN];
    for (int i = 0; i < kN; ++i) {
        uint64_t w;
        std::memcpy(&w, st + 24 + 8 * i, 8);
        state[i] = static_cast<uint32_t>(w);
    }
    uint32_t next = static_cast<uint32_t>(next64);
    auto twist = [](uint32_t u, uint32_t v) { return (((u & kUpper) | (v & kLower)) >> 1) ^ (v & 1u ? kMatrixA : 0u); };
    auto regenerate = [&]() {
        int j = 0;
        for (; j < kN - kM; ++j) state[j] = state[j + kM] ^ twist(state[j], state[j + 1]);
        for (; j < kN - 1; ++j) state[j] = state[j + kM - kN] ^ twist(state[j], state[j + 1]);
        state[kN - 1] = state[kM - 1] ^ twist(state[kN - 1], state[0]);
        left = kN;
        next = 0;
    };
    auto temper = [](uint32_t y) {
        y ^= (y >> 11);
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        y ^= (y >> 18);
        return y;
    };
    // the 32-bit outputs in order into out's memory, runs of stored words tempered at once
    uint32_t* words = reinterpret_cast<uint32_t*>(out);
    int64_t m = 2 * count;
    while (m > 0) {
        const int64_t avail = left - 1;  // draws before one regenerates the state
        if (avail == 0) {
            regenerate();  // the draw that finds left at 1 regenerates, then takes word 0
            *words++ = temper(state[next++]);
            --m;
            continue;
        }
        const int64_t k = avail < m ? avail : m;
        const uint32_t* src = state + next;
        for (int64_t i = 0; i < k; ++i) words[i] = temper(src[i]);
        words += k;
        next += static_cast<uint32_t>(k);
        left -= static_cast<int32_t>(k);
        m -= k;
    }
    for (int64_t i = 0; i < count; ++i) {
        const uint64_t w = out[i];  // the first output in the low half (little endian)
        uint64_t v = (w << 32) | (w >> 32);  // first output high, second low
        v = v == ~uint64_t(0) ? 0 : v;  // v % (2**64 - 1)
        out[i] = v + (uint64_t(1) << 63);  // + (-2**63) modulo 2**64
    }
    std::memcpy(st + 8, &left, 4);
    next64 = next;
    std::memcpy(st + 16, &next64, 8);
    for (int i = 0; i < kN; ++i) {
        const uint64_t w = state[i];
        std::memcpy(st + 24 + 8 * i, &w, 8);
    }
    return 0;
}

}  // extern "C"
