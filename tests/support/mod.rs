//! Shared helpers for integration and end-to-end tests (`mod support;` in a test file).
#![allow(dead_code)] // each test binary uses a different subset

pub mod control_plane;
pub mod kips_e2e;
pub mod laptop;
pub mod node;
pub mod process;
pub mod scenario;
pub mod webhook;

/// A container's args as strings (empty when it has none).
pub fn args(container: &k8s_openapi::api::core::v1::Container) -> Vec<&str> {
    container
        .args
        .iter()
        .flatten()
        .map(String::as_str)
        .collect()
}
