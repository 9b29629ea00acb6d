//! `kips init-net` in real network namespaces: a pod-like namespace and a client namespace
//! joined by a veth pair, an app and a sidecar stand-in listening in the pod, and the real
//! `kips` binary run there under `ip netns exec`.
//!
//! Needs root, `ip` (iproute2) and iptables with both backends; installs nothing. Without
//! CI=true the tests skip when not root; with it they fail. Every namespace is named
//! `kips-t-<pid>-<test>-...` and removed on drop (its veth and iptables rules go with it);
//! the veth ends are created inside the namespaces, never in the host's. Namespaces of
//! earlier runs whose process is gone are removed first. Only addresses inside these
//! namespaces are used.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

const KIPS: &str = env!("CARGO_BIN_EXE_kips");
const PREFIX: &str = "kips-t-";

const APP_PORT: u16 = 8080;
const TCP_LISTEN: u16 = 15100;
const UDP_LISTEN: u16 = 15101;

/// The pod's side of the veth, and on the client's side: a client, the node (passed as
/// --node-ips) and the pod's default gateway, each with its own address.
const POD: [&str; 2] = ["10.250.0.2", "fd6b:6970:7300::2"];
const CLIENT: [&str; 2] = ["10.250.0.1", "fd6b:6970:7300::1"];
const NODE: [&str; 2] = ["10.250.0.3", "fd6b:6970:7300::3"];
const GATEWAY: [&str; 2] = ["10.250.0.4", "fd6b:6970:7300::4"];

fn ip(address: &str) -> IpAddr {
    address.parse().unwrap()
}

/// True when the tests can run; false (after saying why) when they may skip.
fn ready() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the init-net netns tests need root (network namespaces, veth, iptables); CI=true does not allow skipping them"
        );
        eprintln!(
            "skipping: the init-net netns tests need root (network namespaces, veth, iptables)"
        );
        return false;
    }
    remove_stale_namespaces();
    true
}

/// Removes namespaces left by test processes that crashed (their pid is gone).
fn remove_stale_namespaces() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let list = run_ok("ip", &["netns", "list"]);
        for name in String::from_utf8_lossy(&list.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
        {
            let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    });
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (the tests need iproute2 and iptables)")
        })
}

fn run_ok(program: &str, args: &[&str]) -> Output {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A network namespace, deleted on drop with everything in it.
struct Netns(String);

impl Netns {
    fn create(test: &str, role: &str) -> Netns {
        let name = format!("{PREFIX}{}-{test}-{role}", std::process::id());
        run_ok("ip", &["netns", "add", &name]);
        let netns = Netns(name);
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.0];
        full.extend_from_slice(args);
        run_ok("ip", &full);
    }

    fn exec(&self, command: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.0];
        full.extend_from_slice(command);
        run("ip", &full)
    }

    /// The lines of `<iptables|ip6tables>-<backend>-save -t nat` that concern kips.
    fn kips_rules(&self, command: &str, backend: &str) -> Vec<String> {
        let output = self.exec(&[&format!("{command}-{backend}-save"), "-t", "nat"]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|l| l.contains("KIPS"))
            .map(str::to_owned)
            .collect()
    }

    /// Runs `work` on a thread that has entered this namespace; sockets it creates stay there.
    fn enter<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        let handle = thread::spawn(move || {
            let netns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns changes only this thread's network namespace; the thread ends
            // with `work`.
            let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            work()
        });
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A pod namespace and a client namespace joined by a veth pair (`eth0` on both sides).
struct Lab {
    pod: Netns,
    client: Netns,
}

impl Lab {
    fn new(test: &str) -> Lab {
        let lab = Lab {
            pod: Netns::create(test, "pod"),
            client: Netns::create(test, "client"),
        };
        lab.pod.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &lab.client.0,
        ]);
        for (netns, addresses) in [
            (&lab.pod, &[POD][..]),
            (&lab.client, &[CLIENT, NODE, GATEWAY][..]),
        ] {
            for [v4, v6] in addresses {
                netns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
                netns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
            }
            netns.ip(&["link", "set", "eth0", "up"]);
        }
        lab.pod.ip(&["route", "add", "default", "via", GATEWAY[0]]);
        lab.pod
            .ip(&["-6", "route", "add", "default", "via", GATEWAY[1]]);
        lab
    }

    /// Runs the real `kips init-net` in the pod namespace.
    fn init_net(&self, extra: &[&str]) -> Output {
        let node_ips = format!("--node-ips={},{}", NODE[0], NODE[1]);
        let tcp = format!("{APP_PORT}/tcp={TCP_LISTEN}");
        let udp = format!("{APP_PORT}/udp={UDP_LISTEN}");
        let mut command = vec![
            KIPS,
            "init-net",
            "--redirect",
            &tcp,
            "--redirect",
            &udp,
            &node_ips,
        ];
        command.extend_from_slice(extra);
        self.pod.exec(&command)
    }
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "kips init-net failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Listeners that answer every TCP connection and UDP datagram with their name.
struct Listeners {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Listeners {
    /// The app on 8080 and the sidecar stand-in on its listen ports, TCP and UDP, dual-stack.
    fn start(pod: &Netns) -> Listeners {
        Self::start_with(pod, "::")
    }

