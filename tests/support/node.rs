//! A one-node Kubernetes cluster for the end-to-end suites, with bytes on the wire: the
//! control plane of [`super::control_plane`] plus kube-scheduler, and a node — containerd v2,
//! runc, CNI bridge, kubelet, kube-proxy (iptables mode) — living in network namespaces the
//! test creates. Pods really start; Services really forward. Binaries come from
//! tests/node/build.sh (pinned Go modules, cached under `.cache/node`), images from
//! scripts/images.sh (imported into containerd, nothing is ever pulled).
//!
//! ```ignore
//! let cluster = node::Cluster::start().await?;          // node Ready, images imported
//! cluster.kubectl(&["apply", "-f", path]).await?;       // the real kubectl
//! let relay = std::net::TcpListener::bind((cluster.host_address(), 0))?; // pods reach it
//! let report = cluster.stop();                          // or drop it; both clean up
//! report.assert_clean()?;
//! // or one cluster per test binary, torn down (and checked) at exit:
//! let cluster = node::shared().await?;
//! ```
//!
//! # Address plan (one cluster; `N` is picked free on this machine, 0–255)
//!
//! | where | address | what |
//! |---|---|---|
//! | host netns | `10.213.N.1/24` on veth `kn<pid>-<k>` | [`Cluster::host_address`]: host processes bind here and pods reach them (the "laptop" side, e.g. a test relay); also the node's way to the API server (`:6443`, forwarded to loopback) |
//! | node netns `kips-node-<pid>-<k>` | `10.213.N.2/24` on `eth0` | [`Cluster::node_ip`]: the node's InternalIP, kubelet `:10250` (the API server dials it for exec/logs) |
//! | node netns | `10.244.N.1/24` on bridge `cni0` | [`Cluster::pod_gateway`]: pods' gateway; the kubelet's probes come from here |
//! | pods | `10.244.N.0/24` | CNI bridge + host-local, default route via `10.244.N.1` |
//! | Services | `10.96.N.0/24` | ClusterIPs (the API server's `--service-cluster-ip-range`), kube-proxy's iptables rules in the node netns |
//! | API server | `127.0.0.1:<port>` | for the test process, kubectl and helm ([`Cluster::kubeconfig`]) |
//!
//! Routes in the node netns: `10.213.N.0/24 dev eth0`, `10.244.N.0/24 dev cni0`, and
//! `10.96.N.0/24 dev cni0` (locally sent packets to a ClusterIP need a route before kube-proxy's
//! DNAT). There is no default route: nothing the node or a pod sends can reach any address but
//! the host address and these namespaces. Forwarding and masquerade (the CNI bridge's
//! `ipMasq`: pods reach the host address as `10.213.N.2`) are switched on in the node netns
//! only. The host netns gets the veth, its connected route and routes to the pods' and the
//! Services' ranges via the node (the API server reaches a webhook Service, a pod proxy, as in
//! a real cluster): no forwarding, no iptables rule. Ranges are per `N`, so clusters running
//! side by side never share a route.
//!
//! # Processes, mounts, cleanup
//!
//! A supervisor `unshare --mount --propagation private nsenter --net=<node netns>` makes `/`
//! rshared in a mount namespace of its own and mounts tmpfs on `/run`, `/var/lib` and `/var/log`
//! there (containerd's sockets and pod netns mounts, CNI state, `/var/log/containers` stay
//! private); containerd, kubelet and kube-proxy are started into its namespaces with
//! `nsenter --target`. Every mount they make vanishes with that namespace. Pods' cgroups live
//! under `/<tag>` at the root of every cgroup hierarchy (kubelet's `cgroupRoot`).
//!
//! Teardown ([`Cluster::stop`], `Drop`, or an `atexit` handler when the test binary exits — as
//! libtest does on failure): kill the node's processes, then everything left in the node's
//! network or mount namespace or in its cgroups (shims, pods), until nothing is; remove the
//! cgroups depth-first; delete the netns (the veth and every iptables rule go with it); remove
//! the folder; then [`leftovers`] checks processes, netns, veth, cgroups, mounts, the folder
//! and the host's iptables (both backends) and says what it found. A cluster of a test binary
//! that was killed (no atexit) is swept by the next start ([`sweep_stale`]).
//!
//! Needs root, Debian's runc, containernetworking-plugins, conntrack, iptables, iproute2 and
//! util-linux (scripts/test.sh installs them) and Go (for the builds). [`skip_reason`] says
//! what is missing; suites skip on it outside CI only.
//!
//! Environment: `KIPS_NODE_BIN_DIR` (prebuilt node binaries), `KIPS_E2E_KEEP=1` (keep the
//! folder with configs and logs), `KIPS_NODE_READY_TIMEOUT` (seconds, default 180).

use std::{
    collections::BTreeMap,
    env,
    fs::{self, File},
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, OnceLock, TryLockError,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};

use super::control_plane::{
    ClientCert, ControlPlane, Options, kubeconfig_for, spawn_tied_to_process,
};

/// The node's name (kubelet `--hostname-override`, its certificate's `system:node:<name>`).
pub const NODE_NAME: &str = "kips-node";
/// A dual-stack node's IPv6 pod range ([`Cluster::start_dual_stack`]): a ULA prefix that
/// exists only inside the node's netns.
pub const POD_CIDR_V6: &str = "fd6b:6970:7300:244::/64";
/// The IPv6 pods' gateway on the node's bridge.
pub const POD_GATEWAY_V6: &str = "fd6b:6970:7300:244::1";
/// A dual-stack node's IPv6 Service range (the API server's second
/// `--service-cluster-ip-range`).
pub const SERVICE_CIDR_V6: &str = "fd6b:6970:7300:5e::/112";
/// The port on [`Cluster::host_address`] that forwards to the API server (for the node).
pub const API_PORT_ON_HOST_ADDRESS: u16 = 6443;
const TAG_PREFIX: &str = "kips-node-";
const SUBNET_PREFIX: [u8; 2] = [10, 213];
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Why the node suites cannot run here (not root, a tool missing), or `None`.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the node suites need root (network namespaces, mounts, cgroups)".into());
    }
    let missing: Vec<&str> = [
        ("/usr/sbin/runc", "runc"),
        ("/usr/lib/cni/bridge", "containernetworking-plugins"),
        ("/usr/lib/cni/host-local", "containernetworking-plugins"),
        ("/usr/lib/cni/portmap", "containernetworking-plugins"),
        ("/usr/lib/cni/loopback", "containernetworking-plugins"),
        ("/usr/sbin/conntrack", "conntrack"),
        ("/usr/sbin/iptables-nft", "iptables"),
        ("/usr/sbin/iptables-legacy", "iptables"),
        ("/usr/sbin/ip", "iproute2"),
        ("/usr/bin/unshare", "util-linux"),
        ("/usr/bin/nsenter", "util-linux"),
        ("/usr/bin/strip", "binutils"),
    ]
    .iter()
    .filter(|(path, _)| !Path::new(path).exists())
    .map(|(_, package)| *package)
    .collect();
    if !missing.is_empty() {
        let mut packages = missing.clone();
        packages.dedup();
        return Some(format!(
            "the node suites need the Debian packages {} (scripts/test.sh installs them)",
            packages.join(" ")
        ));
    }
    None
}

