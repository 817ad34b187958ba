//! Training loop: pull, forward/backward, push.