    /// The same, with the sidecar bound to `sidecar_address` (`0.0.0.0`: IPv4 only, as
    /// azbridge binds).
    fn start_with(pod: &Netns, sidecar_address: &'static str) -> Listeners {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (port, name) in [(APP_PORT, "app"), (TCP_LISTEN, "sidecar")] {
            let address = if name == "app" { "::" } else { sidecar_address };
            let listener = pod.enter(move || TcpListener::bind((address, port)).unwrap());
            listener.set_nonblocking(true).unwrap();
            let stop = stop.clone();
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.write_all(name.as_bytes());
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("{name} tcp/{port}: {e}"),
                    }
                }
            }));
        }
        for (port, name) in [(APP_PORT, "app"), (UDP_LISTEN, "sidecar")] {
            let address = if name == "app" { "::" } else { sidecar_address };
            let socket = pod.enter(move || UdpSocket::bind((address, port)).unwrap());
            socket
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let stop = stop.clone();
            threads.push(thread::spawn(move || {
                let mut buffer = [0; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = socket.recv_from(&mut buffer) {
                        let _ = socket.send_to(name.as_bytes(), peer);
                    }
                }
            }));
        }
        Listeners { stop, threads }
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    Tcp,
    Udp,
}

/// Who answers `to` when asked from namespace `netns`, with source address `from`.
fn who_answers(netns: &Netns, proto: Proto, from: Option<&str>, to: &str) -> String {
    let to = SocketAddr::new(ip(to), APP_PORT);
    let from = from.map(|f| SocketAddr::new(ip(f), 0));
    let timeout = Duration::from_secs(3);
    let answer = netns.enter(move || -> std::io::Result<String> {
        let socket = match proto {
            Proto::Tcp => Socket::new(Domain::for_address(to), Type::STREAM, None)?,
            Proto::Udp => Socket::new(Domain::for_address(to), Type::DGRAM, None)?,
        };
        if let Some(from) = from {
            socket.bind(&from.into())?;
        }
        socket.set_read_timeout(Some(timeout))?;
        let mut answer = String::new();
        match proto {
            Proto::Tcp => {
                socket.connect_timeout(&to.into(), timeout)?;
                std::net::TcpStream::from(socket).read_to_string(&mut answer)?;
            }
            Proto::Udp => {
                let socket = UdpSocket::from(socket);
                socket.connect(to)?;
                socket.send(b"who")?;
                let mut buffer = [0; 64];
                let n = socket.recv(&mut buffer)?;
                answer.push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        }
        Ok(answer)
    });
    answer.unwrap_or_else(|e| panic!("{proto:?} {from:?} -> {to}: {e}"))
}

/// The rules kips must leave in one family's nat table, as iptables-save prints them.
fn expected_rules(family: usize) -> Vec<String> {
    let host = if family == 0 { 32 } else { 128 };
    vec![
        ":KIPS_INBOUND - [0:0]".into(),
        "-A PREROUTING -j KIPS_INBOUND".into(),
        format!("-A KIPS_INBOUND -s {}/{host} -j RETURN", NODE[family]),
        format!("-A KIPS_INBOUND -s {}/{host} -j RETURN", GATEWAY[family]),
        format!(
            "-A KIPS_INBOUND -p tcp -m tcp --dport {APP_PORT} -j REDIRECT --to-ports {TCP_LISTEN}"
        ),
        format!(
            "-A KIPS_INBOUND -p udp -m udp --dport {APP_PORT} -j REDIRECT --to-ports {UDP_LISTEN}"
        ),
    ]
}

/// The whole story in one backend.
fn redirects_inbound_traffic_only(backend: &str) {
    if !ready() {
        return;
    }
    let lab = Lab::new(backend);
    let _listeners = Listeners::start(&lab.pod);
    let protos = [Proto::Tcp, Proto::Udp];
    for proto in protos {
        for family in 0..2 {
            assert_eq!(
                who_answers(&lab.client, proto, Some(CLIENT[family]), POD[family]),
                "app",
                "before kips init-net"
            );
        }
    }

    let first = lab.init_net(&["--backend", backend]);
    assert_success(&first);
    assert!(
        String::from_utf8_lossy(&first.stdout)
            .contains(&format!("applied with iptables-{backend}-restore"))
    );

    for proto in protos {
        for family in 0..2 {
            let pod = POD[family];
            assert_eq!(
                who_answers(&lab.client, proto, Some(CLIENT[family]), pod),
                "sidecar",
                "{proto:?} client -> {pod}"
            );
            assert_eq!(
                who_answers(&lab.client, proto, Some(NODE[family]), pod),
                "app",
                "{proto:?} node (kubelet) -> {pod}"
            );
            assert_eq!(
                who_answers(&lab.client, proto, Some(GATEWAY[family]), pod),
                "app",
                "{proto:?} gateway -> {pod}"
            );
            let loopback = ["127.0.0.1", "::1"][family];
            for own in [loopback, pod] {
                assert_eq!(
                    who_answers(&lab.pod, proto, None, own),
                    "app",
                    "{proto:?} pod -> {own} (its own traffic)"
                );
            }
        }
    }

    // The init container may run again (pod restart): still one set of rules.
    assert_success(&lab.init_net(&["--backend", backend]));
    let other = if backend == "nft" { "legacy" } else { "nft" };
    for (family, command) in ["iptables", "ip6tables"].into_iter().enumerate() {
        assert_eq!(
            lab.pod.kips_rules(command, backend),
            expected_rules(family),
            "{command}-{backend}"
        );
        assert!(
            lab.pod.kips_rules(command, other).is_empty(),
            "{command}-{other} must stay untouched"
        );
    }
    assert_eq!(
        who_answers(&lab.client, Proto::Tcp, Some(CLIENT[0]), POD[0]),
        "sidecar",
        "after the rerun"
    );
}

/// What a TCP client gets: the answer, or the error's kind (a reset shows as refused).
fn tcp_outcome(netns: &Netns, from: &'static str, to: &'static str) -> Result<String, ErrorKind> {
    netns.enter(move || {
        let to = SocketAddr::new(ip(to), APP_PORT);
        let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::new(ip(from), 0).into()).unwrap();
        socket
            .connect_timeout(&to.into(), Duration::from_secs(3))
            .map_err(|e| e.kind())?;
        let mut answer = String::new();
        std::net::TcpStream::from(socket)
            .read_to_string(&mut answer)
            .map_err(|e| e.kind())?;
        Ok(answer)
    })
}

