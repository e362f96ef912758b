//! Fan-out: the `Fanout` trait, `LocalFanout` and `RedisStreamsFanout`. Built in the multi-node step.
