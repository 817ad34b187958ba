//! `worker`: one Ember training worker.
fn main() {}
