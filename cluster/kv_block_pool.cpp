#include "cluster/kv_block_pool.hpp"

#include <algorithm>
#include <stdexcept>

namespace nibble::cluster {

size_t KvBlockPool::KeyHash::operator()(const Key& key) const {
  // FNV-1a over the parent and the tokens: equal keys are compared in full, so this only spreads them.
  uint64_t h = 1469598103934665603ull;
  const auto mix = [&h](uint32_t v) {
    for (int i = 0; i < 4; ++i) {
      h ^= (v >> (8 * i)) & 0xFF;
      h *= 1099511628211ull;
    }
  };
  mix(static_cast<uint32_t>(key.parent));
  for (const int32_t t : key.tokens) mix(static_cast<uint32_t>(t));
  return static_cast<size_t>(h);
}

KvBlockPool::KvBlockPool(int64_t n_blocks, int64_t block_size, bool prefix_caching)
    : block_size_(block_size),
      prefix_caching_(prefix_caching),
      refs_(static_cast<size_t>(n_blocks), 0),
      idle_pos_(static_cast<size_t>(n_blocks)),
      cached_(static_cast<size_t>(n_blocks), false),
      key_(static_cast<size_t>(n_blocks)),
      children_(static_cast<size_t>(n_blocks)) {
  if (n_blocks < 0 || block_size <= 0) throw std::invalid_argument("KV block pool: bad block count or size");
  free_.reserve(static_cast<size_t>(n_blocks));
  // Highest id first so the lowest ids are handed out first (easier to read in traces).
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

int32_t KvBlockPool::take_block() {
  if (free_.empty()) evict(idle_.front());  // the least recently released cached block
  const int32_t b = free_.back();
  free_.pop_back();
  refs_[static_cast<size_t>(b)] = 1;
  return b;
}

void KvBlockPool::hold(int32_t block) {
  const auto b = static_cast<size_t>(block);
  if (refs_[b]++ == 0) idle_.erase(idle_pos_[b]);  // only cached blocks are matched
}

void KvBlockPool::unhold(int32_t block) {
  const auto b = static_cast<size_t>(block);
  if (refs_[b] <= 0) throw std::logic_error("KV block pool: a block released more often than held");
  if (--refs_[b] > 0) return;
  if (cached_[b]) {
    idle_pos_[b] = idle_.insert(idle_.end(), block);
  } else {
    free_.push_back(block);
  }
}

void KvBlockPool::evict(int32_t block) {
  // The block and, depth first, every block cached after it: none is held (a table holding a block
  // holds the blocks before it), so all are idle.
  std::vector<int32_t> pending{block};
  while (!pending.empty()) {
    const int32_t b = pending.back();
    pending.pop_back();
    const auto bi = static_cast<size_t>(b);
    if (refs_[bi] != 0) throw std::logic_error("KV block pool: evicting a block a sequence holds");
    idle_.erase(idle_pos_[bi]);
    pending.insert(pending.end(), children_[bi].begin(), children_[bi].end());
    children_[bi].clear();
    const Key& key = key_[bi];
    if (key.parent >= 0 && cached_[static_cast<size_t>(key.parent)])
      std::erase(children_[static_cast<size_t>(key.parent)], b);
    cache_.erase(key);
    key_[bi] = {};
    cached_[bi] = false;
    free_.push_back(b);
  }
}

std::vector<int32_t> KvBlockPool::match(std::span<const int32_t> tokens, int64_t max_tokens,
                                        int32_t adapter) {
  std::vector<int32_t> blocks;
  if (!prefix_caching_) return blocks;
  const int64_t whole = std::min<int64_t>(max_tokens, static_cast<int64_t>(tokens.size())) / block_size_;
  Key key;
  key.parent = -1 - adapter;
  for (int64_t i = 0; i < whole; ++i) {
    key.tokens.assign(tokens.begin() + i * block_size_, tokens.begin() + (i + 1) * block_size_);
    const auto it = cache_.find(key);
    if (it == cache_.end()) break;
    hold(it->second);
    blocks.push_back(it->second);
    key.parent = it->second;
  }
  return blocks;
}

bool KvBlockPool::reserve(std::vector<int32_t>& table, int64_t n_positions) {
  const int64_t needed = (n_positions + block_size_ - 1) / block_size_;
  const int64_t extra = needed - static_cast<int64_t>(table.size());
  if (extra <= 0) return true;
  if (extra > available()) return false;
  for (int64_t i = 0; i < extra; ++i) table.push_back(take_block());
  return true;
}

void KvBlockPool::truncate(std::vector<int32_t>& table, int64_t n_positions) {
  const int64_t keep = (n_positions + block_size_ - 1) / block_size_;
  while (static_cast<int64_t>(table.size()) > keep) {
    unhold(table.back());
    table.pop_back();
  }
}

void KvBlockPool::publish(const std::vector<int32_t>& table, std::span<const int32_t> tokens,
                          int64_t n_tokens, int32_t adapter) {
  if (!prefix_caching_) return;
  const int64_t whole = std::min<int64_t>(n_tokens / block_size_, static_cast<int64_t>(table.size()));
  if (static_cast<int64_t>(tokens.size()) < whole * block_size_)
    throw std::logic_error("KV block pool: publishing blocks without their tokens");
  int32_t parent = -1 - adapter;
  for (int64_t i = 0; i < whole; ++i) {
    const int32_t b = table[static_cast<size_t>(i)];
    const auto bi = static_cast<size_t>(b);
    if (!cached_[bi]) {
      Key key{parent,
              std::vector<int32_t>(tokens.begin() + i * block_size_, tokens.begin() + (i + 1) * block_size_)};
      if (cache_.count(key) != 0) return;  // another block holds this content: the rest stays private
      cache_.emplace(key, b);
      key_[bi] = std::move(key);
      cached_[bi] = true;
      if (parent >= 0) children_[static_cast<size_t>(parent)].push_back(b);
    }
    parent = b;
  }
}

}  // namespace nibble::cluster
