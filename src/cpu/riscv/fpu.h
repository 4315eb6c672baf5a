// RISC-V F/D arithmetic as pure functions, bit-exact with the ISA spec:
// rounding modes, canonical NaNs, exception flags. The executor handles NaN-boxing,
// sign injection, moves and the dynamic rounding mode (it passes a resolved rm
// 0..4; an invalid rm is an illegal instruction decided by the executor).
// Operands/results are raw IEEE-754 bit patterns: uint32_t = binary32, uint64_t = binary64.
#pragma once

#include <cstdint>

namespace ferry::riscv::fpu {

// fflags bits
inline constexpr uint32_t kNX = 1, kUF = 2, kOF = 4, kDZ = 8, kNV = 16;
// rounding modes
inline constexpr unsigned kRNE = 0, kRTZ = 1, kRDN = 2, kRUP = 3, kRMM = 4;

// Arithmetic. `flags` accumulates (|=) exception bits.
uint32_t Add(uint32_t a, uint32_t b, unsigned rm, uint32_t& flags);
uint64_t Add(uint64_t a, uint64_t b, unsigned rm, uint32_t& flags);
uint32_t Sub(uint32_t a, uint32_t b, unsigned rm, uint32_t& flags);
uint64_t Sub(uint64_t a, uint64_t b, unsigned rm, uint32_t& flags);
uint32_t Mul(uint32_t a, uint32_t b, unsigned rm, uint32_t& flags);
uint64_t Mul(uint64_t a, uint64_t b, unsigned rm, uint32_t& flags);
uint32_t Div(uint32_t a, uint32_t b, unsigned rm, uint32_t& flags);
uint64_t Div(uint64_t a, uint64_t b, unsigned rm, uint32_t& flags);
uint32_t Sqrt(uint32_t a, unsigned rm, uint32_t& flags);
uint64_t Sqrt(uint64_t a, unsigned rm, uint32_t& flags);
// Fused: a*b+c, a*b-c, -(a*b)+c, -(a*b)-c  (FMADD, FMSUB, FNMSUB, FNMADD)
uint32_t MulAdd(uint32_t a, uint32_t b, uint32_t c, unsigned rm, uint32_t& flags);
uint64_t MulAdd(uint64_t a, uint64_t b, uint64_t c, unsigned rm, uint32_t& flags);
uint32_t MulSub(uint32_t a, uint32_t b, uint32_t c, unsigned rm, uint32_t& flags);
uint64_t MulSub(uint64_t a, uint64_t b, uint64_t c, unsigned rm, uint32_t& flags);
uint32_t NegMulSub(uint32_t a, uint32_t b, uint32_t c, unsigned rm, uint32_t& flags);  // FNMSUB
uint64_t NegMulSub(uint64_t a, uint64_t b, uint64_t c, unsigned rm, uint32_t& flags);
uint32_t NegMulAdd(uint32_t a, uint32_t b, uint32_t c, unsigned rm, uint32_t& flags);  // FNMADD
uint64_t NegMulAdd(uint64_t a, uint64_t b, uint64_t c, unsigned rm, uint32_t& flags);
// FMIN/FMAX (IEEE 754-2019 minimumNumber/maximumNumber as in RISC-V 2.2+)
uint32_t Min(uint32_t a, uint32_t b, uint32_t& flags);
uint64_t Min(uint64_t a, uint64_t b, uint32_t& flags);
uint32_t Max(uint32_t a, uint32_t b, uint32_t& flags);
uint64_t Max(uint64_t a, uint64_t b, uint32_t& flags);
// Comparisons (FEQ quiet, FLT/FLE signaling)
bool Eq(uint32_t a, uint32_t b, uint32_t& flags);
bool Eq(uint64_t a, uint64_t b, uint32_t& flags);
bool Lt(uint32_t a, uint32_t b, uint32_t& flags);
bool Lt(uint64_t a, uint64_t b, uint32_t& flags);
bool Le(uint32_t a, uint32_t b, uint32_t& flags);
bool Le(uint64_t a, uint64_t b, uint32_t& flags);
// FCLASS: 10-bit mask
uint64_t Classify(uint32_t a);
uint64_t Classify(uint64_t a);
// Float -> integer (saturating per spec; results sign-extended to 64 bits for W/WU)
uint64_t ToI32(uint32_t a, unsigned rm, uint32_t& flags);   // FCVT.W.S
uint64_t ToU32(uint32_t a, unsigned rm, uint32_t& flags);   // FCVT.WU.S
uint64_t ToI64(uint32_t a, unsigned rm, uint32_t& flags);   // FCVT.L.S
uint64_t ToU64(uint32_t a, unsigned rm, uint32_t& flags);   // FCVT.LU.S
uint64_t ToI32(uint64_t a, unsigned rm, uint32_t& flags);   // FCVT.W.D
uint64_t ToU32(uint64_t a, unsigned rm, uint32_t& flags);
uint64_t ToI64(uint64_t a, unsigned rm, uint32_t& flags);
uint64_t ToU64(uint64_t a, unsigned rm, uint32_t& flags);
// Integer -> float
uint32_t I32ToF32(uint64_t v, unsigned rm, uint32_t& flags);  // FCVT.S.W (uses low 32 bits)
uint32_t U32ToF32(uint64_t v, unsigned rm, uint32_t& flags);
uint32_t I64ToF32(uint64_t v, unsigned rm, uint32_t& flags);
uint32_t U64ToF32(uint64_t v, unsigned rm, uint32_t& flags);
uint64_t I32ToF64(uint64_t v, unsigned rm, uint32_t& flags);
uint64_t U32ToF64(uint64_t v, unsigned rm, uint32_t& flags);
uint64_t I64ToF64(uint64_t v, unsigned rm, uint32_t& flags);
uint64_t U64ToF64(uint64_t v, unsigned rm, uint32_t& flags);
// Precision conversion
uint64_t F32ToF64(uint32_t a, uint32_t& flags);               // FCVT.D.S (exact)
uint32_t F64ToF32(uint64_t a, unsigned rm, uint32_t& flags);  // FCVT.S.D

inline constexpr uint32_t kCanonicalNaN32 = 0x7fc00000u;
inline constexpr uint64_t kCanonicalNaN64 = 0x7ff8000000000000ull;

}  // namespace ferry::riscv::fpu
