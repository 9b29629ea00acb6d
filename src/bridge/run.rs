//! The engine: binds the `-L` sockets, starts the `-T` listeners and the health port, and
//! stops on a signal (exit 0) or on a refusal retrying cannot cure (exit 3 or 4).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::backoff::Backoff;
use super::connection_string::ConnectionString;
use super::forward::local::{self, LocalBindingContext};
use super::forward::remote::{self, RemoteContext};
use super::forward::{Fatal, Link, Settings, datagram};
use super::grammar::{Host, LocalBinding, RelayName};
use super::hc::listener::{self, ListenerOptions, Status};
use super::hc::{ConnectError, HcClient, Refusal};
use super::health::{self, Check, Health};
use super::metrics::{self, BridgeMetrics, ListenerLabels, RelayLabels, Side};
use super::sas::TokenSource;
use super::tls::RelayConnector;
use super::{BridgeConfig, BridgeError};

/// Runs until SIGTERM or SIGINT (Ok) or a fatal refusal (Err).
pub async fn run(config: BridgeConfig) -> Result<(), BridgeError> {
    raise_open_file_limit();
    run_until(config, termination()).await
}

/// Every carried connection holds two sockets: take the hard limit of open files, not the
/// soft one (often 1024), as Go's runtime does for its servers.
pub(crate) fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Runs until `shutdown` completes (Ok) or a fatal refusal (Err).
pub async fn run_until(
    config: BridgeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), BridgeError> {
    let text = config
        .connection_string
        .as_ref()
        .ok_or(BridgeError::NoConnectionString)?;
    let connection = ConnectionString::parse(text.expose())?;
    if text.expose() != text.expose().trim() {
        warn!(
            "the connection string has leading or trailing whitespace (a newline from the Secret?): kips bridge ignores it; azbridge would sign with it and get 401"
        );
    }
    if config.local.is_empty() && config.remote.is_empty() {
        return Err(BridgeError::NothingToForward);
    }
    if let Some(entity) = &connection.entity_path {
        let named = config
            .local
            .iter()
            .map(|f| ("-L", &f.relay))
            .chain(config.remote.iter().map(|f| ("-T", &f.relay)));
        for (flag, relay) in named {
            if !relay.as_str().eq_ignore_ascii_case(entity) {
                return Err(BridgeError::EntityMismatch {
                    entity: entity.clone(),
                    flag,
                    relay: relay.to_string(),
                });
            }
        }
    }
    let connector = RelayConnector::new(&config.extra_ca, config.relay_connect_timeout)?;
    let client = HcClient {
        tokens: TokenSource::new(
            connection.endpoint.clone(),
            connection.credential.clone(),
            config.token_lifetime,
        ),
        endpoint: connection.endpoint.clone(),
        connector,
        handshake_timeout: config.handshake_timeout,
    };
    let metrics = Arc::new(BridgeMetrics::new());
    let settings = Arc::new(Settings {
        keepalive: config.keepalive,
        target_connect_timeout: config.target_connect_timeout,
        udp_idle: config.udp_idle,
        udp_retry_after: Duration::from_millis(500),
    });
    let (fatal_sender, mut fatal) = mpsc::unbounded_channel::<Fatal>();
    let (stop, stopping) = watch::channel(false);
    let link = |relay: &RelayName| Link {
        client: client.clone(),
        relay: relay.clone(),
        settings: settings.clone(),
        fatal: fatal_sender.clone(),
    };
    let backoff = || Backoff::new(config.reconnect_base, config.reconnect_cap);

    let health_listener = match config.health_listen {
        Some(address) => Some(
            health::bind(address)
                .await
                .map_err(|error| BridgeError::Bind {
                    address: format!("{address} (health port)"),
                    error,
                })?,
        ),
        None => None,
    };

    // -L sockets are bound at once; their traffic waits for nothing but the relay.
    let mut background = tokio::task::JoinSet::new();
    for forward in &config.local {
        for binding in &forward.bindings {
            let name = binding.effective_name();
            let context = Arc::new(LocalBindingContext {
                link: link(&forward.relay),
                metrics: metrics.binding(forward.relay.as_str(), &name, Side::Local),
                name: name.clone(),
            });
            let addresses = bind_addresses(binding).await?;
            let mut bound = 0;
            let mut first_error = None;
            for address in &addresses {
                let protocol = if binding.port.udp { "udp" } else { "tcp" };
                let result = if binding.port.udp {
                    bind_udp(*address).map(|socket| {
                        background.spawn(datagram::serve_local(socket, context.clone()));
                    })
                } else {
                    bind_tcp(*address).map(|listener| {
                        background.spawn(local::serve_tcp(listener, context.clone()));
                    })
                };
                match result {
                    Ok(()) => {
                        bound += 1;
                        info!(%address, protocol, relay = %forward.relay, binding = %name, "-L listening");
                    }
                    // A name may resolve to an address this machine cannot bind (::1 with
                    // IPv6 off): the others serve. An IP address must bind.
                    Err(error)
                        if matches!(binding.bind_host(), Host::Name(_)) && addresses.len() > 1 =>
                    {
                        warn!(%error, "skipping one address of the binding's host name");
                        first_error.get_or_insert(error);
                    }
                    Err(error) => return Err(error),
                }
            }
            if bound == 0 {
                return Err(first_error.unwrap_or(BridgeError::Resolve {
                    host: binding.bind_host().to_plain_string(),
                    error: std::io::Error::other("no address"),
                }));
            }
        }
    }

    let mut checks = Vec::new();
    let local_relays: BTreeSet<&RelayName> = config.local.iter().map(|f| &f.relay).collect();
    for relay in local_relays {
        let accepted = Arc::new(AtomicBool::new(false));
        checks.push(Check {
            name: format!("credentials for hybrid connection {relay} (-L) not yet accepted"),
            ready: accepted.clone(),
        });
        let gauge = metrics
            .credentials_accepted
            .get_or_create(&RelayLabels {
                relay: relay.to_string(),
            })
            .clone();
        let link = link(relay);
        let mut backoff = backoff();
        background.spawn(async move {
            if check_credentials(&link, &mut backoff).await {
                accepted.store(true, Ordering::SeqCst);
                gauge.set(1);
            }
        });
    }

    let mut listeners = Vec::new();
    for (index, forward) in config.remote.iter().enumerate() {
        let online = Arc::new(AtomicBool::new(false));
        checks.push(Check {
            name: format!("listener {} (-T #{}) offline", forward.relay, index + 1),
            ready: online.clone(),
        });
        let status = Status {
            online,
            gauge: metrics
                .listener_online
                .get_or_create(&ListenerLabels {
                    relay: forward.relay.to_string(),
                    listener: (index + 1).to_string(),
                })
                .clone(),
        };
        let context = Arc::new(RemoteContext::new(
            link(&forward.relay),
            forward.clone(),
            &metrics,
        ));
        let options = ListenerOptions {
            entity: forward.relay.to_string(),
            keepalive: config.keepalive,
            backoff: backoff(),
        };
        let client = client.clone();
        let stopping = stopping.clone();
        let fatal = fatal_sender.clone();
        let relay = forward.relay.to_string();
        listeners.push(tokio::spawn(async move {
            let on_accept = move |accept| {
                tokio::spawn(remote::serve(accept, context.clone()));
            };
            if let Err(refusal) = listener::run(client, options, status, on_accept, stopping).await
            {
                let _ = fatal.send(Fatal { relay, refusal });
            }
        }));
    }

    if let Some(listener) = health_listener {
        info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "health port: /livez /readyz /metrics");
        background.spawn(health::serve(
            listener,
            Arc::new(Health { checks, metrics }),
        ));
    }

    background.spawn(release_memory_when_idle());

    tokio::pin!(shutdown);
    let outcome = tokio::select! {
        _ = &mut shutdown => {
            info!("stopping");
            Ok(())
        }
        Some(fatal) = fatal.recv() => Err(fatal_error(fatal)),
    };
    let _ = stop.send(true);
    // Listeners close their control channels, so the relay stops sending them connections.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        for listener in listeners {
            let _ = listener.await;
        }
    })
    .await;
    background.abort_all();
    outcome
}

