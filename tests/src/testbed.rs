//! The Kubernetes test bed: real etcd + kube-apiserver + kube-controller-manager on loopback, built
//! from their published Go modules by tests/kube-testbed/build.sh (cached outside the repo), like
//! controller-runtime's envtest. Each [`TestCluster`] has its own ports, certificates, token and
//! data directory, so several run side by side; dropping it (also on panic) kills the processes
//! and deletes everything.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use understudy_kube::apply::{ApplyOptions, apply};
use understudy_kube::bundle::{Bundle, ObjectId};

/// Where tests/kube-testbed/build.sh put the binaries, building them on first use; `None` (with
/// one line printed) when this machine cannot build them and this is not CI.
pub fn testbed_dir() -> Option<PathBuf> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let found = DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kube-testbed/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed (see its output above)",
                script.display()
            ));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    match found {
        Ok(dir) => Some(dir.clone()),
        Err(e) => {
            let no_go = Command::new("go").arg("version").output().is_err();
            assert!(
                std::env::var("CI").is_err(),
                "the Kubernetes test bed is required in CI: {e}"
            );
            if no_go {
                eprintln!(
                    "SKIP: Kubernetes tests need Go 1.26+ on PATH to build the test bed (tests/kube-testbed/build.sh)"
                );
            } else {
                eprintln!("SKIP: Kubernetes test bed unavailable: {e}");
            }
            None
        }
    }
}

/// A running API server with etcd and the controller manager.
pub struct TestCluster {
    /// Kubeconfig with a system:masters token for this API server.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    procs: Vec<(String, Child)>,
    dir: tempfile::TempDir,
    launcher: Option<Launcher>,
}

/// Starts a node cluster's processes inside its mount namespace and its cgroup (see
/// [`crate::node`]), so that they see the node's own /run, /var/lib, /var/log and /etc/hosts
/// and are all found again at teardown.
#[derive(Clone, Debug)]
pub(crate) struct Launcher {
    /// A process holding the mount namespace open.
    pub(crate) ns_pid: u32,
    /// The `cgroup.procs` file every process is put in before it starts.
    pub(crate) cgroup_procs: PathBuf,
}

impl Launcher {
    /// A command running `program` in the namespace and cgroup.
    pub(crate) fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(r#"echo $$ > "$0" && pid=$1 && shift && exec nsenter --mount=/proc/"$pid"/ns/mnt -- "$@""#)
            .arg(&self.cgroup_procs)
            .arg(self.ns_pid.to_string())
            .arg(program);
        c
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // Stop in reverse order: controller manager, API server, etcd.
        for (_, p) in self.procs.iter_mut().rev() {
            let _ = p.kill();
            let _ = p.wait();
        }
        if std::thread::panicking() {
            self.keep_logs();
        }
    }
}

impl TestCluster {
    /// After a failed test: copies the components' logs to target/testbed-logs/ (the cluster's
    /// own directory is still removed).
    fn keep_logs(&self) {
        let name = self.dir.path().file_name().unwrap_or_default();
        let to = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/testbed-logs")
            .join(name);
        if std::fs::create_dir_all(&to).is_err() {
            return;
        }
        for e in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(e.path(), to.join(e.file_name()));
            }
        }
        eprintln!("test bed: logs of the failed test kept in {}", to.display());
    }
}

struct Certs {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

fn write_certs(dir: &Path) -> Result<Certs> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "understudy test bed CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let mut srv_params = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes".into(),
        "kubernetes.default.svc".into(),
    ])?;
    for ip in ["127.0.0.1", "10.0.0.1"] {
        srv_params
            .subject_alt_names
            .push(SanType::IpAddress(ip.parse()?));
    }
    let srv_key = KeyPair::generate()?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let srv = srv_params.signed_by(&srv_key, &issuer)?;
    let sa = KeyPair::generate()?;
    let c = Certs {
        ca: dir.join("ca.crt"),
        server_cert: dir.join("apiserver.crt"),
        server_key: dir.join("apiserver.key"),
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
    };
    std::fs::write(&c.ca, ca.pem())?;
    std::fs::write(&c.server_cert, srv.pem())?;
    std::fs::write(&c.server_key, srv_key.serialize_pem())?;
    std::fs::write(&c.sa_key, sa.serialize_pem())?;
    std::fs::write(&c.sa_pub, sa.public_key_pem())?;
    Ok(c)
}

