// RISC-V F/D arithmetic on the host's SSE unit. Rounding modes and exception flags
// come from MXCSR (x86 detects tininess after rounding, as RISC-V does); NaN results
// are canonicalised and the RISC-V-specific cases (FMIN/FMAX, comparisons, saturating
// conversions, inf*0+qNaN) are handled explicitly.
// Known gap: RMM (round to nearest, ties to max magnitude) is exact for float->int
// conversions and approximated by RNE for other operations.
#include "cpu/riscv/fpu.h"

#include <xmmintrin.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace ferry::riscv::fpu {
namespace {

template <typename T>
inline T Opaque(T v) {
  asm volatile("" : "+x"(v));
  return v;
}

class HostFpEnv {
 public:
  explicit HostFpEnv(unsigned rm) : saved_(_mm_getcsr()) {
    unsigned rc = rm == kRDN ? 1 : rm == kRUP ? 2 : rm == kRTZ ? 3 : 0;
    _mm_setcsr((saved_ & ~0xffffu) | 0x1f80u | (rc << 13));
  }
  ~HostFpEnv() { _mm_setcsr(saved_); }
  uint32_t Flags() const {
    unsigned c = _mm_getcsr();
    uint32_t f = 0;
    if (c & 0x01) f |= kNV;
    if (c & 0x04) f |= kDZ;
    if (c & 0x08) f |= kOF;
    if (c & 0x10) f |= kUF;
    if (c & 0x20) f |= kNX;
    return f;
  }

