"""KV memory: page allocator, device buffers, slot tables, prefix caches and their one owner, KVManager."""
