//! kips: redirect a Kubernetes workload's traffic over Azure Relay to a developer's machine.
//!
//! The pure core ([`annotations`], [`inject`]) turns annotated objects into JSON patches; the
//! edges ([`admission`], [`server`], [`tls`], [`cli`]) do the I/O.

pub mod admission;
pub mod annotations;
pub mod inject;

/// The azbridge release the default sidecar image carries.
pub const AZBRIDGE_VERSION: &str = "0.16.1";
pub mod bridge;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod dev;
pub mod initnet;
pub mod manifest;
pub mod metrics;
pub mod relay;
pub mod server;
pub mod tls;
pub mod webhook;
