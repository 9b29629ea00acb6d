//! A real Kubernetes control plane on loopback for the end-to-end suites: etcd,
//! kube-apiserver and kube-controller-manager, built from pinned sources by
//! `tests/controlplane/build.sh` (helm is built alongside and lives in the same bin dir).
//!
//! There is no kubelet and no scheduler: workload controllers create pods, which stay
//! Pending; tests assert on the objects read back from the API server.
//!
//! Use [`shared`] in tests: one control plane per test binary, one namespace per test
//! ([`ControlPlane::create_namespace`]). Startup takes a few seconds.
//! [`ControlPlane::start_with`] adds certificate names, API server flags, client identities
//! and controllers (the test node, tests/support/node.rs, runs on one started so).
//!
//! Cleanup (no process may outlive the test binary, however it ends):
//! - every child gets `PR_SET_PDEATHSIG(SIGKILL)`. The signal fires when the *thread* that
//!   forked the child exits, and libtest runs each test on its own short-lived thread, so
//!   all children are forked by one dedicated spawner thread that lives as long as the
//!   process. Children get their own process group, so a terminal's Ctrl-C reaches them
//!   only through the death of the test binary.
//! - statics are never dropped, so an `atexit` handler kills and reaps the children and
//!   removes their directories when the test binary exits (normally or via
//!   `process::exit`, which is how libtest reports failures).
//! - a control plane that is not shared is killed by `Drop`.
//! - directories left behind by a killed test binary (SIGKILL, Ctrl-C: no atexit) are
//!   removed by the next start ([`sweep_stale_dirs`]).
//!
//! Environment:
//! - `KIPS_E2E_BIN_DIR`: use these prebuilt binaries instead of running build.sh.
//! - `KIPS_E2E_TMPDIR`: where control-plane directories go (default: cargo's
//!   `target/tmp`).
//! - `KIPS_E2E_KEEP=1`: keep the directory (certs, kubeconfig, logs) after the run.
//! - `KIPS_E2E_START_TIMEOUT`: seconds to wait for readiness (default 90).
//!
//! Nothing here skips: if the binaries cannot be built or the control plane does not
//! start, the calling test fails (also, and especially, with `CI=true`).

use std::{
    env,
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex, OnceLock, TryLockError,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

pub use super::process::spawn_tied_to_process;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    Api, Client, Config,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};

/// Identity of the admin client certificate in the kubeconfig.
pub const ADMIN_USER: &str = "kips-e2e-admin";
/// `--service-cluster-ip-range` of the API server.
pub const SERVICE_CIDR: &str = "10.0.0.0/24";
const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const CONTROLLERS: &[&str] = &[
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "daemonset-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "namespace-controller",
    "garbage-collector-controller",
];

/// What a control plane is started with beyond the defaults of [`ControlPlane::start`]
/// (the test node, tests/support/node.rs, needs more names, identities and controllers).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Extra subject alternative names (IPs or DNS names) of the API server's certificate.
    pub apiserver_sans: Vec<String>,
    /// Extra flags of kube-apiserver.
    pub apiserver_args: Vec<String>,
    /// `--service-cluster-ip-range` (default: [`SERVICE_CIDR`]).
    pub service_cidr: Option<String>,
    /// The controller-manager's `--controllers` (default: [`CONTROLLERS`]).
    pub controllers: Option<Vec<String>>,
    /// Client certificates signed by the cluster CA, written as `<file>.crt`/`<file>.key` in
    /// [`ControlPlane::dir`].
    pub client_certs: Vec<ClientCert>,
}

/// A client certificate: common name (the user) and organisations (its groups).
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub file: String,
    pub common_name: String,
    pub organisations: Vec<String>,
}

/// The control plane shared by all tests of this test binary, started on first use.
/// A start failure is remembered: every later caller fails with the same message.
pub async fn shared() -> Result<&'static ControlPlane> {
    static SHARED: tokio::sync::OnceCell<Result<ControlPlane, String>> =
        tokio::sync::OnceCell::const_new();
    SHARED
        .get_or_init(|| async { ControlPlane::start().await.map_err(|e| format!("{e:#}")) })
        .await
        .as_ref()
        .map_err(|e| anyhow!("the shared control plane did not start: {e}"))
}

pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    bin_dir: PathBuf,
    ca_pem: String,
    config: Config,
    procs: Mutex<Vec<Proc>>,
}

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ControlPlane {
    /// Builds (or finds) the binaries and starts a fresh control plane. Prefer [`shared`].
    pub async fn start() -> Result<ControlPlane> {
        Self::start_with(&Options::default()).await
    }

    /// [`Self::start`] with more certificate names, flags, identities or controllers.
    pub async fn start_with(options: &Options) -> Result<ControlPlane> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bin_dir = tokio::task::spawn_blocking(bin_dir).await??;
        let mut attempt = 1;
        loop {
            match Self::start_once(&bin_dir, options).await {
                Ok(cp) => return Ok(cp),
                // Free ports are picked by binding port 0 and closing it; another process
                // may grab one before our child binds it. Rare: just try again.
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    eprintln!("control plane: port clash, retrying: {e:#}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn start_once(bin_dir: &Path, options: &Options) -> Result<ControlPlane> {
        let base = tmp_base();
        fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        sweep_stale_dirs_in(&base);
        let dir = tempfile::Builder::new()
            .prefix(&format!("kips-cp-{}-", std::process::id()))
            .tempdir_in(&base)?
            .keep();
        registry().dirs.push(dir.clone());

        let mut cp = ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            server: String::new(),
            bin_dir: bin_dir.to_owned(),
            ca_pem: String::new(),
            config: Config::new("https://127.0.0.1".parse()?),
            procs: Mutex::new(Vec::new()),
        };
        // From here on, an error drops `cp`, which kills what was started.
        let (etcd_port, peer_port, api_port, kcm_port) = {
            let ls: Vec<_> = (0..4)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .collect::<io::Result<_>>()?;
            let p = |i: usize| ls[i].local_addr().map(|a| a.port());
            (p(0)?, p(1)?, p(2)?, p(3)?)
        };
        cp.server = format!("https://127.0.0.1:{api_port}");
        cp.ca_pem = write_pki(&cp.dir, options)?;
        fs::write(&cp.kubeconfig, kubeconfig_yaml(&cp.dir, &cp.server))?;
        cp.config = Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&cp.kubeconfig)?,
            &KubeConfigOptions::default(),
        )
        .await?;

        let d = |f: &str| cp.dir.join(f).display().to_string();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        cp.spawn(
            "etcd",
            &[
                "--name=e2e".into(),
                format!("--data-dir={}", d("etcd")),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=e2e={peer_url}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        let apiserver_args = [
            format!("--etcd-servers={etcd_url}"),
            "--storage-backend=etcd3".into(),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", d("apiserver-certs")),
            format!("--tls-cert-file={}", d("apiserver.crt")),
            format!("--tls-private-key-file={}", d("apiserver.key")),
            format!("--client-ca-file={}", d("ca.crt")),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            format!("--service-account-issuer={SA_ISSUER}"),
            "--authorization-mode=Node,RBAC".into(),
            format!(
                "--service-cluster-ip-range={}",
                options.service_cidr.as_deref().unwrap_or(SERVICE_CIDR)
            ),
            // Default admission plugins already include ServiceAccount, PodSecurity,
            // MutatingAdmissionWebhook and ValidatingAdmissionWebhook.
            "--allow-privileged=true".into(),
            "--enable-priority-and-fairness=false".into(),
            // Endpoints may not hold loopback addresses: without this the apiserver
            // logs an error every 10 s trying to publish 127.0.0.1 for `kubernetes`.
            "--endpoint-reconciler-type=none".into(),
            "--profiling=false".into(),
        ];
        cp.spawn(
            "kube-apiserver",
            &[&apiserver_args[..], &options.apiserver_args[..]].concat(),
        )?;
        let timeout = env::var("KIPS_E2E_START_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(90));
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        // The controller-manager gives up if the apiserver is not healthy within 10 s of
        // its start, which a loaded machine can miss: start it once the apiserver is ready.
        let mut probe = cp.config.clone();
        probe.read_timeout = Some(Duration::from_secs(5));
        cp.wait_for(
            "kube-apiserver",
            &Client::try_from(probe)?,
            "/readyz",
            deadline,
        )
        .await?;
        cp.spawn(
            "kube-controller-manager",
            &[
                format!("--kubeconfig={}", d("kubeconfig")),
                format!(
                    "--controllers={}",
                    match &options.controllers {
                        Some(list) => list.join(","),
                        None => CONTROLLERS.join(","),
                    }
                ),
                format!("--service-account-private-key-file={}", d("sa.key")),
                format!("--root-ca-file={}", d("ca.crt")),
                "--use-service-account-credentials=false".into(),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={kcm_port}"),
                format!("--tls-cert-file={}", d("kcm.crt")),
                format!("--tls-private-key-file={}", d("kcm.key")),
                "--profiling=false".into(),
            ],
        )?;
        let mut kcm = Config::new(format!("https://127.0.0.1:{kcm_port}").parse()?);
        kcm.root_cert = cp.config.root_cert.clone();
        kcm.read_timeout = Some(Duration::from_secs(5));
        cp.wait_for(
            "kube-controller-manager",
            &Client::try_from(kcm)?,
            "/healthz",
            deadline,
        )
        .await?;
        eprintln!(
            "control plane: ready in {:.1}s at {} ({})",
            t0.elapsed().as_secs_f64(),
            cp.server,
            cp.dir.display()
        );
        Ok(cp)
    }

    /// Starts `<bin dir>/<name> <args>` beside the control plane (log `<name>.log` in
    /// [`Self::dir`]), killed with it and checked by its readiness waits.
    pub fn spawn(&self, name: &'static str, args: &[String]) -> Result<()> {
        self.spawn_from(&self.bin_dir.join(name), name, args)
    }

    /// [`Self::spawn`] of a binary found elsewhere.
    pub fn spawn_from(&self, binary: &Path, name: &'static str, args: &[String]) -> Result<()> {
        let log = self.dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = spawn_tied_to_process(cmd).with_context(|| format!("starting {name}"))?;
        registry().pids.push(child.id() as libc::pid_t);
        self.procs.lock().unwrap().push(Proc { name, child, log });
        Ok(())
    }

    /// Polls `path` until it answers `ok`, failing early if any component exits.
    async fn wait_for(
        &self,
        name: &str,
        client: &Client,
        path: &str,
        deadline: Instant,
    ) -> Result<()> {
        loop {
            self.check_alive()?;
            let last = match client.request_text(get(path)?).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => body,
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!(
                    "{name} not ready in time (last answer of {path}: {last}); logs in {}\n{}",
                    self.dir.display(),
                    self.log_tails(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails with the logs when a component has exited.
    pub fn check_alive(&self) -> Result<()> {
        let exited = self
            .procs
            .lock()
            .unwrap()
            .iter_mut()
            .find_map(|p| Some((p.name, p.child.try_wait().ok()??)));
        if let Some((name, status)) = exited {
            bail!(
                "{name} exited ({status}); logs in {}\n{}",
                self.dir.display(),
                self.log_tails(40)
            );
        }
        Ok(())
    }

    /// A client for the admin user (system:masters), bound to the caller's tokio runtime.
    /// Make one per test: a `kube::Client` stops working when the runtime that created it
    /// ends, and every `#[tokio::test]` has its own runtime.
    pub fn client(&self) -> Result<Client> {
        Ok(Client::try_from(self.config.clone())?)
    }

    /// The admin client configuration (client certificate of `kips-e2e-admin`).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Admin kubeconfig (file paths to the certificates in [`Self::dir`]); for helm, kubectl.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The CA that signed the API server's serving certificate and the admin client's.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Where etcd, kube-apiserver, kube-controller-manager and helm are.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Certificates, kubeconfig, logs and etcd data of this control plane.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Process ids of etcd, kube-apiserver and kube-controller-manager.
    pub fn pids(&self) -> Vec<u32> {
        self.procs
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.child.id())
            .collect()
    }

    /// `helm` with this control plane's kubeconfig and helm's cache/config/data homes
    /// inside [`Self::dir`] (nothing is written to `$HOME`).
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("helm"));
        let home = self.dir.join("helm");
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// The last `lines` lines of every component's log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let procs = self.procs.lock().unwrap();
        let mut out = String::new();
        for p in procs.iter() {
            let text = fs::read_to_string(&p.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            out += &format!(
                "----- {} ({}) -----\n{}\n",
                p.name,
                p.log.display(),
                tail.join("\n")
            );
        }
        out
    }

    /// Creates a namespace named `<prefix>-<n>` (unique in this process) with `labels`,
    /// and waits until the serviceaccount controller made its `default` ServiceAccount
    /// (the ServiceAccount admission plugin refuses pods before that).
    pub async fn create_namespace_with_labels(
        &self,
        prefix: &str,
        labels: &[(&str, &str)],
    ) -> Result<String> {
        static N: AtomicU32 = AtomicU32::new(1);
        let name = format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed));
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            }
        }))?;
        Api::<Namespace>::all(self.client()?)
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        self.wait_for_default_service_account(&name).await?;
        Ok(name)
    }

    /// [`Self::create_namespace_with_labels`] without labels.
    pub async fn create_namespace(&self, prefix: &str) -> Result<String> {
        self.create_namespace_with_labels(prefix, &[]).await
    }

    /// Waits (up to 30 s) for the ServiceAccount `default` in `ns`.
    pub async fn wait_for_default_service_account(&self, ns: &str) -> Result<()> {
        let api = Api::<ServiceAccount>::namespaced(self.client()?, ns);
        let t0 = Instant::now();
        loop {
            if api.get_opt("default").await?.is_some() {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!(
                    "no ServiceAccount default in namespace {ns} after 30s\n{}",
                    self.log_tails(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        for p in procs.iter_mut() {
            let _ = p.child.kill();
        }
        let pids: Vec<libc::pid_t> = procs.iter().map(|p| p.child.id() as libc::pid_t).collect();
        for p in procs.iter_mut() {
            let _ = p.child.wait();
        }
        let mut reg = registry();
        reg.pids.retain(|p| !pids.contains(p));
        reg.dirs.retain(|d| d != &self.dir);
        drop(reg);
        if !keep_dirs() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn get(path: &str) -> Result<hyper::Request<Vec<u8>>> {
    Ok(hyper::Request::get(path).body(Vec::new())?)
}

/// The directory with the four binaries: `KIPS_E2E_BIN_DIR`, or the output of
/// tests/controlplane/build.sh (run once per process; a no-op when up to date).
pub fn bin_dir() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| find_or_build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn find_or_build() -> Result<PathBuf> {
    let dir = match env::var_os("KIPS_E2E_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/controlplane/build.sh");
            // stderr is inherited: a cold build takes minutes and says so.
            let out = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
                .with_context(|| format!("running {}", script.display()))?;
            if !out.status.success() {
                bail!(
                    "{} failed ({}): the control-plane binaries could not be built (output above)",
                    script.display(),
                    out.status
                );
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
        }
    };
    for b in ["etcd", "kube-apiserver", "kube-controller-manager", "helm"] {
        if !dir.join(b).is_file() {
            bail!("{} has no {b}", dir.display());
        }
    }
    Ok(dir)
}

// ---------------------------------------------------------------------------------------
// Certificates

fn write_pki(dir: &Path, options: &Options) -> Result<String> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "kips-e2e-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let ca_pem = ca.pem();
    fs::write(dir.join("ca.crt"), &ca_pem)?;

    let leaf = |file: &str, cn: &str, orgs: &[&str], sans: &[&str], eku| -> Result<()> {
        let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        p.distinguished_name.push(DnType::CommonName, cn);
        for o in orgs {
            p.distinguished_name.push(DnType::OrganizationName, *o);
        }
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca)?;
        fs::write(dir.join(format!("{file}.crt")), cert.pem())?;
        fs::write(dir.join(format!("{file}.key")), key.serialize_pem())?;
        Ok(())
    };
    let server = ExtendedKeyUsagePurpose::ServerAuth;
    let mut apiserver_sans = vec![
        "127.0.0.1",
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "10.0.0.1",
    ];
    apiserver_sans.extend(options.apiserver_sans.iter().map(String::as_str));
    leaf(
        "apiserver",
        "kube-apiserver",
        &[],
        &apiserver_sans,
        server.clone(),
    )?;
    leaf(
        "kcm",
        "kube-controller-manager",
        &[],
        &["127.0.0.1", "localhost"],
        server,
    )?;
    leaf(
        "admin",
        ADMIN_USER,
        &["system:masters"],
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    for cert in &options.client_certs {
        let orgs: Vec<&str> = cert.organisations.iter().map(String::as_str).collect();
        leaf(
            &cert.file,
            &cert.common_name,
            &orgs,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
    }
    // ECDSA P-256 (ES256) service-account signing key. --service-account-key-file does
    // not read PKCS#8 private keys, hence the separate public key.
    let sa = KeyPair::generate()?;
    fs::write(dir.join("sa.key"), sa.serialize_pem())?;
    fs::write(dir.join("sa.pub"), sa.public_key_pem())?;
    Ok(ca_pem)
}

fn kubeconfig_yaml(dir: &Path, server: &str) -> String {
    kubeconfig_for(dir, server, ADMIN_USER, "admin")
}

/// A kubeconfig for `server` as `user`, whose certificate is `<cert>.crt`/`<cert>.key` in
/// `dir` (the CA is `dir/ca.crt`).
pub fn kubeconfig_for(dir: &Path, server: &str, user: &str, cert: &str) -> String {
    let f = |n: &str| dir.join(n).display().to_string();
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kips-e2e
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    client-certificate: {crt}
    client-key: {key}
contexts:
- name: kips-e2e
  context:
    cluster: kips-e2e
    user: {user}
current-context: kips-e2e
",
        ca = f("ca.crt"),
        crt = f(&format!("{cert}.crt")),
        key = f(&format!("{cert}.key")),
    )
}

// ---------------------------------------------------------------------------------------
// Process lifetime

#[derive(Default)]
struct Registry {
    pids: Vec<libc::pid_t>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    AT_EXIT.call_once(|| unsafe {
        libc::atexit(kill_and_clean_at_exit);
    });
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

extern "C" fn kill_and_clean_at_exit() {
    let reg = match REGISTRY.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        // Another thread holds it while the process exits; PDEATHSIG still kills the
        // children, and the next start sweeps the directories.
        Err(TryLockError::WouldBlock) => return,
    };
    for &pid in &reg.pids {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for &pid in &reg.pids {
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
    if !keep_dirs() {
        for d in &reg.dirs {
            let _ = fs::remove_dir_all(d);
        }
    }
}

fn keep_dirs() -> bool {
    env::var_os("KIPS_E2E_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
}

fn tmp_base() -> PathBuf {
    env::var_os("KIPS_E2E_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")))
}

/// Removes the directories of control planes whose test process is gone (it was killed,
/// so its atexit handler did not run). Runs at every start; public for tests.
pub fn sweep_stale_dirs() {
    sweep_stale_dirs_in(&tmp_base());
}

fn sweep_stale_dirs_in(base: &Path) {
    if keep_dirs() {
        return;
    }
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("kips-cp-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if !process_alive(pid) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Whether `pid` runs; a zombie (dead, not yet reaped) does not.
fn process_alive(pid: libc::pid_t) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => !matches!(
            stat.rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next()),
            Some("Z" | "X")
        ),
        Err(_) => false,
    }
}