impl TestCluster {
    /// Starts a cluster and installs the snapshot CRDs; `None` when the test bed is unavailable
    /// outside CI (the caller returns early: the test is skipped with one printed line).
    pub async fn start() -> Result<Option<Self>> {
        let Some(bin) = testbed_dir() else {
            return Ok(None);
        };
        Self::start_with(&bin, None).await.map(Some)
    }

    /// Starts the control plane from the binaries in `bin`; with a launcher, inside a node's
    /// namespace and with the controllers a node needs (volume binding, node lifecycle).
    pub(crate) async fn start_with(bin: &Path, launcher: Option<Launcher>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("understudy-kube-")
            .tempdir()?;
        let root = dir.path().to_path_buf();
        let certs = write_certs(&root)?;
        let token = format!("{:032x}", rand_u128());
        std::fs::write(
            root.join("tokens.csv"),
            format!("{token},understudy-test,understudy-test,\"system:masters\"\n"),
        )?;
        let [etcd_port, peer_port, api_port] = crate::free_ports();
        let url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = root.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&url, &certs.ca, &token))?;
        let mut cluster = TestCluster {
            kubeconfig,
            url,
            procs: Vec::new(),
            dir,
            launcher,
        };
        let node = cluster.launcher.is_some();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        cluster.spawn(
            "etcd",
            cluster.command(&bin.join("etcd")).args([
                "--name=default",
                &format!("--data-dir={}", root.join("etcd").display()),
                &format!("--listen-client-urls={etcd_url}"),
                &format!("--advertise-client-urls={etcd_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync",
                "--log-level=warn",
            ]),
        )?;
        let p = |f: &Path| f.display().to_string();
        cluster.spawn(
            "kube-apiserver",
            cluster.command(&bin.join("kube-apiserver")).args([
                &format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                &format!("--secure-port={api_port}"),
                &format!("--cert-dir={}", root.join("apiserver-certs").display()),
                &format!("--tls-cert-file={}", p(&certs.server_cert)),
                &format!("--tls-private-key-file={}", p(&certs.server_key)),
                &format!("--client-ca-file={}", p(&certs.ca)),
                &format!("--token-auth-file={}", root.join("tokens.csv").display()),
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                &format!("--service-account-key-file={}", p(&certs.sa_pub)),
                &format!("--service-account-signing-key-file={}", p(&certs.sa_key)),
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                // A node's name resolves to 127.0.0.1 in its namespace's /etc/hosts; the API
                // server refuses to proxy exec and logs to a loopback InternalIP.
                "--kubelet-preferred-address-types=Hostname",
            ]),
        )?;
        let client = cluster.wait_ready().await?;
        let mut controllers = String::from(
            "namespace-controller,serviceaccount-controller,serviceaccount-token-controller,garbage-collector-controller,root-ca-certificate-publisher-controller,deployment-controller,replicaset-controller,statefulset-controller,clusterrole-aggregation-controller",
        );
        if node {
            controllers.push_str(",job-controller,persistentvolume-binder-controller,persistentvolume-protection-controller,persistentvolumeclaim-protection-controller,node-lifecycle-controller,persistentvolume-attach-detach-controller,endpoints-controller,endpointslice-controller");
        }
        cluster.spawn(
            "kube-controller-manager",
            cluster.command(&bin.join("kube-controller-manager")).args([
                &format!("--kubeconfig={}", cluster.kubeconfig.display()),
                "--secure-port=0",
                "--leader-elect=false",
                &format!("--controllers={controllers}"),
                &format!("--service-account-private-key-file={}", p(&certs.sa_key)),
                &format!("--root-ca-file={}", p(&certs.ca)),
                "--use-service-account-credentials=false",
            ]),
        )?;
        cluster.install_crds(&client, &bin.join("crd")).await?;
        Ok(cluster)
    }

    /// A command for `program`: plain, or inside the node's namespace.
    pub(crate) fn command(&self, program: &Path) -> Command {
        match &self.launcher {
            Some(l) => l.command(program),
            None => Command::new(program),
        }
    }

    /// Stops one component (SIGKILL), if it runs.
    pub(crate) fn stop(&mut self, name: &str) {
        for (n, p) in &mut self.procs {
            if n == name {
                let _ = p.kill();
                let _ = p.wait();
            }
        }
    }

    /// Starts a component whose output goes to `<dir>/<name>.log`.
    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<()> {
        let child = self.spawn_logged(name, cmd)?;
        self.procs.push((name.to_string(), child));
        Ok(())
    }

    /// Starts `cmd` with its output in `<dir>/<name>.log` (read back by [`Self::log_tail`]).
    pub(crate) fn spawn_logged(&self, name: &str, cmd: &mut Command) -> Result<Child> {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log")))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))
    }

    /// The last lines of a component's log (for failure messages).
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn wait_ready(&mut self) -> Result<kube::Client> {
        // Generous: on two busy cores etcd's fsyncs can hold the bootstrap hooks for a minute.
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut last = String::new();
        while Instant::now() < deadline {
            let mut exited = None;
            for (name, p) in &mut self.procs {
                if let Some(status) = p.try_wait()? {
                    exited = Some((name.clone(), status));
                }
            }
            if let Some((name, status)) = exited {
                bail!("{name} exited ({status}):\n{}", self.log_tail(&name));
            }
            match self.client().await {
                Ok(c) => {
                    let req = http::Request::get("/readyz").body(Vec::new())?;
                    match c.request_text(req).await {
                        Ok(t) if t.trim() == "ok" => return Ok(c),
                        Ok(t) => last = t,
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!(
            "kube-apiserver not ready after 180 s ({last}):\n{}",
            self.log_tail("kube-apiserver")
        )
    }

    /// A client for this API server.
    pub async fn client(&self) -> Result<kube::Client> {
        understudy_kube::connect(Some(&self.kubeconfig)).await
    }

    pub(crate) async fn install_crds(&self, client: &kube::Client, dir: &Path) -> Result<()> {
        let bundle = Bundle::capture(dir)?;
        let objects = bundle
            .objects()?
            .into_iter()
            .map(|o| Ok((ObjectId::of(&o)?, o)))
            .collect::<Result<Vec<_>>>()?;
        let report = apply(client, objects, &ApplyOptions::default()).await;
        if !report.ok() {
            bail!("installing the snapshot CRDs failed:\n{}", report.render());
        }
        Ok(())
    }
}

fn kubeconfig_yaml(url: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testbed\n  cluster:\n    server: {url}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: testbed\n  context:\n    cluster: testbed\n    user: admin\n    namespace: default\ncurrent-context: testbed\n",
        ca.display()
    )
}

pub(crate) fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).expect("getrandom");
    u128::from_le_bytes(b)
}

