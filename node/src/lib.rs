//! The Bulwark replica runtime.
