//! The relay bridge: which relay and binding each redirect and reverse entry travels on
//! ([`routes`], the one place both sides agree on), and azbridge's command lines for the
//! sidecar and the laptop ([`command_line`]).

pub(crate) mod command_line;
pub(crate) mod routes;

pub(crate) use command_line::CONNECTION_STRING_ENV;
