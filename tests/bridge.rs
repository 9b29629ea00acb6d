//! `kips bridge -L` ↔ `kips relay` ↔ `kips bridge -T`, as real processes on loopback: TCP
//! with half-close, UDP across a listener restart, names, IPv6, and the faults (wrong key,
//! relay down, relay restarted, no listener, readiness).

#[path = "support/bridge.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A connection reset (seen on read, or on a write that raced it).
fn is_reset(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_carries_a_mebibyte_each_way_with_half_close() -> Result<()> {
    let dir = temp_dir("bridge-tcp-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let server = reply_after_eof_server().await;
    let listen = free_port();
    let remote = Bridge::start("remote", &relay, &["-T", &format!("api:big/{server}")])?;
    let local_bridge = Bridge::start(
        "local",
        &relay,
        &["-L", &format!("127.0.0.1:{listen}/big:api")],
    )?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    local_bridge.wait_ready(Duration::from_secs(15)).await?;

    // The server answers only after the request's end: the reply proves the half-close
    // went through and the other direction stayed open.
    let mut transfers = Vec::new();
    for seed in 0..3u64 {
        transfers.push(tokio::spawn(async move {
            let request = pattern(1024 * 1024, seed);
            let reply = exchange(local(listen), &request).await?;
            let expected: Vec<u8> = request.iter().map(|b| b ^ 0x5a).collect();
            Ok::<bool, std::io::Error>(reply == expected)
        }));
    }
    for transfer in transfers {
        assert!(
            transfer.await??,
            "a reply differs from the request's transform"
        );
    }
    let (_, metrics) = local_bridge.get("/metrics").await?;
    let sent = metric(
        &metrics,
        "kips_bridge_payload_bytes_total",
        &["direction=\"to_relay\"", "binding=\"big\""],
    );
    assert_eq!(sent, Some(3.0 * 1024.0 * 1024.0), "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "kips_bridge_listener_present",
            &["binding=\"big\""]
        ),
        Some(1.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_route_to_their_targets_and_unknown_names_are_refused() -> Result<()> {
    let dir = temp_dir("bridge-names-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let (a, b) = (tag_server("server a").await, tag_server("server b").await);
    let ports = [free_port(), free_port(), free_port()];
    let remote = Bridge::start("remote", &relay, &["-T", &format!("api:a/{a};b/{b}")])?;
    let local_bridge = Bridge::start(
        "local",
        &relay,
        &[
            "-L",
            &format!(
                "127.0.0.1:{}/b;127.0.0.1:{}/a;127.0.0.1:{}/nobody:api",
                ports[0], ports[1], ports[2]
            ),
        ],
    )?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    local_bridge.wait_ready(Duration::from_secs(15)).await?;
    assert_eq!(exchange(local(ports[0]), b"").await?, b"server b");
    assert_eq!(exchange(local(ports[1]), b"").await?, b"server a");
    // azbridge's listener closes without a word on an unknown name; the client is reset.
    let refused = exchange(local(ports[2]), b"hello").await;
    assert!(matches!(&refused, Err(e) if is_reset(e)), "{refused:?}");
    let (_, metrics) = remote.get("/metrics").await?;
    assert_eq!(
        metric(
            &metrics,
            "kips_bridge_failures_total",
            &["reason=\"unknown_port_name\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    let (_, metrics) = local_bridge.get("/metrics").await?;
    assert_eq!(
        metric(
            &metrics,
            "kips_bridge_failures_total",
            &["binding=\"nobody\"", "reason=\"unknown_port_name\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_and_ipv4_clients_reach_a_dual_stack_binding() -> Result<()> {
    let dir = temp_dir("bridge-v6-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let server = echo_server().await;
    let listen = free_port();
    let remote = Bridge::start("remote", &relay, &["-T", &format!("api:echo/{server}")])?;
    let local_bridge = Bridge::start("local", &relay, &["-L", &format!("[::]:{listen}/echo:api")])?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    local_bridge.wait_ready(Duration::from_secs(15)).await?;
    let v6: SocketAddr = format!("[::1]:{listen}").parse()?;
    assert_eq!(exchange(v6, b"over IPv6").await?, b"over IPv6");
    assert_eq!(exchange(local(listen), b"over IPv4").await?, b"over IPv4");
    Ok(())
}

/// Sends `count` numbered datagrams (at most `window` in flight) and returns how many
/// distinct ones came back.
async fn udp_round(
    socket: &UdpSocket,
    target: SocketAddr,
    first: u32,
    count: u32,
    window: u32,
) -> Result<usize> {
    let mut received = std::collections::BTreeSet::new();
    let mut buffer = [0u8; 2048];
    let mut next = first;
    while next < first + count {
        let end = (next + window).min(first + count);
        for n in next..end {
            let mut datagram = n.to_be_bytes().to_vec();
            datagram.extend(pattern(200, u64::from(n)));
            socket.send_to(&datagram, target).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while (next..end).any(|n| !received.contains(&n)) && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(200), socket.recv_from(&mut buffer))
                .await
            {
                Ok(Ok((len, _))) if len == 204 => {
                    let n = u32::from_be_bytes(buffer[..4].try_into()?);
                    assert_eq!(
                        &buffer[4..len],
                        &pattern(200, u64::from(n))[..],
                        "datagram {n} changed"
                    );
                    received.insert(n);
                }
                _ => {}
            }
        }
        next = end;
    }
    Ok(received.range(first..first + count).count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_keeps_working_across_a_listener_restart() -> Result<()> {
    let dir = temp_dir("bridge-udp-");
    let relay = Relay::start(dir.path(), &["dns"], &[]).await?;
    let echo = udp_echo_server().await;
    let listen = free_port();
    let remote_args = ["-T".to_owned(), format!("dns:dns/{echo}U")];
    let remote_args: Vec<&str> = remote_args.iter().map(String::as_str).collect();
    let mut remote = Bridge::start("remote", &relay, &remote_args)?;
    let local_bridge = Bridge::start(
        "local",
        &relay,
        &["-L", &format!("127.0.0.1:{listen}U/dns:dns")],
    )?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    local_bridge.wait_ready(Duration::from_secs(15)).await?;
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    let target = local(listen);
    assert_eq!(udp_round(&client, target, 0, 1000, 50).await?, 1000);

    // The listener goes away; the route it served dies with it.
    remote.process.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // While no listener is online, datagrams are dropped, and the binding stays up.
    let lost = udp_round(&client, target, 5000, 10, 10).await?;
    assert_eq!(lost, 0);
    remote = Bridge::start("remote-again", &relay, &remote_args)?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    // From the same source address: the -L side opens a new hybrid connection.
    let start = Instant::now();
    let mut buffer = [0u8; 64];
    let through = loop {
        client.send_to(b"probe", target).await?;
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buffer)).await
            && &buffer[..n] == b"probe"
        {
            break true;
        }
        if start.elapsed() > Duration::from_secs(5) {
            break false;
        }
    };
    assert!(
        through,
        "no datagram through within 5 s of the listener's return"
    );
    assert_eq!(udp_round(&client, target, 10_000, 1000, 50).await?, 1000);
    let (_, metrics) = local_bridge.get("/metrics").await?;
    let routes = metric(
        &metrics,
        "kips_bridge_connections_total",
        &["binding=\"dns\"", "side=\"local\""],
    );
    assert!(
        routes.is_some_and(|r| r >= 2.0),
        "a second route after the restart: {metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_stops_either_side_naming_401() -> Result<()> {
    let dir = temp_dir("bridge-401-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let wrong = relay.connection_string_with(KEY_NAME, "d3Jvbmcta2V5");
    let listen = format!("127.0.0.1:{}/x:api", free_port());
    for (name, args) in [
        ("remote", ["-T", "api:8080"]),
        ("local", ["-L", listen.as_str()]),
    ] {
        let started = Instant::now();
        let mut bridge = Bridge::start_with(name, &relay, &wrong, &args)?;
        let status = bridge.process.exited_within(Duration::from_secs(5)).await;
        let log = bridge.log_text();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(3),
            "{name} within 5 s: {log}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            log.contains("refused the credentials") && log.contains("401"),
            "{log}"
        );
        assert!(!log.contains("d3Jvbmcta2V5"), "the key is logged: {log}");
    }
    // A key that lacks the right: 403, the same exit.
    let send_only = Relay::start(
        &dir.path().join("send-only"),
        &["api"],
        &["api/sender=c2VuZGVy:send"],
    )
    .await?;
    let mut bridge = Bridge::start_with(
        "listener-without-listen",
        &send_only,
        &send_only.connection_string_with("sender", "c2VuZGVy"),
        &["-T", "api:8080"],
    )?;
    assert_eq!(
        bridge
            .process
            .exited_within(Duration::from_secs(5))
            .await
            .and_then(|s| s.code()),
        Some(3)
    );
    assert!(bridge.log_text().contains("403"), "{}", bridge.log_text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_hybrid_connection_stops_either_side() -> Result<()> {
    let dir = temp_dir("bridge-404-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let listen = format!("127.0.0.1:{}/x:nosuch", free_port());
    for (name, args) in [
        ("remote", ["-T", "nosuch:8080"]),
        ("local", ["-L", listen.as_str()]),
    ] {
        let mut bridge = Bridge::start(name, &relay, &args)?;
        let status = bridge.process.exited_within(Duration::from_secs(5)).await;
        let log = bridge.log_text();
        assert_eq!(status.and_then(|s| s.code()), Some(4), "{name}: {log}");
        assert!(log.contains("does not exist"), "{log}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_down_at_start_is_retried_until_it_comes_up() -> Result<()> {
    let dir = temp_dir("bridge-late-");
    let mut relay = Relay::prepare(dir.path(), free_port(), &["api"], &[]);
    // The CA must exist for the bridges to trust; make it with a first run.
    relay.restart().await?;
    relay.stop();
    let server = echo_server().await;
    let listen = free_port();
    let remote = Bridge::start("remote", &relay, &["-T", &format!("api:echo/{server}")])?;
    let mut local_bridge = Bridge::start(
        "local",
        &relay,
        &["-L", &format!("127.0.0.1:{listen}/echo:api")],
    )?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(remote.get("/readyz").await?.0, 503);
    assert_eq!(local_bridge.get("/readyz").await?.0, 503);
    assert!(
        local_bridge.process.is_running(),
        "a relay that is down is not fatal"
    );
    relay.restart().await?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    local_bridge.wait_ready(Duration::from_secs(15)).await?;
    assert_eq!(exchange(local(listen), b"late").await?, b"late");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_relay_restart_new_connections_succeed_within_ten_seconds() -> Result<()> {
    let dir = temp_dir("bridge-restart-");
    let mut relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let server = echo_server().await;
    let listen = free_port();
    let remote = Bridge::start("remote", &relay, &["-T", &format!("api:echo/{server}")])?;
    let local_bridge = Bridge::start(
        "local",
        &relay,
        &["-L", &format!("127.0.0.1:{listen}/echo:api")],
    )?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    local_bridge.wait_ready(Duration::from_secs(15)).await?;
    // A stream in the middle of its life when the relay goes.
    let mut stream = TcpStream::connect(local(listen)).await?;
    stream.write_all(b"before").await?;
    let mut buffer = [0u8; 6];
    stream.read_exact(&mut buffer).await?;
    relay.restart().await?;
    let restarted = Instant::now();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the broken stream must end, not hang");
    let reconnected = eventually(
        "a new connection through the restarted relay",
        Duration::from_secs(10),
        || async { (exchange(local(listen), b"after").await.ok()? == b"after").then_some(()) },
    )
    .await;
    assert!(reconnected.is_ok(), "{reconnected:?}");
    assert!(restarted.elapsed() < Duration::from_secs(10));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_listener_the_client_is_reset_at_once() -> Result<()> {
    let dir = temp_dir("bridge-nolistener-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let listen = free_port();
    let local_bridge = Bridge::start(
        "local",
        &relay,
        &["-L", &format!("127.0.0.1:{listen}/http:api")],
    )?;
    // Ready: the credentials and the hybrid connection were accepted, no listener needed.
    local_bridge.wait_ready(Duration::from_secs(15)).await?;
    for _ in 0..3 {
        let started = Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            exchange(local(listen), b"GET / HTTP/1.0\r\n\r\n"),
        )
        .await;
        let error = result
            .expect("a reset, not a hang")
            .expect_err("no listener: no answer");
        assert!(is_reset(&error), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    let (_, metrics) = local_bridge.get("/metrics").await?;
    assert_eq!(
        metric(
            &metrics,
            "kips_bridge_listener_present",
            &["binding=\"http\""]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "kips_bridge_failures_total",
            &["reason=\"no_listener\""]
        ),
        Some(3.0),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_port_says_not_ready_while_the_listener_is_offline() -> Result<()> {
    let dir = temp_dir("bridge-health-");
    let mut relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let remote = Bridge::start("remote", &relay, &["-T", "api:8080", "-T", "api:9090"])?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    assert_eq!(remote.get("/livez").await?, (200, "ok\n".into()));
    let (_, metrics) = remote.get("/metrics").await?;
    assert_eq!(
        metric(&metrics, "kips_bridge_listener_online", &["listener=\"2\""]),
        Some(1.0),
        "{metrics}"
    );
    relay.stop();
    // Each listener notices on its own control channel (a few ms apart): not ready at the
    // first, and then both named.
    let (status, body) = eventually("not ready", Duration::from_secs(5), || async {
        remote.get("/readyz").await.ok().filter(|(s, _)| *s == 503)
    })
    .await?;
    assert_eq!(status, 503);
    assert!(body.contains(") offline"), "{body}");
    let body = eventually(
        "both listeners named offline",
        Duration::from_secs(5),
        || async {
            remote
                .get("/readyz")
                .await
                .ok()
                .filter(|(s, b)| {
                    *s == 503 && b.contains("(-T #1) offline") && b.contains("(-T #2) offline")
                })
                .map(|(_, b)| b)
        },
    )
    .await?;
    assert!(body.contains("listener api (-T #1) offline"), "{body}");
    assert_eq!(remote.get("/livez").await?.0, 200);
    relay.restart().await?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    // No probe opened a relay connection: the relay saw only the two listeners.
    assert!(
        !relay.log_text().contains("connected"),
        "{}",
        relay.log_text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_tokens_are_renewed_before_the_relay_expires_them() -> Result<()> {
    let dir = temp_dir("bridge-renew-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let server = echo_server().await;
    let remote = Bridge::start(
        "remote",
        &relay,
        &["--token-lifetime=3s", "-T", &format!("api:echo/{server}")],
    )?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            remote.get("/readyz").await?.0,
            200,
            "offline at {:?}",
            watched.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = relay.log_text();
    assert!(log.matches("token renewed").count() >= 2, "{log}");
    assert!(!log.contains("listener offline"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_listeners_share_one_hybrid_connection() -> Result<()> {
    let dir = temp_dir("bridge-balance-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let (a, b) = (tag_server("a").await, tag_server("b").await);
    let listen = free_port();
    let first = Bridge::start("remote-a", &relay, &["-T", &format!("api:web/{a}")])?;
    let second = Bridge::start("remote-b", &relay, &["-T", &format!("api:web/{b}")])?;
    let local_bridge = Bridge::start(
        "local",
        &relay,
        &["-L", &format!("127.0.0.1:{listen}/web:api")],
    )?;
    for bridge in [&first, &second, &local_bridge] {
        bridge.wait_ready(Duration::from_secs(15)).await?;
    }
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let reply = exchange(local(listen), b"").await?;
        *seen.entry(String::from_utf8(reply)?).or_insert(0) += 1;
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["a", "b"], "{seen:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_command_lines_exit_2_naming_the_problem() -> Result<()> {
    let dir = temp_dir("bridge-usage-");
    let run = |args: &[&str]| {
        std::process::Command::new(KIPS)
            .arg("bridge")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("running kips bridge")
    };
    let ok_string = "Endpoint=sb://localhost:1/;SharedAccessKeyName=a;SharedAccessKey=b";
    for (args, expected) in [
        (
            vec!["-x", ok_string, "-L", "0.0.0.0:80x/http:api"],
            vec![
                "0.0.0.0:80x/http:api",
                "\"80x\"",
                "[address:]port[U][/name]",
            ],
        ),
        (
            vec!["-x", ok_string, "-T", "api:http/8080;http/9090"],
            vec!["a port name used twice", "relay:[name/][host:]port[U]"],
        ),
        (
            vec![
                "-x",
                "Endpoint=sb://ns.servicebus.windows.net/",
                "-T",
                "api:8080",
            ],
            vec!["Entra ID", "not supported"],
        ),
        (vec!["-T", "api:8080"], vec!["no connection string"]),
        (vec!["-x", ok_string], vec!["nothing to forward"]),
        (
            vec![
                "-x",
                "Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=b;EntityPath=db",
                "-T",
                "api:8080",
            ],
            vec!["EntityPath", "\"api\""],
        ),
        (
            vec!["-x", ok_string, "-f", "missing.yml"],
            vec!["-f missing.yml"],
        ),
    ] {
        let output = run(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        for part in expected {
            assert!(
                stderr.contains(part),
                "{args:?}: {part:?} missing from: {stderr}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_and_the_ca_from_the_environment_work_like_flags() -> Result<()> {
    let dir = temp_dir("bridge-file-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let server = echo_server().await;
    let listen = free_port();
    let file = dir.path().join("bridge.yml");
    std::fs::write(
        &file,
        format!(
            "AzureRelayConnectionString: \"{}\\n\"\nLocalForward:\n  - RelayName: api\n    BindAddress: 127.0.0.1\n    BindPort: {listen}\n    PortName: echo\nRemoteForward:\n  - RelayName: api\n    Host: 127.0.0.1\n    HostPort: {}\n    PortName: echo\nLogLevel: INFO\n",
            relay.connection_string(),
            server.port()
        ),
    )?;
    let health = free_port();
    let ca = std::fs::read_to_string(relay.ca())?;
    let process = Process::spawn(
        "from-file",
        KIPS,
        &[
            "bridge".into(),
            "-f".into(),
            file.display().to_string(),
            format!("--health-listen=127.0.0.1:{health}"),
        ],
        &[("KIPS_RELAY_CA", ca)],
        dir.path(),
    )?;
    let bridge = Bridge { process, health };
    bridge.wait_ready(Duration::from_secs(15)).await?;
    assert_eq!(
        exchange(local(listen), b"from a file").await?,
        b"from a file"
    );
    assert!(
        bridge.log_text().contains("trailing whitespace"),
        "{}",
        bridge.log_text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_stops_answering_is_noticed_by_the_keepalive() -> Result<()> {
    let dir = temp_dir("bridge-keepalive-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let remote = Bridge::start("remote", &relay, &["-a", "1", "-T", "api:8080"])?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    // Frozen, the relay keeps its sockets open but answers no ping.
    let pid = relay.pid().expect("the relay runs") as libc::pid_t;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let noticed = eventually("the listener offline", Duration::from_secs(6), || async {
        remote.get("/readyz").await.ok().filter(|(s, _)| *s == 503)
    })
    .await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    noticed?;
    assert!(
        remote.log_text().contains("no answer to pings"),
        "{}",
        remote.log_text()
    );
    remote.wait_ready(Duration::from_secs(20)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_pressure_holds_a_fast_sender_without_buffering_in_the_bridges() -> Result<()> {
    let dir = temp_dir("bridge-pressure-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    // A target that reads nothing until told to, then counts to the end.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let target = listener.local_addr()?;
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let counted = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        let _ = wait.await;
        let mut total = 0usize;
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            match stream.read(&mut buffer).await? {
                0 => return Ok::<usize, std::io::Error>(total),
                n => total += n,
            }
        }
    });
    let listen = free_port();
    let remote = Bridge::start("remote", &relay, &["-T", &format!("api:slow/{target}")])?;
    let local_bridge = Bridge::start(
        "local",
        &relay,
        &["-L", &format!("127.0.0.1:{listen}/slow:api")],
    )?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    local_bridge.wait_ready(Duration::from_secs(15)).await?;
    const TOTAL: usize = 128 * 1024 * 1024;
    let mut stream = TcpStream::connect(local(listen)).await?;
    let chunk = vec![7u8; 1024 * 1024];
    let mut written = 0;
    // `write`, not `write_all`: the count stays exact when the timeout cuts a write short.
    let stalled = tokio::time::timeout(Duration::from_secs(3), async {
        while written < TOTAL {
            let end = (TOTAL - written).min(chunk.len());
            written += stream.write(&chunk[..end]).await?;
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    assert!(
        stalled.is_err(),
        "128 MiB went into a target that reads nothing: nothing held the sender back"
    );
    assert!(written < TOTAL / 2, "{written} bytes buffered on the way");
    let rss = |bridge: &Bridge| -> f64 {
        let pid = bridge.process.pid().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(f64::MAX, |kib| kib / 1024.0)
    };
    assert!(
        rss(&local_bridge) < 64.0 && rss(&remote) < 64.0,
        "the bridges buffered: {} / {} MiB",
        rss(&local_bridge),
        rss(&remote)
    );
    let _ = go.send(());
    while written < TOTAL {
        let end = (TOTAL - written).min(chunk.len());
        written += stream.write(&chunk[..end]).await?;
    }
    stream.shutdown().await?;
    let total = tokio::time::timeout(Duration::from_secs(60), counted).await???;
    assert_eq!(total, TOTAL);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_udp_routes_expire_and_the_next_datagram_opens_a_new_one() -> Result<()> {
    let dir = temp_dir("bridge-udp-idle-");
    let relay = Relay::start(dir.path(), &["dns"], &[]).await?;
    let echo = udp_echo_server().await;
    let listen = free_port();
    let remote = Bridge::start(
        "remote",
        &relay,
        &["--udp-idle=1s", "-T", &format!("dns:dns/{echo}U")],
    )?;
    let local_bridge = Bridge::start(
        "local",
        &relay,
        &[
            "--udp-idle=1s",
            "-L",
            &format!("127.0.0.1:{listen}U/dns:dns"),
        ],
    )?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    local_bridge.wait_ready(Duration::from_secs(15)).await?;
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    assert_eq!(udp_round(&client, local(listen), 0, 5, 5).await?, 5);
    let active = |text: &str| {
        metric(
            text,
            "kips_bridge_active_connections",
            &["binding=\"dns\"", "side=\"local\""],
        )
    };
    let (_, metrics) = local_bridge.get("/metrics").await?;
    assert_eq!(active(&metrics), Some(1.0), "{metrics}");
    eventually("the idle route closed", Duration::from_secs(10), || async {
        let (_, metrics) = local_bridge.get("/metrics").await.ok()?;
        (active(&metrics) == Some(0.0)).then_some(())
    })
    .await?;
    assert_eq!(udp_round(&client, local(listen), 5, 5, 5).await?, 5);
    let (_, metrics) = local_bridge.get("/metrics").await?;
    assert_eq!(
        metric(
            &metrics,
            "kips_bridge_connections_total",
            &["binding=\"dns\"", "side=\"local\""]
        ),
        Some(2.0),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hybrid_connection_takes_25_listeners_and_refuses_the_26th() -> Result<()> {
    let dir = temp_dir("bridge-25-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let expressions: Vec<String> = (0..25)
        .flat_map(|_| ["-T".to_owned(), "api:8080".to_owned()])
        .collect();
    let expressions: Vec<&str> = expressions.iter().map(String::as_str).collect();
    let full = Bridge::start("twenty-five", &relay, &expressions)?;
    full.wait_ready(Duration::from_secs(20)).await?;
    let mut one_more = Bridge::start("twenty-sixth", &relay, &["-T", "api:8080"])?;
    let status = one_more
        .process
        .exited_within(Duration::from_secs(10))
        .await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(3),
        "{}",
        one_more.log_text()
    );
    assert!(
        one_more.log_text().contains("QuotaExceeded"),
        "{}",
        one_more.log_text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_bridge_with_status_0_and_closes_its_listeners() -> Result<()> {
    let dir = temp_dir("bridge-sigterm-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let mut remote = Bridge::start("remote", &relay, &["-T", "api:8080"])?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    remote.process.signal(libc::SIGTERM);
    let status = remote.process.exited_within(Duration::from_secs(5)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        remote.log_text()
    );
    // The control channel was closed, not dropped: the relay lets the listener go at once.
    eventually(
        "the relay sees the listener go",
        Duration::from_secs(2),
        || async { relay.log_text().contains("listener offline").then_some(()) },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_made_signature_works_until_it_expires_then_the_listener_stops() -> Result<()> {
    use kips::bridge::Secret;
    use kips::bridge::connection_string::Endpoint;
    use kips::bridge::sas;
    let dir = temp_dir("bridge-signature-");
    let relay = Relay::start(dir.path(), &["api"], &[]).await?;
    let endpoint = Endpoint {
        host: "localhost".into(),
        port: Some(relay.port),
    };
    let expiry = sas::unix_now() + 4;
    let token = sas::sign(
        &sas::resource_uri(&endpoint, "api"),
        KEY_NAME,
        &Secret::new(KEY),
        expiry,
    );
    let connection_string = format!(
        "Endpoint=sb://localhost:{}/;SharedAccessSignature={token}",
        relay.port
    );
    let server = echo_server().await;
    let listen = free_port();
    let mut remote = Bridge::start_with(
        "remote",
        &relay,
        &connection_string,
        &["-T", &format!("api:echo/{server}")],
    )?;
    let local_bridge = Bridge::start_with(
        "local",
        &relay,
        &connection_string,
        &["-L", &format!("127.0.0.1:{listen}/echo:api")],
    )?;
    remote.wait_ready(Duration::from_secs(15)).await?;
    local_bridge.wait_ready(Duration::from_secs(15)).await?;
    assert_eq!(exchange(local(listen), b"signed").await?, b"signed");
    // A signature cannot be renewed: at its expiry the relay closes the control channel,
    // the reconnect is refused, and the listener stops naming the refusal.
    let status = remote.process.exited_within(Duration::from_secs(15)).await;
    let log = remote.log_text();
    assert_eq!(status.and_then(|s| s.code()), Some(3), "{log}");
    assert!(log.contains("401") && log.contains("ExpiredToken"), "{log}");
    assert!(!log.contains(&token), "the token is logged: {log}");
    Ok(())
}