/// The images scripts/images.sh built and the cluster imported (names with tags).
#[derive(Clone, Debug, Default)]
pub struct Images {
    /// `ghcr.io/kips-dev/kips:<version>`: the webhook and `kips bridge`.
    pub kips: String,
    /// `ghcr.io/kips-dev/kips-init:<version>`: kips' default `--init-image`.
    pub kips_init: String,
    /// The sandbox image containerd is pinned to.
    pub pause: String,
    /// `testapp serve`: answers `cluster <pod name>` on :8080 (env `ANSWER`, `LISTEN`, and
    /// `UDP_LISTEN` for UDP); `testapp echo ADDR` is a TCP echo.
    pub app: String,
    /// `testapp serve` as user 65532 answering `sidecar <pod name>` on :15100, ignoring its
    /// arguments (shown at `/args`): a stand-in for kips-bridge.
    pub bridge_standin: String,
    /// busybox (`sh`, `nc`) and testapp (`get URL`, `udp ADDR MESSAGE`, `echo ADDR`).
    pub client: String,
}

/// What a teardown found left behind; empty when everything is gone.
#[derive(Debug, Default)]
pub struct Report {
    pub leftovers: Vec<String>,
}

impl Report {
    /// Fails with the list of leftovers, if any.
    pub fn assert_clean(&self) -> Result<()> {
        ensure!(
            self.leftovers.is_empty(),
            "the node left things behind:\n  {}",
            self.leftovers.join("\n  ")
        );
        Ok(())
    }
}

/// Everything a cluster's node can leave on this machine, by name: enough to tear it down
/// and to check that nothing is left, from this process or from another one (a parent that
/// checks what its crashed child left, the sweep of a killed run).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Footprint {
    /// `kips-node-<pid>-<k>`: the node netns, the cgroup root, the folder's name.
    pub tag: String,
    /// `N` of 10.213.N.0/24.
    pub subnet: u8,
    pub dir: PathBuf,
    pub host_veth: String,
    pub netns_inode: Option<u64>,
    pub mount_ns_inode: Option<u64>,
    /// The host's iptables rules (both backends) before the cluster started.
    pub iptables_baseline: Vec<String>,
}

struct NodeProc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// One cluster shared by all tests of a test binary, started on first use and torn down
/// when the binary exits (the `atexit` teardown, which also reports leftovers). A start
/// failure is remembered: every later caller fails with the same message. Prefer an owned
/// [`Cluster::start`] when a test wants [`Cluster::stop`]'s report.
pub async fn shared() -> Result<&'static Cluster> {
    static SHARED: tokio::sync::OnceCell<Result<Cluster, String>> =
        tokio::sync::OnceCell::const_new();
    SHARED
        .get_or_init(|| async { Cluster::start().await.map_err(|e| format!("{e:#}")) })
        .await
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the shared node cluster did not start: {e}"))
}

/// A running one-node cluster; torn down by [`Cluster::stop`] or when dropped.
pub struct Cluster {
    footprint: Footprint,
    procs: Vec<NodeProc>,
    forwarder: Option<Forwarder>,
    cp: Option<ControlPlane>,
    bin_dir: PathBuf,
    images: Images,
    node_ready_after: Duration,
    started_after: Duration,
    stopped: bool,
    dual_stack: bool,
}

impl Cluster {
    /// Builds (or finds) the binaries and images, starts the control plane, the scheduler
    /// and the node, imports the images, and waits until the node is Ready.
    pub async fn start() -> Result<Cluster> {
        Self::start_with(false).await
    }

    /// [`Cluster::start`] with IPv6 beside IPv4: pods get an address of each family
    /// ([`POD_CIDR_V6`]), Services may ask for both ([`SERVICE_CIDR_V6`]), kube-proxy
    /// programs both; everything IPv6 stays inside the node's netns.
    pub async fn start_dual_stack() -> Result<Cluster> {
        Self::start_with(true).await
    }

