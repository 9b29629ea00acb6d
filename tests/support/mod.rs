//! Shared helpers for integration and end-to-end tests (`mod support;` in a test file).
#![allow(dead_code)] // each test binary uses a different subset

pub mod control_plane;
pub mod kips_e2e;
pub mod webhook;
