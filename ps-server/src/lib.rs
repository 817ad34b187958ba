//! Ember parameter-server shard.
