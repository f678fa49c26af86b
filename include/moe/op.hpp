#pragma once

namespace moe {

// Whether a GEMM operand is used as stored or transposed.
enum class Op { none, transpose };

}  // namespace moe