impl TestCluster {
    /// Creates every object of a YAML stream (plain POST, as `kubectl create` does).
    pub async fn create_yaml(&self, yaml: &str) -> Result<()> {
        let client = self.client().await?;
        let mut resolver = understudy_kube::Resolver::new(client.clone());
        for obj in understudy_kube::bundle::parse_documents(yaml.as_bytes())? {
            let id = ObjectId::of(&obj)?;
            let api = api_for(&client, &mut resolver, &obj, &id.namespace).await?;
            let obj: kube::api::DynamicObject = serde_json::from_value(obj)?;
            api.create(&Default::default(), &obj)
                .await
                .with_context(|| format!("creating {id}"))?;
        }
        Ok(())
    }

    /// Reads one object as JSON; `None` when it does not exist.
    pub async fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<serde_json::Value>> {
        let client = self.client().await?;
        let mut resolver = understudy_kube::Resolver::new(client.clone());
        let probe = serde_json::json!({"apiVersion": api_version, "kind": kind});
        let api = api_for(&client, &mut resolver, &probe, namespace).await?;
        Ok(api
            .get_opt(name)
            .await?
            .map(|o| serde_json::to_value(o).expect("JSON")))
    }

    /// Names of the objects of a kind in a namespace.
    pub async fn names(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
    ) -> Result<Vec<String>> {
        let client = self.client().await?;
        let mut resolver = understudy_kube::Resolver::new(client.clone());
        let probe = serde_json::json!({"apiVersion": api_version, "kind": kind});
        let api = api_for(&client, &mut resolver, &probe, namespace).await?;
        let list = api.list(&Default::default()).await?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|o| o.metadata.name)
            .collect())
    }
}

async fn api_for(
    client: &kube::Client,
    resolver: &mut understudy_kube::Resolver,
    obj: &serde_json::Value,
    namespace: &str,
) -> Result<kube::Api<kube::api::DynamicObject>> {
    let api_version = obj["apiVersion"].as_str().unwrap_or("");
    let kind = obj["kind"].as_str().unwrap_or("");
    let (ar, caps) = resolver.resolve(api_version, kind).await?;
    Ok(if understudy_kube::is_namespaced(&caps) {
        kube::Api::namespaced_with(client.clone(), namespace, &ar)
    } else {
        kube::Api::all_with(client.clone(), &ar)
    })
}