    async fn start_with(dual_stack: bool) -> Result<Cluster> {
        if let Some(reason) = skip_reason() {
            bail!("cannot start a node: {reason}");
        }
        let t0 = Instant::now();
        let bin_dir = tokio::task::spawn_blocking(bin_dir).await??;
        tokio::task::spawn_blocking(sweep_stale).await?;
        let footprint = tokio::task::spawn_blocking(move || create_network(dual_stack)).await??;
        let mut cluster = Cluster {
            footprint,
            procs: Vec::new(),
            forwarder: None,
            cp: None,
            bin_dir,
            images: Images::default(),
            node_ready_after: Duration::ZERO,
            started_after: Duration::ZERO,
            stopped: false,
            dual_stack,
        };
        // From here on, an error drops `cluster`, which tears down what was made.
        let fp = cluster.footprint.clone();
        let host = host_address(fp.subnet);
        let node_user = format!("system:node:{NODE_NAME}");
        let cert = |file: &str, cn: &str, orgs: &[&str]| ClientCert {
            file: file.into(),
            common_name: cn.into(),
            organisations: orgs.iter().map(|o| (*o).to_owned()).collect(),
        };
        let apiserver_args: Vec<String> = vec![
            // The API server dials kubelets by node name through the machine's
            // resolver otherwise, which must not (and cannot) see this node.
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--kubelet-client-certificate=admin.crt".into(),
            "--kubelet-client-key=admin.key".into(),
        ];
        let cp = ControlPlane::start_with(&Options {
            apiserver_sans: vec![
                host.to_string(),
                kubernetes_service_ip(fp.subnet).to_string(),
            ],
            service_cidr: Some(if dual_stack {
                format!("{},{SERVICE_CIDR_V6}", service_cidr(fp.subnet))
            } else {
                service_cidr(fp.subnet)
            }),
            apiserver_args,
            // The defaults: endpointslice feeds kube-proxy, node-lifecycle lifts the
            // not-ready taint.
            controllers: Some(vec!["*".into()]),
            client_certs: vec![
                cert("node", &node_user, &["system:nodes"]),
                cert("kube-proxy", "system:kube-proxy", &[]),
                cert("kube-scheduler", "system:kube-scheduler", &[]),
            ],
        })
        .await?;
        let cp_dir = cp.dir().to_owned();
        let cp_server = cp.server().to_owned();
        let api_port: u16 = cp_server
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("the API server's port")?;
        cluster.cp = Some(cp);
        cluster.forwarder = Some(Forwarder::start(
            SocketAddr::from((host, API_PORT_ON_HOST_ADDRESS)),
            SocketAddr::from(([127, 0, 0, 1], api_port)),
        )?);
        publish_kubernetes_endpoints(&cluster.client()?, host).await?;

        let dir = fp.dir.clone();
        let node_server = format!("https://{host}:{API_PORT_ON_HOST_ADDRESS}");
        fs::write(
            dir.join("kubelet.kubeconfig"),
            kubeconfig_for(&cp_dir, &node_server, &node_user, "node"),
        )?;
        fs::write(
            dir.join("kube-proxy.kubeconfig"),
            kubeconfig_for(&cp_dir, &node_server, "system:kube-proxy", "kube-proxy"),
        )?;
        fs::write(
            dir.join("kube-scheduler.kubeconfig"),
            kubeconfig_for(
                &cp_dir,
                &cp_server,
                "system:kube-scheduler",
                "kube-scheduler",
            ),
        )?;
        let scheduler_port = free_port()?;
        cluster.cp()?.spawn_from(
            &cluster.bin_dir.join("kube-scheduler"),
            "kube-scheduler",
            &[
                format!(
                    "--kubeconfig={}",
                    dir.join("kube-scheduler.kubeconfig").display()
                ),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={scheduler_port}"),
                "--profiling=false".into(),
            ],
        )?;

        let images_dir = dir.join("images");
        let tarballs = tokio::task::spawn_blocking(move || build_images(&images_dir)).await??;
        cluster.images = images_from(&tarballs)?;
        cluster.write_configs(&cp_dir)?;
        tokio::task::spawn_blocking(make_cgroup_roots(fp.tag.clone())).await??;
        cluster.start_supervisor().await?;
        cluster.start_in_node(
            "containerd",
            "containerd",
            &[format!(
                "--config={}",
                dir.join("containerd/config.toml").display()
            )],
        )?;
        cluster.wait_for_containerd().await?;
        cluster.import_images(&tarballs).await?;

        let kubelet_started = Instant::now();
        cluster.start_in_node(
            "kubelet",
            "kubelet",
            &[
                format!("--config={}", dir.join("kubelet.yaml").display()),
                format!("--kubeconfig={}", dir.join("kubelet.kubeconfig").display()),
                format!("--root-dir={}", dir.join("kubelet").display()),
                format!("--cert-dir={}", dir.join("kubelet/pki").display()),
                if dual_stack {
                    format!("--node-ip={},{}", node_ip(fp.subnet), node_ip_v6(fp.subnet))
                } else {
                    format!("--node-ip={}", node_ip(fp.subnet))
                },
                format!("--hostname-override={NODE_NAME}"),
                "--v=1".into(),
            ],
        )?;
        cluster.start_in_node(
            "kube-proxy",
            "kube-proxy",
            &[
                format!("--config={}", dir.join("kube-proxy.yaml").display()),
                "--v=1".into(),
            ],
        )?;
        cluster.wait_for_node_ready().await?;
        cluster.node_ready_after = kubelet_started.elapsed();
        cluster.started_after = t0.elapsed();
        eprintln!(
            "node: ready {:.1} s after the kubelet started, cluster up in {:.1} s ({}, host address {host})",
            cluster.node_ready_after.as_secs_f64(),
            cluster.started_after.as_secs_f64(),
            dir.display(),
        );
        Ok(cluster)
    }

    fn cp(&self) -> Result<&ControlPlane> {
        self.cp.as_ref().context("the control plane is not running")
    }

    /// The control plane (kube-apiserver, kube-controller-manager, kube-scheduler).
    pub fn control_plane(&self) -> &ControlPlane {
        self.cp
            .as_ref()
            .expect("a started cluster has a control plane")
    }

    /// An admin client bound to the caller's tokio runtime (make one per test).
    pub fn client(&self) -> Result<Client> {
        self.cp()?.client()
    }

    /// Admin kubeconfig for host-side tools (`https://127.0.0.1:<port>`).
    pub fn kubeconfig(&self) -> &Path {
        self.control_plane().kubeconfig()
    }

    /// The host end of the veth into the node netns (`10.213.N.1`): a host process bound here
    /// is reachable from every pod (e.g. a test relay standing in for the laptop's side).
    pub fn host_address(&self) -> Ipv4Addr {
        host_address(self.footprint.subnet)
    }

    /// The node's InternalIP (`10.213.N.2`, in the node netns).
    pub fn node_ip(&self) -> Ipv4Addr {
        node_ip(self.footprint.subnet)
    }

    /// The pods' gateway (`10.244.N.1`): where the kubelet's probes come from.
    pub fn pod_gateway(&self) -> Ipv4Addr {
        pod_gateway(self.footprint.subnet)
    }

    /// Names of the imported images.
    pub fn images(&self) -> &Images {
        &self.images
    }

    /// From the kubelet's start to the node's Ready condition.
    pub fn node_ready_after(&self) -> Duration {
        self.node_ready_after
    }

    /// From [`Cluster::start`] to a Ready node (builds excluded when up to date).
    pub fn started_after(&self) -> Duration {
        self.started_after
    }

    /// What this cluster may leave on the machine (names, namespaces, folder).
    pub fn footprint(&self) -> &Footprint {
        &self.footprint
    }

