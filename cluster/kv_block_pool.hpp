#pragma once
// The coordinator's KV blocks: ids handed to sequences' block tables, with reference counts, and a
// cache of whole blocks by content so that a prompt whose beginning an earlier sequence computed
// shares those blocks instead of computing them again (vLLM's automatic prefix caching; llama.cpp's
// server keeps one slot's prompt instead).
//
// A block is cached under (the block before it in the chain, its block_size tokens): a block's K/V
// depends on every token before it, and the chain makes a match exact without hashing whole
// prefixes (no collisions to reason about). A block no sequence holds stays cached, idle, until a
// reservation needs it: idle blocks are evicted least recently released first, a sequence's blocks
// released from its last to its first (so a prefix outlives its tails), and evicting a block evicts
// the blocks cached after it (they can no longer be reached). A cached block is never written again:
// the scheduler shares only blocks of confirmed tokens (no speculative drafts), and sequences write
// only at positions past their shared blocks.
#include <cstdint>
#include <list>
#include <span>
#include <unordered_map>
#include <vector>

namespace nibble::cluster {

class KvBlockPool {
 public:
  // prefix_caching false: match finds nothing and publish caches nothing (a plain allocator).
  KvBlockPool(int64_t n_blocks, int64_t block_size, bool prefix_caching);

  int64_t block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  // Blocks a reservation can take now: free ones and idle cached ones (evicted on demand).
  int64_t available() const { return static_cast<int64_t>(free_.size() + idle_.size()); }
  // Cached blocks no sequence holds.
  int64_t idle_cached() const { return static_cast<int64_t>(idle_.size()); }
  // Blocks held by some sequence's table (each counted once however many share it).
  int64_t held() const { return static_cast<int64_t>(refs_.size()) - available(); }

  // The cached blocks holding the longest prefix of `tokens` in whole blocks, at most max_tokens tokens
  // (each block held once more: release gives it back). Empty when prefix caching is off.
  // adapter: the LoRA adapter the sequence runs with (0: none): blocks are shared only among sequences
  // of one adapter (an adapter changes every K/V).
  std::vector<int32_t> match(std::span<const int32_t> tokens, int64_t max_tokens, int32_t adapter = 0);
  // Grows `table` to cover n_positions with new blocks, each held once; false (table unchanged) when
  // fewer are available.
  bool reserve(std::vector<int32_t>& table, int64_t n_positions);
  // Shrinks `table` to the blocks n_positions need, releasing the rest (last first).
  void truncate(std::vector<int32_t>& table, int64_t n_positions);
  void release(std::vector<int32_t>& table) { truncate(table, 0); }
  // Offers the first n_tokens / block_size blocks of `table` as holding tokens[0, those blocks' length)
  // (their K/V computed by a step already sent to the workers, which run steps in order), so that
  // later matches share them. A block whose content another cached block already holds stays
  // private, and so do the blocks after it. tokens.size() >= n_tokens.
  void publish(const std::vector<int32_t>& table, std::span<const int32_t> tokens, int64_t n_tokens,
               int32_t adapter = 0);

 private:
  struct Key {
    int32_t parent = -1;  // the cached block before it; -1 - adapter for a sequence's first block
    std::vector<int32_t> tokens;
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    size_t operator()(const Key& key) const;
  };
  int32_t take_block();
  void hold(int32_t block);
  void unhold(int32_t block);
  void evict(int32_t block);  // an idle cached block and every block cached after it

  int64_t block_size_;
  bool prefix_caching_;
  std::vector<int32_t> refs_;                           // per block: the tables holding it
  std::vector<int32_t> free_;                           // not held, not cached; the lowest id last
  std::list<int32_t> idle_;                             // cached and not held, least recently released first
  std::vector<std::list<int32_t>::iterator> idle_pos_;  // per block, valid while it is idle
  std::vector<bool> cached_;
  std::vector<Key> key_;                        // per cached block
  std::vector<std::vector<int32_t>> children_;  // per cached block: the cached blocks after it
  std::unordered_map<Key, int32_t, KeyHash> cache_;
};

}  // namespace nibble::cluster
