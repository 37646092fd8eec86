// Small steps of a layer whose routed experts are in RAM and whose router is on the GPU: the GPU
// runs some of the step's experts (their weights copied to it over PCIe) while the CPU threads run
// the others, so that the copy engine's path from RAM adds to the CPU threads'. Both backends call
// this with the same routing, and so agree on the split.
#pragma once
#include <cstdint>
#include <vector>

namespace glmoe {

// The experts the GPU takes in one step, in the order it stages them: round(share x the step's
// distinct experts) of them, among those it can fetch (experts [0, fetchable)), the ones routed to
// the most tokens first, then the lowest ids. A count fixed by the step keeps the two sides' times
// in the ratio the share is tuned for; a fixed set of experts (the first share x n_expert) left the
// count to the routing, and most steps waited on the side that got more. ids: n_tokens x k routes;
// ids outside [0, n_expert) are not counted.
std::vector<int> gpu_step_experts(const int32_t* ids, int64_t n_tokens, int k, int n_expert, int fetchable,
                                  double share);

}  // namespace glmoe