/// After a burst of connections the allocator keeps the freed memory mapped (glibc's arenas
/// grow per thread and rarely shrink on their own): once no connection is open, give it
/// back, so a bridge that carried 1,000 streams returns to its idle size. Trimmed again over
/// the next 20 s, while the runtime's idle blocking threads (name lookups) exit and free
/// theirs.
async fn release_memory_when_idle() {
    const TICK: Duration = Duration::from_secs(5);
    const TRIMS: u8 = 5;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trims_left = 0;
    loop {
        tick.tick().await;
        if metrics::idle_again() {
            trims_left = TRIMS;
        }
        if trims_left > 0 && metrics::idle() {
            trims_left -= 1;
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only returns free heap pages to the kernel.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

fn fatal_error(fatal: Fatal) -> BridgeError {
    match fatal.refusal {
        Refusal::UnknownHybridConnection(_) => BridgeError::UnknownHybridConnection {
            relay: fatal.relay,
            refusal: fatal.refusal,
        },
        refusal => BridgeError::CredentialsRefused {
            relay: fatal.relay,
            refusal,
        },
    }
}

/// A sender cannot learn whether the relay takes its credentials without connecting: it
/// connects once at start (a listener, if one is online, sees a connection close before
/// its preamble and forgets it). 404 "no listener" means the credentials and the hybrid
/// connection were accepted. False when the relay refused for good (reported as fatal).
async fn check_credentials(link: &Link, backoff: &mut Backoff) -> bool {
    loop {
        match link.client.connect(link.relay.as_str()).await {
            Ok((_receiver, sender)) => {
                let _ = sender.close(1000, "").await;
                info!(relay = %link.relay, "credentials accepted (a listener is online)");
                return true;
            }
            Err(ConnectError::Refused(Refusal::NoListener(_))) => {
                info!(relay = %link.relay, "credentials accepted (no listener online yet)");
                return true;
            }
            Err(error) if error.refusal().is_some_and(Refusal::is_fatal) => {
                link.report(&error);
                return false;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                warn!(relay = %link.relay, %error, retry_in = ?delay, "cannot reach the relay");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The addresses a `-L` binding listens on: its IP, or every address its host name resolves
/// to (`localhost`: 127.0.0.1 and ::1), deduplicated.
async fn bind_addresses(binding: &LocalBinding) -> Result<Vec<SocketAddr>, BridgeError> {
    let port = binding.port.number;
    match binding.bind_host() {
        Host::Ip(ip) => Ok(vec![SocketAddr::new(ip, port)]),
        Host::Name(name) => {
            let mut addresses: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), port))
                .await
                .map_err(|error| BridgeError::Resolve {
                    host: name.clone(),
                    error,
                })?
                .collect();
            addresses.sort();
            addresses.dedup();
            Ok(addresses)
        }
    }
}

fn socket(address: SocketAddr, kind: socket2::Type) -> Result<socket2::Socket, BridgeError> {
    let bind_error = |error| BridgeError::Bind {
        address: address.to_string(),
        error,
    };
    let socket = socket2::Socket::new(socket2::Domain::for_address(address), kind, None)
        .map_err(bind_error)?;
    socket.set_reuse_address(true).map_err(bind_error)?;
    if address.is_ipv6() && address.ip().is_unspecified() {
        // `[::]` takes IPv4 too (as mapped addresses): what azbridge's 0.0.0.0 cannot.
        socket.set_only_v6(false).map_err(bind_error)?;
    }
    socket.set_nonblocking(true).map_err(bind_error)?;
    socket.bind(&address.into()).map_err(bind_error)?;
    Ok(socket)
}

fn bind_tcp(address: SocketAddr) -> Result<TcpListener, BridgeError> {
    let socket = socket(address, socket2::Type::STREAM)?;
    socket.listen(1024).map_err(|error| BridgeError::Bind {
        address: address.to_string(),
        error,
    })?;
    TcpListener::from_std(socket.into()).map_err(|error| BridgeError::Bind {
        address: address.to_string(),
        error,
    })
}

fn bind_udp(address: SocketAddr) -> Result<UdpSocket, BridgeError> {
    let socket = socket(address, socket2::Type::DGRAM)?;
    UdpSocket::from_std(socket.into()).map_err(|error| BridgeError::Bind {
        address: address.to_string(),
        error,
    })
}
