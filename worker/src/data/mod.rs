//! Data path: fetch, prepare, read, count, synthesize.