#[test]
fn with_an_ipv4_only_bridge_ipv6_keeps_reaching_the_app() {
    if !ready() {
        return;
    }
    // azbridge binds 0.0.0.0 only: a redirect of IPv6 to its port leads nowhere.
    let lab = Lab::new("v4bridge");
    let _listeners = Listeners::start_with(&lab.pod, "0.0.0.0");
    assert_success(&lab.init_net(&["--backend", "nft"]));
    assert_eq!(
        tcp_outcome(&lab.client, CLIENT[1], POD[1]),
        Err(ErrorKind::ConnectionRefused),
        "IPv6 redirected to a port nothing listens on"
    );

    // With --ipv6=false (what the webhook renders for azbridge): IPv4 still goes to the
    // sidecar, IPv6 reaches the app, and no ip6tables rule is written.
    let lab = Lab::new("v4only");
    let _listeners = Listeners::start_with(&lab.pod, "0.0.0.0");
    let output = lab.init_net(&["--backend", "nft", "--ipv6=false"]);
    assert_success(&output);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no IPv6 rules (--ipv6=false"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        tcp_outcome(&lab.client, CLIENT[0], POD[0]),
        Ok("sidecar".to_owned())
    );
    assert_eq!(
        tcp_outcome(&lab.client, CLIENT[1], POD[1]),
        Ok("app".to_owned())
    );
    assert_eq!(
        who_answers(&lab.client, Proto::Udp, Some(CLIENT[1]), POD[1]),
        "app"
    );
    assert!(lab.pod.kips_rules("ip6tables", "nft").is_empty());
    assert_eq!(lab.pod.kips_rules("iptables", "nft"), expected_rules(0));
}

#[test]
fn nft_backend_redirects_inbound_traffic_only() {
    redirects_inbound_traffic_only("nft");
}

#[test]
fn legacy_backend_redirects_inbound_traffic_only() {
    redirects_inbound_traffic_only("legacy");
}

