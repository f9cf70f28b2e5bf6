// Host check of the CUDA multi-tensor launch plan (csrc/cuda/launch_table.h): for lists of many
// sizes, every element of every non-empty tensor is covered by exactly one block of one launch,
// each launch's table fits its limits, and the step-size index points back to the caller's list.
// Runs without a GPU (ctest), so the indexing the CUDA kernels rely on is tested on every machine.
#include "cuda/launch_table.h"

#include <cstdio>
#include <random>
#include <vector>

namespace {

using soap_kernels::cuda::block_range;
using soap_kernels::cuda::block_slot;
using soap_kernels::cuda::kChunk;
using soap_kernels::cuda::kMaxTensorsPerLaunch;
using soap_kernels::cuda::launch_over_chunks;
using soap_kernels::cuda::LaunchTable;
using soap_kernels::cuda::TensorEntry;

bool check(const std::vector<int64_t>& numels) {
  // Fake, distinct "pointers": the index of the tensor, so coverage can be counted per tensor.
  std::vector<TensorEntry<4>> tensors;
  std::vector<std::vector<int>> covered(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) {
    void* tag = reinterpret_cast<void*>(static_cast<uintptr_t>(i + 1));
    tensors.push_back({{tag, tag, tag, tag}, numels[i], 0.5f * static_cast<float>(i), static_cast<int32_t>(i)});
    covered[i].assign(static_cast<size_t>(numels[i]), 0);
  }
  bool ok = true;
  int launches = 0;
  launch_over_chunks<4>(tensors, [&](const LaunchTable<4>& table, unsigned int blocks) {
    ++launches;
    ok &= table.num_slots >= 1 && table.num_slots <= kMaxTensorsPerLaunch;
    ok &= table.block_start[table.num_slots] == static_cast<int32_t>(blocks);
    for (unsigned int b = 0; b < blocks; ++b) {
      const int slot = block_slot(table, b);
      const auto range = block_range(table, slot, b);
      const auto t = static_cast<size_t>(reinterpret_cast<uintptr_t>(table.ptr[0][slot]) - 1);
      ok &= table.list_index[slot] == static_cast<int32_t>(t) && table.numel[slot] == numels[t];
      ok &= table.step_size[slot] == 0.5f * static_cast<float>(t);
      ok &= range.begin >= 0 && range.begin < range.end && range.end <= numels[t] && range.begin % kChunk == 0;
      for (int64_t e = range.begin; e < range.end && ok; ++e) {
        covered[t][static_cast<size_t>(e)] += 1;
      }
    }
  });
  for (size_t i = 0; i < numels.size(); ++i) {
    for (const int c : covered[i]) {
      ok &= c == 1;
    }
  }
  std::printf("%zu tensors, %d launch(es): %s\n", numels.size(), launches, ok ? "ok" : "FAILED");
  return ok;
}

}  // namespace

int main() {
  bool ok = true;
  ok &= check({});
  ok &= check({0});
  ok &= check({1});
  ok &= check({kChunk - 1, kChunk, kChunk + 1, 3 * kChunk + 7});
  std::mt19937 rng(0);
  std::uniform_int_distribution<int64_t> small(0, 5000);
  std::vector<int64_t> many;
  for (int i = 0; i < 3 * kMaxTensorsPerLaunch + 5; ++i) {
    many.push_back(i % 7 == 0 ? 0 : small(rng));  // some empty tensors among them
  }
  many.push_back(1000003);
  ok &= check(many);
  std::printf("%s\n", ok ? "all ok" : "FAILURES");
  return ok ? 0 : 1;
}