    /// Processes in the node's cgroups (`/<tag>/...` of the pids hierarchy): the pods'.
    pub fn pod_cgroup_processes(&self) -> usize {
        let Some(root) = cgroup_mounts()
            .into_iter()
            .find(|m| m.ends_with("pids") || m.ends_with("unified"))
        else {
            return 0;
        };
        let mut count = 0;
        let mut stack = vec![root.join(&self.footprint.tag)];
        while let Some(dir) = stack.pop() {
            count += fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .count();
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        count
    }

    /// Where kubelet, containerd, kube-proxy, their configs and logs are.
    pub fn dir(&self) -> &Path {
        &self.footprint.dir
    }

    /// The real kubectl with the admin kubeconfig (stdin null, output captured).
    pub fn kubectl_command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(self.bin_dir.join("kubectl"));
        command
            .arg(format!("--kubeconfig={}", self.kubeconfig().display()))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// `kubectl <args>`; its stdout, or an error with its stderr.
    pub async fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self
            .kubectl_command()
            .args(args)
            .output()
            .await
            .context("running kubectl")?;
        ensure!(
            out.status.success(),
            "kubectl {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `kubectl <args>` with `input` on stdin (e.g. `apply -f -`).
    pub async fn kubectl_with_input(&self, args: &[&str], input: &str) -> Result<String> {
        use tokio::io::AsyncWriteExt;
        let mut child = self
            .kubectl_command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        let mut stdin = child.stdin.take().context("kubectl's stdin")?;
        stdin.write_all(input.as_bytes()).await?;
        drop(stdin);
        let out = child.wait_with_output().await?;
        ensure!(
            out.status.success(),
            "kubectl {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// The last `lines` lines of every component's log (node and control plane).
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = self
            .cp
            .as_ref()
            .map(|cp| cp.log_tails(lines))
            .unwrap_or_default();
        for p in &self.procs {
            out += &format!(
                "----- {} ({}) -----\n{}\n",
                p.name,
                p.log.display(),
                tail(&p.log, lines)
            );
        }
        out
    }

    /// Fails with the logs when a node component or the control plane has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.cp()?.check_alive()?;
        let exited = self
            .procs
            .iter_mut()
            .find_map(|p| Some((p.name, p.child.try_wait().ok()??)));
        if let Some((name, status)) = exited {
            bail!("{name} exited ({status})\n{}", self.log_tails(40));
        }
        Ok(())
    }

    /// Tears everything down and checks what is left (see the module's docs).
    pub fn stop(mut self) -> Report {
        self.teardown()
    }

    fn teardown(&mut self) -> Report {
        if self.stopped {
            return Report::default();
        }
        self.stopped = true;
        for p in &mut self.procs {
            let _ = p.child.kill();
        }
        for p in &mut self.procs {
            let _ = p.child.wait();
        }
        if let Some(forwarder) = self.forwarder.take() {
            forwarder.stop();
        }
        let report = teardown(&self.footprint);
        // The control plane goes last: the node needed it until its processes were gone.
        drop(self.cp.take());
        let mut reg = registry();
        reg.retain(|(f, _)| f.tag != self.footprint.tag);
        drop(reg);
        report
    }

    // ---- start-up steps ------------------------------------------------------------------

    fn write_configs(&self, cp_dir: &Path) -> Result<()> {
        let dir = &self.footprint.dir;
        let d = |p: &str| dir.join(p).display().to_string();
        for sub in [
            "containerd",
            "cni/net.d",
            "kubelet/pki",
            "pod-logs",
            "volume-plugins",
        ] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let containerd = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs", "io.containerd.nri.v1.nri",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[metrics]
  address = ""

[plugins.'io.containerd.internal.v1.opt']
  path = "{opt}"

[plugins.'io.containerd.cri.v1.runtime']
  # Negative oom_score_adj values fail on this kernel: never lower the parent's.
  restrict_oom_score_adj = true
  enable_cdi = false
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "{runc}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni}"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{pause}"

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
            root = d("containerd/root"),
            state = d("containerd/state"),
            sock = d("containerd/containerd.sock"),
            opt = d("containerd/opt"),
            runc = d("containerd/runc"),
            cni = d("cni/net.d"),
            pause = self.images.pause,
        );
        fs::write(dir.join("containerd/config.toml"), containerd)?;
        let mut ranges = vec![serde_json::json!([{
            "subnet": pod_cidr(self.footprint.subnet),
            "gateway": pod_gateway(self.footprint.subnet).to_string(),
        }])];
        let mut routes = vec![serde_json::json!({"dst": "0.0.0.0/0"})];
        if self.dual_stack {
            ranges.push(serde_json::json!([{"subnet": POD_CIDR_V6, "gateway": POD_GATEWAY_V6}]));
            routes.push(serde_json::json!({"dst": "::/0"}));
        }
        let cni = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": self.footprint.tag,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": true,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": ranges,
                        "routes": routes
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        fs::write(
            dir.join("cni/net.d/10-kips-node.conflist"),
            serde_json::to_string_pretty(&cni)?,
        )?;
        // No cluster DNS: pods get a resolver file with no nameserver (nothing to ask).
        fs::write(dir.join("resolv.conf"), "options ndots:1\n")?;
        let kubelet = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine: cgroup v1 (hybrid), no systemd, negative oom_score_adj refused, swap allowed.
failCgroupV1: false
cgroupDriver: cgroupfs
# Pods' cgroups under /<tag> in every hierarchy (pre-created), never at the roots.
cgroupsPerQOS: true
cgroupRoot: /{tag}
enforceNodeAllocatable: []
failSwapOn: false
oomScoreAdj: 0
# A test node never garbage-collects images nor evicts pods.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "0%"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
  imagefs.inodesFree: "0%"
address: {node_ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://{sock}
resolvConf: {resolv}
podLogsDirectory: {logs}
volumePluginDir: {plugins}
serializeImagePulls: false
registerNode: true
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
"#,
            tag = self.footprint.tag,
            node_ip = node_ip(self.footprint.subnet),
            ca = cp_dir.join("ca.crt").display(),
            sock = d("containerd/containerd.sock"),
            resolv = d("resolv.conf"),
            logs = d("pod-logs"),
            plugins = d("volume-plugins"),
        );
        fs::write(dir.join("kubelet.yaml"), kubelet)?;
        let proxy = format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
clusterCIDR: {cluster_cidr}
detectLocalMode: ClusterCIDR
# Global conntrack sysctls are not the test's to change.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
oomScoreAdj: 0
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
"#,
            kubeconfig = d("kube-proxy.kubeconfig"),
            cluster_cidr = if self.dual_stack {
                format!("{},{POD_CIDR_V6}", pod_cidr(self.footprint.subnet))
            } else {
                pod_cidr(self.footprint.subnet)
            },
        );
        fs::write(dir.join("kube-proxy.yaml"), proxy)?;
        Ok(())
    }

