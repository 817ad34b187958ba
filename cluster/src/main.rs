//! `ember`: the user-facing launcher.
fn main() {}
