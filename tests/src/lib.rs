//! The deterministic simulator and cross-crate tests.
