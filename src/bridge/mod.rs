//! The relay bridge: which relay and binding each redirect and reverse entry travels on
//! ([`routes`], the one place both sides agree on), and azbridge's command lines for the
//! sidecar and the laptop ([`command_line`]), and the relay Secret ([`secret`]).

pub(crate) mod command_line;
pub(crate) mod routes;
pub(crate) mod secret;

pub(crate) use command_line::CONNECTION_STRING_ENV;
pub use secret::{CONNECTION_STRING_KEY, DEFAULT_RELAY_SECRET};

/// The relay bridge the sidecar runs, and what it can and cannot do: the webhook renders the
/// sidecar, `kips-init`'s rules and its warnings from these facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BridgeEngine {
    /// Azure/azure-relay-bridge: binds IPv4 only (`0.0.0.0`; `[::]` cannot be written), its
    /// UDP forwarding stops after one failed send, and its open ports prove nothing about the
    /// relay (so it gets no probe that would send traffic through it).
    #[default]
    Azbridge,
}

impl BridgeEngine {
    /// Whether its listeners take IPv6 connections (so ip6tables may redirect to them).
    pub fn binds_ipv6(self) -> bool {
        match self {
            BridgeEngine::Azbridge => false,
        }
    }

    /// Whether UDP forwarding survives a failed send (no listener, a stale route).
    pub fn udp_survives_failures(self) -> bool {
        match self {
            BridgeEngine::Azbridge => false,
        }
    }
}
