#pragma once

namespace moe {

// Train: the noisy gate draws noise and the load is the smooth estimator of MATH.md 3.
// Inference: no noise (sigma = 0), the load is the count of tokens routed to each expert.
enum class Mode { train, inference };

}  // namespace moe