    async fn start_supervisor(&mut self) -> Result<()> {
        let dir = self.footprint.dir.clone();
        let ready = dir.join("supervisor.ready");
        // Everything the node writes under /run, /var/lib and /var/log stays in this mount
        // namespace; `/` rshared is what containerd and the kubelet expect of a node.
        let script = format!(
            "set -e; mount --make-rshared /; \
             mount -t tmpfs -o mode=0755 kips-node-run /run; \
             mount -t tmpfs -o mode=0755 kips-node-varlib /var/lib; \
             mount -t tmpfs -o mode=0755 kips-node-varlog /var/log; \
             : > {ready}; exec sleep 2147483647",
            ready = ready.display()
        );
        let netns = format!("--net=/run/netns/{}", self.footprint.tag);
        self.spawn_node_proc(
            "supervisor",
            Command::new("unshare").args([
                "--mount",
                "--propagation",
                "private",
                "nsenter",
                &netns,
                "--",
                "/bin/sh",
                "-c",
                &script,
            ]),
        )?;
        let t0 = Instant::now();
        while !ready.exists() {
            self.check_alive()?;
            ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "the node's supervisor did not start\n{}",
                self.log_tails(20)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = self.procs[0].child.id();
        self.footprint.mount_ns_inode = Some(fs::metadata(format!("/proc/{pid}/ns/mnt"))?.ino());
        update_registry(&self.footprint, &self.procs);
        Ok(())
    }

    /// Starts `<bin dir>/<binary> <args>` in the node's network and mount namespaces.
    fn start_in_node(&mut self, name: &'static str, binary: &str, args: &[String]) -> Result<()> {
        let supervisor = self
            .procs
            .first()
            .context("no supervisor")?
            .child
            .id()
            .to_string();
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &supervisor, "--mount", "--net", "--"])
            .arg(self.bin_dir.join(binary))
            .args(args);
        self.spawn_node_proc(name, &mut cmd)
    }

    fn spawn_node_proc(&mut self, name: &'static str, cmd: &mut Command) -> Result<()> {
        let log = self.footprint.dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let path = format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.bin_dir.display()
        );
        let mut command = Command::new(cmd.get_program());
        command
            .args(cmd.get_args())
            .env("PATH", path)
            .current_dir(&self.footprint.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = spawn_tied_to_process(command).with_context(|| format!("starting {name}"))?;
        self.procs.push(NodeProc { name, child, log });
        update_registry(&self.footprint, &self.procs);
        Ok(())
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("ctr"));
        cmd.arg(format!(
            "--address={}",
            self.footprint
                .dir
                .join("containerd/containerd.sock")
                .display()
        ))
        .args(["--namespace", "k8s.io"])
        .stdin(Stdio::null());
        cmd
    }

    async fn wait_for_containerd(&mut self) -> Result<()> {
        let t0 = Instant::now();
        loop {
            self.check_alive()?;
            let mut version = self.ctr();
            version
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if tokio::task::spawn_blocking(move || version.status())
                .await??
                .success()
            {
                return Ok(());
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "containerd did not answer in 30 s\n{}",
                self.log_tails(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn import_images(&mut self, tarballs: &[(String, String, PathBuf)]) -> Result<()> {
        for (_, name, tarball) in tarballs {
            let mut import = self.ctr();
            import
                .args(["images", "import", "--platform", "linux/amd64"])
                .arg(tarball);
            let out = tokio::task::spawn_blocking(move || import.output()).await??;
            ensure!(
                out.status.success(),
                "ctr images import {} failed: {}{}",
                tarball.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let mut list = self.ctr();
            list.args(["images", "list", "--quiet"]);
            let out = tokio::task::spawn_blocking(move || list.output()).await??;
            ensure!(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .any(|l| l.trim() == name),
                "containerd does not list {name} after importing {}:\n{}",
                tarball.display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(())
    }

    async fn wait_for_node_ready(&mut self) -> Result<()> {
        let limit = env::var("KIPS_NODE_READY_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(180));
        let nodes = Api::<Node>::all(self.client()?);
        let t0 = Instant::now();
        loop {
            self.check_alive()?;
            let last = match nodes.get_opt(NODE_NAME).await {
                Ok(Some(node)) => {
                    let ready = node
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
                    let tainted = node
                        .spec
                        .as_ref()
                        .and_then(|s| s.taints.as_ref())
                        .is_some_and(|t| t.iter().any(|t| t.key == "node.kubernetes.io/not-ready"));
                    match ready {
                        Some(r) if r.status == "True" && !tainted => return Ok(()),
                        Some(r) => format!(
                            "Ready={} ({}){}",
                            r.status,
                            r.message.clone().unwrap_or_default(),
                            if tainted {
                                ", still tainted not-ready"
                            } else {
                                ""
                            }
                        ),
                        None => "no Ready condition".into(),
                    }
                }
                Ok(None) => "not registered".into(),
                Err(e) => e.to_string(),
            };
            if t0.elapsed() > limit {
                bail!(
                    "node {NODE_NAME} not Ready after {limit:?}: {last}; logs in {}\n{}",
                    self.footprint.dir.display(),
                    self.log_tails(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let report = self.teardown();
        if !report.leftovers.is_empty() {
            eprintln!(
                "node: teardown of {} left things behind:\n  {}",
                self.footprint.tag,
                report.leftovers.join("\n  ")
            );
        }
    }
}

fn host_address(subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], subnet, 1)
}

fn node_ip(subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], subnet, 2)
}

/// Pods' addresses (CNI host-local range, kube-proxy's `clusterCIDR`): `10.244.N.0/24`, so
/// that clusters running side by side never share a route on the host.
fn pod_cidr(subnet: u8) -> String {
    format!("10.244.{subnet}.0/24")
}

/// The pods' gateway on the node's bridge: where the kubelet's probes come from.
fn pod_gateway(subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, subnet, 1)
}

/// The `kubernetes` Service's ClusterIP: the first address of [`service_cidr`].
fn kubernetes_service_ip(subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, subnet, 1)
}

/// Pods reach the API server as in-cluster clients do (`kubernetes.default`, the
/// `KUBERNETES_SERVICE_*` variables): the API server publishes no endpoints of its own here
/// (`--endpoint-reconciler-type=none`, it listens on loopback), so the `kubernetes` Service
/// gets an EndpointSlice naming the forwarder on the host address.
async fn publish_kubernetes_endpoints(client: &Client, host: Ipv4Addr) -> Result<()> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": "kubernetes",
            "labels": {
                "kubernetes.io/service-name": "kubernetes",
                "endpointslice.kubernetes.io/managed-by": "kips-node-suite"
            }
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [host.to_string()], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": API_PORT_ON_HOST_ADDRESS, "protocol": "TCP"}]
    }))?;
    Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .create(&Default::default(), &slice)
        .await
        .context("publishing the kubernetes Service's endpoints")?;
    Ok(())
}

/// ClusterIPs (the API server's `--service-cluster-ip-range`): `10.96.N.0/24`.
fn service_cidr(subnet: u8) -> String {
    format!("10.96.{subnet}.0/24")
}

/// A dual-stack node's IPv6 address, on the netns side of the veth only (the host end has
/// no IPv6 address of ours, so nothing IPv6 leaves the netns).
fn node_ip_v6(subnet: u8) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd6b, 0x6970, 0x7300, 0x213, 0, 0, subnet.into(), 2)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------------------
// Binaries and images

