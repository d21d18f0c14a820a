//! Bulwark's protocol cores as pure, sans-IO state machines.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::panic))]
