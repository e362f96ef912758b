//! Storage: the `Store` trait, `MemoryStore` (embedded default) and `PgStore` with a Redis cache. Built in the storage step.