/// The node's binaries: `KIPS_NODE_BIN_DIR`, or tests/node/build.sh's output (a no-op when
/// up to date; run once per process).
pub fn bin_dir() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| find_or_build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn find_or_build() -> Result<PathBuf> {
    let dir = match env::var_os("KIPS_NODE_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let script = Path::new(REPO).join("tests/node/build.sh");
            let out = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
                .with_context(|| format!("running {}", script.display()))?;
            ensure!(
                out.status.success(),
                "{} failed ({}): the node's binaries could not be built (output above)",
                script.display(),
                out.status
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
        }
    };
    for b in [
        "kubelet",
        "kube-proxy",
        "kube-scheduler",
        "kubectl",
        "containerd",
        "ctr",
        "containerd-shim-runc-v2",
    ] {
        ensure!(dir.join(b).is_file(), "{} has no {b}", dir.display());
    }
    Ok(dir)
}

/// Runs scripts/images.sh for every image with this test build's `kips`; returns
/// `(image, name, tarball)` per image.
fn build_images(out: &Path) -> Result<Vec<(String, String, PathBuf)>> {
    let script = Path::new(REPO).join("scripts/images.sh");
    let result = Command::new("bash")
        .arg(&script)
        .arg("--out")
        .arg(out)
        .arg("--kips")
        .arg(env!("CARGO_BIN_EXE_kips"))
        .arg("all")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(
        result.status.success(),
        "{} failed ({}): output above",
        script.display(),
        result.status
    );
    String::from_utf8(result.stdout)?
        .lines()
        .map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(image), Some(name), Some(tarball)) => {
                    Ok((image.to_owned(), name.to_owned(), PathBuf::from(tarball)))
                }
                _ => bail!("unexpected line from images.sh: {line:?}"),
            }
        })
        .collect()
}

fn images_from(tarballs: &[(String, String, PathBuf)]) -> Result<Images> {
    let names: BTreeMap<&str, &str> = tarballs
        .iter()
        .map(|(image, name, _)| (image.as_str(), name.as_str()))
        .collect();
    let get = |image: &str| -> Result<String> {
        Ok(names
            .get(image)
            .with_context(|| format!("images.sh built no {image} image"))?
            .to_string())
    };
    Ok(Images {
        kips: get("kips")?,
        kips_init: get("kips-init")?,
        pause: get("pause")?,
        app: get("test-app")?,
        bridge_standin: get("bridge-standin")?,
        client: get("test-client")?,
    })
}

// ---------------------------------------------------------------------------------------
// Network

/// Picks a free 10.213.N.0/24 (under a machine-wide lock, so parallel runs never share one),
/// creates the node netns, the veth pair and the pods' bridge.
fn create_network(dual_stack: bool) -> Result<Footprint> {
    static K: AtomicU32 = AtomicU32::new(1);
    let pid = std::process::id();
    let k = K.fetch_add(1, Ordering::Relaxed);
    let tag = format!("{TAG_PREFIX}{pid}-{k}");
    // A lock file of its own (`ip netns add` flocks /run/netns: that one would deadlock).
    // It stays, empty, for the next run.
    let lock = File::create(env::temp_dir().join("kips-node-subnets.lock"))?;
    // SAFETY: flock on a file we own; released when `lock` is closed.
    ensure!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } == 0,
        "locking the subnet allocation: {}",
        io::Error::last_os_error()
    );
    let used = run("ip", &["-4", "-o", "addr", "show"])?;
    let prefix = format!("{}.{}.", SUBNET_PREFIX[0], SUBNET_PREFIX[1]);
    let subnet = (0..=255u8)
        .find(|n| !used.contains(&format!("{prefix}{n}.")))
        .context("no free 10.213.N.0/24 on this machine")?;
    let dir = env::temp_dir().join(&tag);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let mut footprint = Footprint {
        tag: tag.clone(),
        subnet,
        dir,
        host_veth: format!("kn{pid}-{k}"),
        netns_inode: None,
        mount_ns_inode: None,
        iptables_baseline: host_iptables(),
    };
    registry().push((footprint.clone(), Vec::new()));
    let setup = || -> Result<u64> {
        let host = format!("{}/24", host_address(subnet));
        let node = format!("{}/24", node_ip(subnet));
        let gateway = format!("{}/24", pod_gateway(subnet));
        let (pods, services) = (pod_cidr(subnet), service_cidr(subnet));
        let via = node_ip(subnet).to_string();
        let n = tag.as_str();
        run("ip", &["netns", "add", n])?;
        let inode = fs::metadata(format!("/run/netns/{n}"))?.ino();
        run(
            "ip",
            &[
                "link",
                "add",
                &footprint.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                n,
            ],
        )?;
        run("ip", &["addr", "add", &host, "dev", &footprint.host_veth])?;
        run("ip", &["link", "set", &footprint.host_veth, "up"])?;
        run("ip", &["-n", n, "link", "set", "lo", "up"])?;
        run("ip", &["-n", n, "addr", "add", &node, "dev", "eth0"])?;
        run("ip", &["-n", n, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", n, "link", "add", "cni0", "type", "bridge"])?;
        run("ip", &["-n", n, "addr", "add", &gateway, "dev", "cni0"])?;
        run("ip", &["-n", n, "link", "set", "cni0", "up"])?;
        run("ip", &["-n", n, "route", "add", &services, "dev", "cni0"])?;
        // The API server reaches pods (webhooks, pod proxy) and ClusterIPs through the node,
        // as in a real cluster; the routes go with the veth.
        for range in [&pods, &services] {
            run(
                "ip",
                &[
                    "route",
                    "add",
                    range,
                    "via",
                    &via,
                    "dev",
                    &footprint.host_veth,
                ],
            )?;
        }
        run(
            "ip",
            &[
                "netns",
                "exec",
                n,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                "net.bridge.bridge-nf-call-iptables=1",
            ],
        )?;
        if dual_stack {
            let node6 = format!("{}/64", node_ip_v6(subnet));
            let gateway6 = format!("{POD_GATEWAY_V6}/64");
            run(
                "ip",
                &["-n", n, "-6", "addr", "add", &node6, "dev", "eth0", "nodad"],
            )?;
            run(
                "ip",
                &[
                    "-n", n, "-6", "addr", "add", &gateway6, "dev", "cni0", "nodad",
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    n,
                    "-6",
                    "route",
                    "add",
                    SERVICE_CIDR_V6,
                    "dev",
                    "cni0",
                ],
            )?;
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    n,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv6.conf.all.forwarding=1",
                    "net.bridge.bridge-nf-call-ip6tables=1",
                ],
            )?;
        }
        Ok(inode)
    };
    match setup() {
        Ok(inode) => {
            footprint.netns_inode = Some(inode);
            update_registry(&footprint, &[]);
            Ok(footprint)
        }
        Err(e) => {
            let report = teardown(&footprint);
            registry().retain(|(f, _)| f.tag != footprint.tag);
            Err(e.context(format!(
                "setting up the node's network (cleanup: {:?})",
                report.leftovers
            )))
        }
    }
}

