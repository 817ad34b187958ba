//! Ember cluster launcher.