 private:
  unsigned saved_;
};

inline float F(uint32_t v) { return std::bit_cast<float>(v); }
inline double D(uint64_t v) { return std::bit_cast<double>(v); }
inline uint32_t B(float v) { return std::isnan(v) ? kCanonicalNaN32 : std::bit_cast<uint32_t>(v); }
inline uint64_t B(double v) { return std::isnan(v) ? kCanonicalNaN64 : std::bit_cast<uint64_t>(v); }
inline bool IsNaN(uint32_t v) { return (v & 0x7f800000u) == 0x7f800000u && (v & 0x7fffffu); }
inline bool IsNaN(uint64_t v) { return (v & 0x7ff0000000000000ull) == 0x7ff0000000000000ull && (v & 0xfffffffffffffull); }
inline bool IsSNaN(uint32_t v) { return IsNaN(v) && !(v & 0x400000u); }
inline bool IsSNaN(uint64_t v) { return IsNaN(v) && !(v & 0x8000000000000ull); }
inline float Host(uint32_t v) { return F(v); }
inline double Host(uint64_t v) { return D(v); }

template <typename U, typename Op>
U Binary(U a, U b, unsigned rm, uint32_t& flags, Op op) {
  HostFpEnv env(rm);
  auto r = Opaque(op(Opaque(Host(a)), Opaque(Host(b))));
  flags |= env.Flags();
  return B(r);
}

template <typename U>
U Fused(U a, U b, U c, bool neg_prod, bool neg_add, unsigned rm, uint32_t& flags) {
  auto fa = Host(a), fb = Host(b), fc = Host(c);
  if ((std::isinf(fa) && fb == 0) || (fa == 0 && std::isinf(fb))) {
    flags |= kNV;
    return std::is_same_v<U, uint32_t> ? static_cast<U>(kCanonicalNaN32) : static_cast<U>(kCanonicalNaN64);
  }
  if (neg_prod) fa = -fa;
  if (neg_add) fc = -fc;
  HostFpEnv env(rm);
  auto r = Opaque(std::fma(Opaque(fa), Opaque(fb), Opaque(fc)));
  flags |= env.Flags();
  return B(r);
}

template <typename U>
U MinMax(U a, U b, uint32_t& flags, bool is_max) {
  if (IsSNaN(a) || IsSNaN(b)) flags |= kNV;
  if (IsNaN(a) && IsNaN(b))
    return std::is_same_v<U, uint32_t> ? static_cast<U>(kCanonicalNaN32) : static_cast<U>(kCanonicalNaN64);
  if (IsNaN(a)) return b;
  if (IsNaN(b)) return a;
  auto fa = Host(a), fb = Host(b);
  if (fa == fb) {  // equal, possibly +0/-0: min prefers the negative, max the positive
    bool a_neg = std::signbit(fa);
    return is_max ? (a_neg ? b : a) : (a_neg ? a : b);
  }
  return is_max ? (fa > fb ? a : b) : (fa < fb ? a : b);
}

template <typename U>
bool Compare(U a, U b, uint32_t& flags, int kind) {  // 0 eq, 1 lt, 2 le
  if (IsNaN(a) || IsNaN(b)) {
    if (kind != 0 || IsSNaN(a) || IsSNaN(b)) flags |= kNV;
    return false;
  }
  auto fa = Host(a), fb = Host(b);
  return kind == 0 ? fa == fb : kind == 1 ? fa < fb : fa <= fb;
}

template <typename U>
uint64_t ClassifyT(U v) {
  using F = decltype(Host(v));
  F f = Host(v);
  bool neg = std::signbit(f);
  if (IsNaN(v)) return IsSNaN(v) ? 1u << 8 : 1u << 9;
  if (std::isinf(f)) return neg ? 1u << 0 : 1u << 7;
  if (f == 0) return neg ? 1u << 3 : 1u << 4;
  if (std::fpclassify(f) == FP_SUBNORMAL) return neg ? 1u << 2 : 1u << 5;
  return neg ? 1u << 1 : 1u << 6;
}

// Rounds a double holding an exactly representable input to an integral value.
double RoundIntegral(double v, unsigned rm) {
  switch (rm) {
    case kRTZ: return std::trunc(v);
    case kRDN: return std::floor(v);
    case kRUP: return std::ceil(v);
    case kRMM: return std::round(v);  // ties away from zero
    default: {
      double r = std::round(v);
      if (std::fabs(v - std::trunc(v)) == 0.5) r = 2.0 * std::round(v / 2.0);  // ties to even
      return r;
    }
  }
}

// Generic float->int: bounds [lo, hi] as doubles (exact), saturation values.
uint64_t ToInt(double v, bool nan, unsigned rm, uint32_t& flags, double lo, double hi_excl, uint64_t min_val,
               uint64_t max_val, bool is_signed, bool sext32) {
  if (nan) {
    flags |= kNV;
    return max_val;
  }
  double r = RoundIntegral(v, rm);
  if (r < lo || r >= hi_excl) {
    flags |= kNV;
    return r < lo ? min_val : max_val;
  }
  if (r != v) flags |= kNX;
  uint64_t out;
  if (is_signed) out = static_cast<uint64_t>(static_cast<int64_t>(r));
  else out = r == 0 ? 0 : static_cast<uint64_t>(r);
  if (sext32) out = static_cast<uint64_t>(static_cast<int64_t>(static_cast<int32_t>(static_cast<uint32_t>(out))));
  return out;
}

// double -> int64 needs care above 2^53 (still exact: doubles there are integers).
uint64_t ToIntD(double v, bool nan, unsigned rm, uint32_t& flags, int kind) {
  switch (kind) {
    case 0: return ToInt(v, nan, rm, flags, -2147483648.0, 2147483648.0, 0xffffffff80000000ull, 0x7fffffffull, true, true);
    case 1: return ToInt(v, nan, rm, flags, 0.0, 4294967296.0, 0, 0xffffffffffffffffull, false, false);
    case 2: return ToInt(v, nan, rm, flags, -9223372036854775808.0, 9223372036854775808.0, 1ull << 63, 0x7fffffffffffffffull, true, false);
    default: return ToInt(v, nan, rm, flags, 0.0, 18446744073709551616.0, 0, ~0ull, false, false);
  }
}

// For unsigned conversions, values in (-1, 0) round to 0 (or -0) legally; anything that
// rounds below zero is invalid. ToInt's lower bound 0.0 with r = -0.0 passes (-0.0 < 0 is false).

template <typename T, typename I>
T IntToFloat(I v, unsigned rm, uint32_t& flags) {
  HostFpEnv env(rm);
  T r = Opaque(static_cast<T>(Opaque(v)));
  flags |= env.Flags();
  return r;
}

}  // namespace