/// A user-space TCP forwarder: the node reaches the API server (on the host's loopback)
/// through the host address. Plain threads, so it outlives any test's tokio runtime.
struct Forwarder {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
}

impl Forwarder {
    fn start(listen: SocketAddr, target: SocketAddr) -> Result<Forwarder> {
        let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        thread::Builder::new()
            .name("kips-node-forwarder".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(inbound) = conn else { continue };
                    let Ok(outbound) = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                    else {
                        continue;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    for (mut from, mut to) in [
                        (inbound.try_clone(), outbound.try_clone()),
                        (outbound.try_clone(), inbound.try_clone()),
                    ]
                    .into_iter()
                    .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                    {
                        let _ = thread::Builder::new()
                            .name("kips-node-forward".into())
                            .spawn(move || {
                                let _ = io::copy(&mut from, &mut to);
                                let _ = to.shutdown(Shutdown::Write);
                            });
                    }
                }
            })?;
        Ok(Forwarder {
            addr: listen,
            stopping,
        })
    }

    fn stop(self) {
        self.stopping.store(true, Ordering::Relaxed);
        // Wakes the accept loop, which then sees the flag; connections end with their peers.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

// ---------------------------------------------------------------------------------------
// cgroups

/// Every mounted cgroup hierarchy (v1 controllers and the unified one).
fn cgroup_mounts() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// The kubelet's `cgroupRoot` must exist in every hierarchy before it starts.
fn make_cgroup_roots(tag: String) -> impl FnOnce() -> Result<()> {
    move || {
        for mount in cgroup_mounts() {
            let dir = mount.join(&tag);
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }
}

/// Removes `<hierarchy>/<tag>` and everything below it, deepest first.
fn remove_cgroups(tag: &str) {
    for mount in cgroup_mounts() {
        let root = mount.join(tag);
        if !root.exists() {
            continue;
        }
        let mut dirs = Vec::new();
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            if let Ok(entries) = fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            dirs.push(dir);
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            for _ in 0..50 {
                match fs::remove_dir(&dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    _ => break,
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Teardown and the leftover check

fn ns_inode(pid: u32, ns: &str) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/{ns}"))
        .ok()
        .map(|m| m.ino())
}

/// Processes (not zombies) that belong to the node: in its network or mount namespace, or in
/// its cgroups. `(pid, command line)`.
fn node_processes(fp: &Footprint) -> Vec<(u32, String)> {
    let me = std::process::id();
    let cgroup = format!("/{}", fp.tag);
    let mut found = Vec::new();
    let mut parents = Vec::new();
    // This node's netns inode counts only while the netns itself is there (its inode cannot
    // be reused meanwhile); the other clusters' netns, to tell their processes apart.
    let netns_alive = fp.netns_inode.is_some()
        && fs::metadata(format!("/run/netns/{}", fp.tag))
            .map(|m| m.ino())
            .ok()
            == fp.netns_inode;
    let others: Vec<u64> = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(TAG_PREFIX) && name != fp.tag.as_str()
        })
        .filter_map(|e| e.metadata().ok().map(|m| m.ino()))
        .collect();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if matches!(
            stat.rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next()),
            Some("Z" | "X") | None
        ) {
            continue;
        }
        parents.push((pid, parent_of(&stat)));
        let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let paths = || cgroups.lines().filter_map(|l| l.splitn(3, ':').nth(2));
        let in_cgroup = paths().any(|p| p == cgroup || p.starts_with(&format!("{cgroup}/")));
        // Namespace inodes are reused once a namespace is gone: a pod of another cluster
        // running beside this one may get the inode this node's netns or mount namespace had.
        let foreign = !in_cgroup
            && (paths().any(|p| p.starts_with(&format!("/{TAG_PREFIX}")))
                || ns_inode(pid, "net").is_some_and(|i| others.contains(&i)));
        let in_net = netns_alive && ns_inode(pid, "net") == fp.netns_inode;
        let in_mnt = fp.mount_ns_inode.is_some() && ns_inode(pid, "mnt") == fp.mount_ns_inode;
        if in_cgroup || (!foreign && (in_net || in_mnt)) {
            found.push((pid, command_line(pid)));
        }
    }
    // And their descendants (containers are the shims' children), wherever their cgroups are.
    loop {
        let before = found.len();
        for &(pid, parent) in &parents {
            if found.iter().any(|(p, _)| *p == parent) && !found.iter().any(|(p, _)| *p == pid) {
                found.push((pid, command_line(pid)));
            }
        }
        if found.len() == before {
            return found;
        }
    }
}

fn command_line(pid: u32) -> String {
    let mut cmdline = String::new();
    let _ =
        File::open(format!("/proc/{pid}/cmdline")).and_then(|mut f| f.read_to_string(&mut cmdline));
    cmdline.replace('\0', " ").trim().to_owned()
}

/// The parent pid in a `/proc/<pid>/stat` line (the field after the state).
fn parent_of(stat: &str) -> u32 {
    stat.rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// Kills whatever is left of the node, removes its cgroups, netns, veth and folder, then
/// checks. The processes the harness started itself must be killed (and reaped) first.
pub fn teardown(fp: &Footprint) -> Report {
    let t0 = Instant::now();
    loop {
        let procs = node_processes(fp);
        if procs.is_empty() || t0.elapsed() > Duration::from_secs(20) {
            break;
        }
        for (pid, _) in procs {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(50));
    }
    remove_cgroups(&fp.tag);
    if Path::new(&format!("/run/netns/{}", fp.tag)).exists() {
        let _ = run("ip", &["netns", "del", &fp.tag]);
    }
    if Path::new(&format!("/sys/class/net/{}", fp.host_veth)).exists() {
        let _ = run("ip", &["link", "del", &fp.host_veth]);
    }
    for mount in host_mounts_of(fp).into_iter().rev() {
        let _ = Command::new("umount").arg("-l").arg(&mount).status();
    }
    if !keep_dirs() {
        let _ = fs::remove_dir_all(&fp.dir);
    }
    Report {
        leftovers: leftovers(fp),
    }
}

/// Mount points of this machine's mount namespace that belong to the node (none, when the
/// node's private mount namespace did its job).
fn host_mounts_of(fp: &Footprint) -> Vec<String> {
    let dir = fp.dir.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&dir) || m.contains(&fp.tag))
        .map(str::to_owned)
        .collect()
}