#[test]
fn auto_backend_follows_another_mesh_and_goes_first() {
    if !ready() {
        return;
    }
    // No rules anywhere: nft.
    let empty = Netns::create("auto", "empty");
    let output = empty.exec(&[KIPS, "init-net", "--redirect", "8080/tcp=15100"]);
    assert_success(&output);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("iptables backend nft (no rules here yet")
    );
    assert_eq!(empty.kips_rules("iptables", "nft").len(), 3);

    // Another mesh captured all inbound TCP with legacy rules: kips follows it, keeps its
    // rules, and its own jump comes first, so kips' port still reaches the sidecar.
    let lab = Lab::new("auto");
    let _listeners = Listeners::start(&lab.pod);
    for rule in [
        &["-t", "nat", "-N", "MESH_INBOUND"][..],
        &[
            "-t",
            "nat",
            "-A",
            "MESH_INBOUND",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15006",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-j",
            "MESH_INBOUND",
        ],
    ] {
        let mut command = vec!["iptables-legacy"];
        command.extend_from_slice(rule);
        assert!(lab.pod.exec(&command).status.success());
    }
    let output = lab.init_net(&[]);
    assert_success(&output);
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("iptables backend legacy (2 legacy rules here, 0 nft rules)"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let saved =
        String::from_utf8_lossy(&lab.pod.exec(&["iptables-legacy-save", "-t", "nat"]).stdout)
            .into_owned();
    let prerouting: Vec<&str> = saved
        .lines()
        .filter(|l| l.starts_with("-A PREROUTING"))
        .collect();
    assert_eq!(
        prerouting,
        [
            "-A PREROUTING -j KIPS_INBOUND",
            "-A PREROUTING -p tcp -j MESH_INBOUND"
        ]
    );
    assert!(
        saved.contains("-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 15006"),
        "{saved}"
    );
    assert!(lab.pod.kips_rules("iptables", "nft").is_empty());
    assert_eq!(
        who_answers(&lab.client, Proto::Tcp, Some(CLIENT[0]), POD[0]),
        "sidecar"
    );
}

#[test]
fn without_net_admin_it_says_so_and_changes_nothing() {
    if !ready() {
        return;
    }
    let pod = Netns::create("nocap", "pod");
    for backend in ["nft", "legacy"] {
        // Root, but with NET_RAW only: what a pod spec without NET_ADMIN gets.
        let output = pod.exec(&[
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-all,+net_raw",
            "--",
            KIPS,
            "init-net",
            "--redirect",
            "8080/tcp=15100",
            "--backend",
            backend,
        ]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{backend}: {stderr}");
        assert!(
            stderr.contains("was refused: kips-init needs the capabilities NET_ADMIN and NET_RAW"),
            "{backend}: {stderr}"
        );
        assert!(
            stderr.contains("this process lacks NET_ADMIN"),
            "{backend}: {stderr}"
        );
        for command in ["iptables", "ip6tables"] {
            assert!(pod.kips_rules(command, backend).is_empty());
        }
    }
}

#[test]
fn missing_iptables_tools_are_named() {
    if !ready() {
        return;
    }
    let pod = Netns::create("notools", "pod");
    let output = pod.exec(&[
        "env",
        "PATH=/nonexistent",
        KIPS,
        "init-net",
        "--redirect",
        "8080/tcp=15100",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("iptables-nft-save is not installed (not found in PATH): the kips-init image must carry iptables"), "{stderr}");
}

#[test]
fn an_ipv6_failure_takes_the_ipv4_rules_out_again() {
    if !ready() {
        return;
    }
    // ip6tables-nft-restore that fails as on a node without IPv6 nat.
    let tools = tempfile::tempdir().unwrap();
    let fake = tools.path().join("ip6tables-nft-restore");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"ip6tables-restore: unable to initialize table 'nat'\" >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "PATH={}:{}",
        tools.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let command = |pod: &Netns| {
        pod.exec(&[
            "env",
            &path,
            KIPS,
            "init-net",
            "--redirect",
            "8080/tcp=15100",
            "--backend",
            "nft",
        ])
    };

    // The pod has an IPv6 address: failing is the only safe outcome.
    let lab = Lab::new("v6fail");
    let output = command(&lab.pod);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("ip6tables-nft-restore cannot reach the IPv6 nat table"),
        "{stderr}"
    );
    assert!(
        stderr.contains("(the IPv4 rules were taken out again)"),
        "{stderr}"
    );
    assert!(lab.pod.kips_rules("iptables", "nft").is_empty());

    // A pod with link-local IPv6 only keeps its IPv4 rules and starts.
    let v4_only = Netns::create("v6fail", "v4only");
    let output = command(&v4_only);
    assert_success(&output);
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("no IPv6 rules (the pod has no IPv6 address beyond link-local)")
    );
    assert_eq!(v4_only.kips_rules("iptables", "nft").len(), 3);
}
