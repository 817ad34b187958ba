//! `ps-server`: one shard of an Ember parameter server.
fn main() {}
