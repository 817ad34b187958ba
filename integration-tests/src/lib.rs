//! Helpers for Ember's multi-process integration tests.