uint32_t Add(uint32_t a, uint32_t b, unsigned rm, uint32_t& f) { return Binary(a, b, rm, f, [](float x, float y) { return x + y; }); }
uint64_t Add(uint64_t a, uint64_t b, unsigned rm, uint32_t& f) { return Binary(a, b, rm, f, [](double x, double y) { return x + y; }); }
uint32_t Sub(uint32_t a, uint32_t b, unsigned rm, uint32_t& f) { return Binary(a, b, rm, f, [](float x, float y) { return x - y; }); }
uint64_t Sub(uint64_t a, uint64_t b, unsigned rm, uint32_t& f) { return Binary(a, b, rm, f, [](double x, double y) { return x - y; }); }
uint32_t Mul(uint32_t a, uint32_t b, unsigned rm, uint32_t& f) { return Binary(a, b, rm, f, [](float x, float y) { return x * y; }); }
uint64_t Mul(uint64_t a, uint64_t b, unsigned rm, uint32_t& f) { return Binary(a, b, rm, f, [](double x, double y) { return x * y; }); }
uint32_t Div(uint32_t a, uint32_t b, unsigned rm, uint32_t& f) { return Binary(a, b, rm, f, [](float x, float y) { return x / y; }); }
uint64_t Div(uint64_t a, uint64_t b, unsigned rm, uint32_t& f) { return Binary(a, b, rm, f, [](double x, double y) { return x / y; }); }

uint32_t Sqrt(uint32_t a, unsigned rm, uint32_t& flags) {
  HostFpEnv env(rm);
  float r = Opaque(_mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(Opaque(F(a))))));
  flags |= env.Flags();
  return B(r);
}
uint64_t Sqrt(uint64_t a, unsigned rm, uint32_t& flags) {
  HostFpEnv env(rm);
  double r = Opaque(std::sqrt(Opaque(D(a))));
  flags |= env.Flags();
  return B(r);
}

uint32_t MulAdd(uint32_t a, uint32_t b, uint32_t c, unsigned rm, uint32_t& f) { return Fused(a, b, c, false, false, rm, f); }
uint64_t MulAdd(uint64_t a, uint64_t b, uint64_t c, unsigned rm, uint32_t& f) { return Fused(a, b, c, false, false, rm, f); }
uint32_t MulSub(uint32_t a, uint32_t b, uint32_t c, unsigned rm, uint32_t& f) { return Fused(a, b, c, false, true, rm, f); }
uint64_t MulSub(uint64_t a, uint64_t b, uint64_t c, unsigned rm, uint32_t& f) { return Fused(a, b, c, false, true, rm, f); }
uint32_t NegMulSub(uint32_t a, uint32_t b, uint32_t c, unsigned rm, uint32_t& f) { return Fused(a, b, c, true, false, rm, f); }
uint64_t NegMulSub(uint64_t a, uint64_t b, uint64_t c, unsigned rm, uint32_t& f) { return Fused(a, b, c, true, false, rm, f); }
uint32_t NegMulAdd(uint32_t a, uint32_t b, uint32_t c, unsigned rm, uint32_t& f) { return Fused(a, b, c, true, true, rm, f); }
uint64_t NegMulAdd(uint64_t a, uint64_t b, uint64_t c, unsigned rm, uint32_t& f) { return Fused(a, b, c, true, true, rm, f); }

uint32_t Min(uint32_t a, uint32_t b, uint32_t& f) { return MinMax(a, b, f, false); }
uint64_t Min(uint64_t a, uint64_t b, uint32_t& f) { return MinMax(a, b, f, false); }
uint32_t Max(uint32_t a, uint32_t b, uint32_t& f) { return MinMax(a, b, f, true); }
uint64_t Max(uint64_t a, uint64_t b, uint32_t& f) { return MinMax(a, b, f, true); }
bool Eq(uint32_t a, uint32_t b, uint32_t& f) { return Compare(a, b, f, 0); }
bool Eq(uint64_t a, uint64_t b, uint32_t& f) { return Compare(a, b, f, 0); }
bool Lt(uint32_t a, uint32_t b, uint32_t& f) { return Compare(a, b, f, 1); }
bool Lt(uint64_t a, uint64_t b, uint32_t& f) { return Compare(a, b, f, 1); }
bool Le(uint32_t a, uint32_t b, uint32_t& f) { return Compare(a, b, f, 2); }
bool Le(uint64_t a, uint64_t b, uint32_t& f) { return Compare(a, b, f, 2); }
uint64_t Classify(uint32_t a) { return ClassifyT(a); }
uint64_t Classify(uint64_t a) { return ClassifyT(a); }

