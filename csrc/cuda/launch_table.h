// How the CUDA kernels spread a list of tensors over blocks (multi-tensor launch), as plain C++
// so that the host test csrc/tests/test_launch_table.cpp can check the mapping without a GPU.
//
// Every tensor is cut into chunks of kChunk elements; block b of a launch works on one chunk. The
// launch table travels by value as the kernel parameter (no host-to-device copy, so a launch can
// be captured in a CUDA graph); it holds up to kMaxTensorsPerLaunch tensors and, per tensor, its
// first block, so one launch covers any number of chunks and fills the GPU. Longer lists take
// several launches.
#pragma once

#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define SOAP_KERNELS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SOAP_KERNELS_HOST_DEVICE inline
#endif

namespace soap_kernels::cuda {

// 16 Ki elements per block: with 256 threads and 4 elements per access, 16 accesses per thread.
constexpr int64_t kChunk = 1 << 14;
constexpr int kMaxTensorsPerLaunch = 48;
// Blocks of one launch (a grid dimension holds 2^31 - 1); 2^30 chunks are 2^44 elements.
constexpr int64_t kMaxBlocksPerLaunch = int64_t{1} << 30;

// Block b works on the tensor (slot) s with block_start[s] <= b < block_start[s + 1], on its
// chunk b - block_start[s].
template <int kDepth>
struct LaunchTable {
  void* ptr[kDepth][kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  float step_size[kMaxTensorsPerLaunch];  // adam_step float[] overload
  int32_t list_index[kMaxTensorsPerLaunch];  // position in the caller's list (step_size tensor)
  int32_t block_start[kMaxTensorsPerLaunch + 1];
  int32_t num_slots;
};
// Kernel parameters are limited to 4 KiB on every architecture and CUDA version we build for.
static_assert(sizeof(LaunchTable<4>) + 64 <= 4096, "launch table too large for kernel parameters");

// One tensor of a list as the launch tables see it.
template <int kDepth>
struct TensorEntry {
  std::array<void*, kDepth> ptr;
  int64_t numel;
  float step_size;
  int32_t list_index;
};

// Fills tables and calls `launch(table, num_blocks)` until every tensor is covered; a launch takes
// whole tensors. Empty tensors get no slot.
template <int kDepth, typename Launch>
void launch_over_chunks(const std::vector<TensorEntry<kDepth>>& tensors, const Launch& launch) {
  LaunchTable<kDepth> table{};
  int slots = 0;
  int64_t blocks = 0;
  const auto flush = [&]() {
    if (slots > 0) {
      table.num_slots = slots;
      table.block_start[slots] = static_cast<int32_t>(blocks);
      launch(table, static_cast<unsigned int>(blocks));  // the launch copies the table
    }
    slots = 0;
    blocks = 0;
  };
  for (const auto& t : tensors) {
    const int64_t chunks = (t.numel + kChunk - 1) / kChunk;
    if (chunks == 0) {
      continue;
    }
    TORCH_CHECK_VALUE(chunks <= kMaxBlocksPerLaunch, "soap_kernels: a tensor of ", t.numel,
        " elements is too large for one launch");
    if (slots == kMaxTensorsPerLaunch || blocks + chunks > kMaxBlocksPerLaunch) {
      flush();
    }
    const int slot = slots++;
    for (int d = 0; d < kDepth; ++d) {
      table.ptr[d][slot] = t.ptr[d];
    }
    table.numel[slot] = t.numel;
    table.step_size[slot] = t.step_size;
    table.list_index[slot] = t.list_index;
    table.block_start[slot] = static_cast<int32_t>(blocks);
    blocks += chunks;
  }
  flush();
}

// The slot of block `block`: a scan of at most kMaxTensorsPerLaunch entries of the parameter table,
// the same for every thread of a block (a broadcast read).
template <int kDepth>
SOAP_KERNELS_HOST_DEVICE int block_slot(const LaunchTable<kDepth>& table, unsigned int block) {
  const auto b = static_cast<int32_t>(block);
  int slot = 0;
  while (slot + 1 < table.num_slots && b >= table.block_start[slot + 1]) {
    ++slot;
  }
  return slot;
}

// Elements [begin, end) of the slot's tensor that block `block` works on.
struct ChunkRange {
  int64_t begin;
  int64_t end;
};

template <int kDepth>
SOAP_KERNELS_HOST_DEVICE ChunkRange block_range(const LaunchTable<kDepth>& table, int slot, unsigned int block) {
  const int64_t begin = static_cast<int64_t>(static_cast<int32_t>(block) - table.block_start[slot]) * kChunk;
  const int64_t end = begin + kChunk < table.numel[slot] ? begin + kChunk : table.numel[slot];
  return {begin, end};
}

}  // namespace soap_kernels::cuda