/// The host's iptables rules, both backends (`<backend>: <rule>`).
fn host_iptables() -> Vec<String> {
    let mut rules = Vec::new();
    for backend in [
        "iptables-nft-save",
        "iptables-legacy-save",
        "ip6tables-nft-save",
        "ip6tables-legacy-save",
    ] {
        if let Ok(out) = Command::new(backend)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        {
            rules.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| format!("{backend}: {}", l.split(" [").next().unwrap_or(l))),
            );
        }
    }
    rules
}

/// What the node left on this machine, described; empty when nothing.
pub fn leftovers(fp: &Footprint) -> Vec<String> {
    let mut found = Vec::new();
    for (pid, cmdline) in node_processes(fp) {
        found.push(format!("process {pid}: {cmdline}"));
    }
    if Path::new(&format!("/run/netns/{}", fp.tag)).exists() {
        found.push(format!("network namespace {}", fp.tag));
    }
    if Path::new(&format!("/sys/class/net/{}", fp.host_veth)).exists() {
        found.push(format!("host veth {}", fp.host_veth));
    }
    for mount in cgroup_mounts() {
        let dir = mount.join(&fp.tag);
        if dir.exists() {
            found.push(format!("cgroup {}", dir.display()));
        }
    }
    for mount in host_mounts_of(fp) {
        found.push(format!("mount {mount}"));
    }
    if !keep_dirs() && fp.dir.exists() {
        found.push(format!("folder {}", fp.dir.display()));
    }
    let subnet = format!("{}.{}.{}.", SUBNET_PREFIX[0], SUBNET_PREFIX[1], fp.subnet);
    for rule in host_iptables() {
        let ours = ["KUBE-", "CNI-", "KIPS", &subnet, "10.244.", &fp.tag]
            .iter()
            .any(|m| rule.contains(m));
        if ours && !fp.iptables_baseline.contains(&rule) {
            found.push(format!("host iptables rule {rule}"));
        }
    }
    found
}

fn keep_dirs() -> bool {
    env::var_os("KIPS_E2E_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Tears down the nodes of test processes that are gone (killed: no atexit ran). Runs at
/// every start.
pub fn sweep_stale() {
    let dead = |name: &str| -> bool {
        name.strip_prefix(TAG_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let mut tags: Vec<String> = Vec::new();
    let mut add = |name: &str| {
        if dead(name) && !tags.iter().any(|t| t == name) {
            tags.push(name.to_owned());
        }
    };
    for dir in [PathBuf::from("/run/netns"), env::temp_dir()] {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Some(name) = e.file_name().to_str() {
                add(name);
            }
        }
    }
    for mount in cgroup_mounts() {
        for e in fs::read_dir(mount).into_iter().flatten().flatten() {
            if let Some(name) = e.file_name().to_str() {
                add(name);
            }
        }
    }
    for tag in tags {
        let Some((pid, k)) = tag.strip_prefix(TAG_PREFIX).and_then(|r| r.split_once('-')) else {
            continue;
        };
        let fp = Footprint {
            tag: tag.clone(),
            subnet: 0,
            dir: env::temp_dir().join(&tag),
            host_veth: format!("kn{pid}-{k}"),
            netns_inode: fs::metadata(format!("/run/netns/{tag}"))
                .ok()
                .map(|m| m.ino()),
            mount_ns_inode: None,
            iptables_baseline: Vec::new(),
        };
        let report = teardown(&fp);
        eprintln!(
            "node: swept {tag} (left by a killed test process){}",
            if report.leftovers.is_empty() {
                String::new()
            } else {
                format!("; still there: {:?}", report.leftovers)
            }
        );
    }
}

// ---------------------------------------------------------------------------------------
// Exit-time cleanup: statics are never dropped, and libtest reports failures with
// `process::exit`.

type Registered = (Footprint, Vec<libc::pid_t>);
static REGISTRY: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

fn registry() -> std::sync::MutexGuard<'static, Vec<Registered>> {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    AT_EXIT.call_once(|| unsafe {
        libc::atexit(teardown_at_exit);
    });
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

fn update_registry(fp: &Footprint, procs: &[NodeProc]) {
    let pids = procs.iter().map(|p| p.child.id() as libc::pid_t).collect();
    let mut reg = registry();
    reg.retain(|(f, _)| f.tag != fp.tag);
    reg.push((fp.clone(), pids));
}

extern "C" fn teardown_at_exit() {
    let reg = match REGISTRY.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return, // the next start sweeps it
    };
    for (fp, pids) in reg.iter() {
        for &pid in pids {
            // SAFETY: kill/waitpid of our own children.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for &pid in pids {
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
        let report = teardown(fp);
        let _ = writeln!(
            io::stderr(),
            "node: torn down {} at exit: {}",
            fp.tag,
            if report.leftovers.is_empty() {
                "nothing left behind".to_owned()
            } else {
                format!("LEFT BEHIND:\n  {}", report.leftovers.join("\n  "))
            }
        );
    }
}