uint64_t ToI32(uint32_t a, unsigned rm, uint32_t& f) { return ToIntD(F(a), IsNaN(a), rm, f, 0); }
uint64_t ToU32(uint32_t a, unsigned rm, uint32_t& f) {
  uint64_t r = ToIntD(F(a), IsNaN(a), rm, f, 1);
  return static_cast<uint64_t>(static_cast<int64_t>(static_cast<int32_t>(static_cast<uint32_t>(r))));
}
uint64_t ToI64(uint32_t a, unsigned rm, uint32_t& f) { return ToIntD(F(a), IsNaN(a), rm, f, 2); }
uint64_t ToU64(uint32_t a, unsigned rm, uint32_t& f) { return ToIntD(F(a), IsNaN(a), rm, f, 3); }
uint64_t ToI32(uint64_t a, unsigned rm, uint32_t& f) { return ToIntD(D(a), IsNaN(a), rm, f, 0); }
uint64_t ToU32(uint64_t a, unsigned rm, uint32_t& f) {
  uint64_t r = ToIntD(D(a), IsNaN(a), rm, f, 1);
  return static_cast<uint64_t>(static_cast<int64_t>(static_cast<int32_t>(static_cast<uint32_t>(r))));
}
uint64_t ToI64(uint64_t a, unsigned rm, uint32_t& f) { return ToIntD(D(a), IsNaN(a), rm, f, 2); }
uint64_t ToU64(uint64_t a, unsigned rm, uint32_t& f) { return ToIntD(D(a), IsNaN(a), rm, f, 3); }

uint32_t I32ToF32(uint64_t v, unsigned rm, uint32_t& f) { return B(IntToFloat<float>(static_cast<int32_t>(v), rm, f)); }
uint32_t U32ToF32(uint64_t v, unsigned rm, uint32_t& f) { return B(IntToFloat<float>(static_cast<int64_t>(static_cast<uint32_t>(v)), rm, f)); }
uint32_t I64ToF32(uint64_t v, unsigned rm, uint32_t& f) { return B(IntToFloat<float>(static_cast<int64_t>(v), rm, f)); }
uint32_t U64ToF32(uint64_t v, unsigned rm, uint32_t& f) { return B(IntToFloat<float>(v, rm, f)); }
uint64_t I32ToF64(uint64_t v, unsigned rm, uint32_t& f) { return B(IntToFloat<double>(static_cast<int32_t>(v), rm, f)); }
uint64_t U32ToF64(uint64_t v, unsigned rm, uint32_t& f) { return B(IntToFloat<double>(static_cast<uint32_t>(v), rm, f)); }
uint64_t I64ToF64(uint64_t v, unsigned rm, uint32_t& f) { return B(IntToFloat<double>(static_cast<int64_t>(v), rm, f)); }
uint64_t U64ToF64(uint64_t v, unsigned rm, uint32_t& f) { return B(IntToFloat<double>(v, rm, f)); }

uint64_t F32ToF64(uint32_t a, uint32_t& flags) {
  if (IsSNaN(a)) flags |= kNV;
  if (IsNaN(a)) return kCanonicalNaN64;
  return std::bit_cast<uint64_t>(static_cast<double>(F(a)));
}
uint32_t F64ToF32(uint64_t a, unsigned rm, uint32_t& flags) {
  HostFpEnv env(rm);
  float r = Opaque(static_cast<float>(Opaque(D(a))));
  flags |= env.Flags();
  return B(r);
}

}  // namespace ferry::riscv::fpu
