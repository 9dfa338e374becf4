//! A single-node Kubernetes cluster with real storage, for tests that run pods or touch volumes:
//! etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and containerd (all
//! built or installed by `tests/kube-testbed/build.sh --node`), a CNI bridge network, and CSI
//! storage: the project's own test driver (`understudy-csi`, the one component that is not
//! upstream: no reference driver is served here) with the real csi-provisioner, csi-snapshotter,
//! snapshot-controller and csi-snapshot-metadata sidecars.
//!
//! Several run at once. Everything a node would share with the host is its own:
//! - a mount namespace (held by one process) with its own /run, overlays on /var/lib and
//!   /var/log (so /var/lib/kubelet/device-plugins, /var/lib/cni, /var/log/containers and
//!   /run/containerd are per node), its own /etc/hosts (the node name resolves to 127.0.0.1),
//!   and read-only copies of the sysctls the kubelet would otherwise write on the host;
//! - a cgroup root in every hierarchy (`/understudy-<id>`: the kubelet's `cgroupRoot`, and
//!   `system` beneath it for the node's daemons), so teardown finds every process;
//! - a bridge with its own /24; pods reach the host only over it, never the external interface;
//! - free loopback ports for every server.
//!
//! Dropping a [`NodeCluster`] (also on panic) stops the control plane's controllers, kills every
//! process in the node's cgroups, detaches its loop devices, removes the bridge and the cgroups
//! and lets the namespace (and every mount in it) go: the host is left as it was found.

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::oci::Image;
use crate::testbed::{Launcher, TestCluster, testbed_dir};

/// The test driver's name (StorageClass provisioner).
pub const DRIVER: &str = "csi.understudy.test";
/// The StorageClass every PVC gets by default.
pub const STORAGE_CLASS: &str = "understudy";
/// The default VolumeSnapshotClass.
pub const SNAPSHOT_CLASS: &str = "understudy-snapshots";
/// The VolumeGroupSnapshotClass.
pub const GROUP_SNAPSHOT_CLASS: &str = "understudy-groups";
/// The busybox tools image (`imagePullPolicy: Never`).
pub const TOOLS_IMAGE: &str = "understudy.local/tools:1";
/// The image holding the project's test programs (`understudy-testbed-tool`).
pub const PROGRAMS_IMAGE: &str = "understudy.local/programs:1";
/// The image of the agents (after [`NodeCluster::import_agents`]).
pub const AGENTS_IMAGE: &str = "understudy.local/agents:1";
/// The client role of external-snapshot-metadata v1.0.0 (deploy/snapshot-metadata-client-cluster-role.yaml).
pub const CBT_CLIENT_ROLE: &str = "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: external-snapshot-metadata-client-runner}
rules:
- apiGroups: [snapshot.storage.k8s.io]
  resources: [volumesnapshots, volumesnapshotcontents]
  verbs: [get, list, watch]
- apiGroups: [cbt.storage.k8s.io]
  resources: [snapshotmetadataservices]
  verbs: [get, list]
- apiGroups: [\"\"]
  resources: [serviceaccounts/token]
  verbs: [create, get]
";
const PAUSE_IMAGE: &str = "understudy.local/pause:1";

/// The sysctls the kubelet sets when they differ from what it wants; the node's namespace gets
/// read-only copies holding those values so the host's stay as they are.
const KUBELET_SYSCTLS: &[(&str, &str)] = &[
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// A running single-node cluster with storage. Dereferences to its [`TestCluster`] (API server,
/// kubeconfig, object helpers).
pub struct NodeCluster {
    /// The node's name (resolves to 127.0.0.1 inside the node's namespace).
    pub node_name: String,
    /// The host's address on the pod bridge: pods reach the host (and hostNetwork pods) here.
    pub bridge_ip: Ipv4Addr,
    /// The SnapshotMetadataService's address (`<bridge_ip>:PORT`) and the CA that signed it.
    pub snapshot_metadata: (String, String),
    /// The audience the snapshot-metadata sidecar checks tokens for.
    pub snapshot_metadata_audience: String,
    daemons: Vec<(String, Child)>,
    api: TestCluster,
    host: Host,
}

impl std::ops::Deref for NodeCluster {
    type Target = TestCluster;
    fn deref(&self) -> &TestCluster {
        &self.api
    }
}

impl Drop for NodeCluster {
    fn drop(&mut self) {
        // Controllers first, so nothing re-creates pods, then the node's daemons; the pods and
        // the containerd shims die with the cgroup sweep of `Host`.
        self.api.stop("kube-controller-manager");
        for (_, p) in self.daemons.iter_mut().rev() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl NodeCluster {
    /// Stops the API server (and the controller manager, which needs it): from then on the
    /// cluster is unreachable, as a primary site that went down. Its node's pods keep running.
    pub fn stop_api_server(&mut self) {
        self.api.stop("kube-controller-manager");
        self.api.stop("kube-apiserver");
    }

    /// Starts a cluster with one node and storage; `None` when the test bed cannot be built
    /// here (no Go, or not root) and this is not CI: the caller returns early.
    pub async fn start() -> Result<Option<Self>> {
        if !rustix::process::geteuid().is_root() {
            assert!(
                std::env::var("CI").is_err(),
                "the node test bed needs root in CI"
            );
            eprintln!("SKIP: a test-bed node needs root (mounts, loop devices, cgroups, a bridge)");
            return Ok(None);
        }
        let Some(bin) = node_testbed_dir() else {
            return Ok(None);
        };
        let t0 = Instant::now();
        let host = Host::create()?;
        let launcher = Launcher {
            ns_pid: host.ns_pid(),
            cgroup_procs: host.daemon_procs(),
        };
        let api = TestCluster::start_with(&bin, Some(launcher)).await?;
        let mut c = NodeCluster {
            node_name: host.node_name.clone(),
            bridge_ip: host.bridge_ip,
            snapshot_metadata: (String::new(), String::new()),
            snapshot_metadata_audience: format!("understudy-cbt-{}", host.id),
            daemons: Vec::new(),
            api,
            host,
        };
        let client = c.api.client().await?;
        c.api.install_crds(&client, &bin.join("node-crd")).await?;
        let step =
            |what: &str| eprintln!("test bed: {what} at {:.1} s", t0.elapsed().as_secs_f64());
        step("control plane up");
        c.start_containerd()?;
        c.import_images()?;
        step("containerd up, images imported");
        // The driver's registration socket exists before the kubelet starts, so the kubelet
        // registers it at once instead of after a retry back-off.
        c.start_storage(&bin)?;
        c.start_kubelet(&bin)?;
        c.wait_ready().await?;
        eprintln!(
            "test bed: node cluster {} ready in {:.1} s",
            c.node_name,
            t0.elapsed().as_secs_f64()
        );
        Ok(Some(c))
    }

    fn spawn(&mut self, name: &str, program: &Path, args: &[String]) -> Result<()> {
        let mut cmd = self.api.command(program);
        cmd.args(args).env("RUST_LOG", "info");
        let child = self.api.spawn_logged(name, &mut cmd)?;
        self.daemons.push((name.to_string(), child));
        Ok(())
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.host.dir.path().join(rel)
    }

    fn containerd_socket(&self) -> PathBuf {
        self.path("containerd/containerd.sock")
    }

    fn kubelet_root(&self) -> PathBuf {
        self.path("kubelet")
    }

    fn csi_socket(&self) -> PathBuf {
        self.kubelet_root()
            .join(format!("plugins/{DRIVER}/csi.sock"))
    }

    fn start_containerd(&mut self) -> Result<()> {
        let d = self.path("containerd");
        std::fs::create_dir_all(&d)?;
        let cni = self.path("cni");
        std::fs::create_dir_all(&cni)?;
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#,
            d = d.display(),
            cni = cni.display()
        );
        std::fs::write(d.join("config.toml"), config)?;
        let subnet = self.host.subnet;
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("understudy-{}", self.host.id),
            "plugins": [{
                "type": "bridge",
                "bridge": self.host.bridge,
                "isGateway": false,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("{subnet}/24"), "gateway": self.bridge_ip.to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0", "gw": self.bridge_ip.to_string()}],
                    "dataDir": self.path("cni-ipam").display().to_string(),
                },
            }],
        });
        std::fs::write(
            cni.join("10-understudy.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;
        let args = vec![format!("--config={}", d.join("config.toml").display())];
        self.spawn("containerd", Path::new("/usr/bin/containerd"), &args)?;
        wait_for_path(&self.containerd_socket(), "containerd", || {
            self.api.log_tail("containerd")
        })
    }

    fn import_images(&self) -> Result<()> {
        let images = [
            Image::pause(PAUSE_IMAGE)?,
            Image::tools(TOOLS_IMAGE)?,
            Image::new(PROGRAMS_IMAGE, &["/bin/understudy-testbed-tool"]).program(
                "/bin/understudy-testbed-tool",
                &crate::bin("understudy-testbed-tool"),
            )?,
        ];
        images.iter().try_for_each(|i| self.import(i))
    }

    /// Builds (when the binaries changed) and imports the image of the agents,
    /// [`AGENTS_IMAGE`]: `/bin/source-agent` and `/bin/target-agent` of this build. Not done at
    /// start: the debug binaries are large and only the tests that run agents in pods need it.
    pub fn import_agents(&self) -> Result<()> {
        let image = Image::new(AGENTS_IMAGE, &["/bin/target-agent"])
            .program("/bin/source-agent", &crate::bin("source-agent"))?
            .program("/bin/target-agent", &crate::bin("target-agent"))?;
        self.import(&image)
    }

    fn import(&self, image: &Image) -> Result<()> {
        let archive = image.archive(&images_cache())?;
        let out = Command::new("ctr")
            .arg(format!("--address={}", self.containerd_socket().display()))
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&archive)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "importing {} ({}) into containerd failed: {}",
                image.name(),
                archive.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn start_kubelet(&mut self, bin: &Path) -> Result<()> {
        let root = self.kubelet_root();
        let [port, healthz] = crate::free_ports();
        let config = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": port,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            "readOnlyPort": 0,
            "authentication": {"anonymous": {"enabled": true}, "webhook": {"enabled": false}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{}", self.host.cgroup),
            "failCgroupV1": false,
            "failSwapOn": false,
            "makeIPTablesUtilChains": false,
            "containerRuntimeEndpoint": format!("unix://{}", self.containerd_socket().display()),
            "volumePluginDir": self.path("volume-plugins").display().to_string(),
            "resolvConf": "/etc/resolv.conf",
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": false,
            "registerNode": true,
            "fileCheckFrequency": "1s",
            "syncFrequency": "5s",
            "nodeStatusUpdateFrequency": "2s",
        });
        let config_path = self.path("kubelet-config.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let args = vec![
            format!("--config={}", config_path.display()),
            format!("--kubeconfig={}", self.api.kubeconfig.display()),
            format!("--root-dir={}", root.display()),
            format!("--cert-dir={}", self.path("kubelet-pki").display()),
            format!("--hostname-override={}", self.node_name),
            // Not loopback (the kubelet refuses it): the host's address on the node's own bridge.
            format!("--node-ip={}", self.bridge_ip),
            "--v=2".into(),
        ];
        self.spawn("kubelet", &bin.join("kubelet"), &args)?;
        let args = vec![
            format!("--kubeconfig={}", self.api.kubeconfig.display()),
            format!(
                "--authentication-kubeconfig={}",
                self.api.kubeconfig.display()
            ),
            format!(
                "--authorization-kubeconfig={}",
                self.api.kubeconfig.display()
            ),
            "--secure-port=0".into(),
            "--leader-elect=false".into(),
        ];
        self.spawn("kube-scheduler", &bin.join("kube-scheduler"), &args)
    }

    fn start_storage(&mut self, bin: &Path) -> Result<()> {
        let csi = self.csi_socket();
        let kubeconfig = format!("--kubeconfig={}", self.api.kubeconfig.display());
        let driver_args = vec![
            format!("--endpoint={}", csi.display()),
            format!("--state-dir={}", self.path("csi-state").display()),
            format!("--name={DRIVER}"),
            format!("--node-id={}", self.node_name),
            format!(
                "--registration-dir={}",
                self.kubelet_root().join("plugins_registry").display()
            ),
            format!("--freezer-root=/sys/fs/cgroup/freezer/{}", self.host.cgroup),
        ];
        self.spawn(
            "understudy-csi",
            &crate::bin("understudy-csi"),
            &driver_args,
        )?;
        wait_for_path(&csi, "the CSI driver", || {
            self.api.log_tail("understudy-csi")
        })?;
        let csi_address = format!("--csi-address={}", csi.display());
        let common = vec![
            csi_address.clone(),
            kubeconfig.clone(),
            "--leader-election=false".into(),
            "--timeout=60s".into(),
        ];
        let mut provisioner = common.clone();
        provisioner.push("--default-fstype=ext4".into());
        self.spawn(
            "csi-provisioner",
            &bin.join("csi-provisioner"),
            &provisioner,
        )?;
        self.spawn("csi-snapshotter", &bin.join("csi-snapshotter"), &common)?;
        self.spawn(
            "snapshot-controller",
            &bin.join("snapshot-controller"),
            &[kubeconfig.clone(), "--leader-election=false".into()],
        )?;
        let (cert, key, ca) = self.snapshot_metadata_tls()?;
        let [port, http] = crate::free_ports();
        let metadata = vec![
            csi_address,
            kubeconfig,
            format!("--tls-cert={}", cert.display()),
            format!("--tls-key={}", key.display()),
            format!("--port={port}"),
            format!("--http-endpoint=127.0.0.1:{http}"),
            format!("--audience={}", self.snapshot_metadata_audience),
            "--timeout=60s".into(),
        ];
        self.spawn(
            "csi-snapshot-metadata",
            &bin.join("csi-snapshot-metadata"),
            &metadata,
        )?;
        // The sidecar listens on every interface: advertised on the pod bridge, so that
        // movers in pods reach it as well as processes on the host.
        self.snapshot_metadata = (format!("{}:{port}", self.bridge_ip), ca);
        Ok(())
    }

    /// A CA and a serving certificate for the snapshot-metadata sidecar on 127.0.0.1 and the
    /// host's address on the pod bridge.
    fn snapshot_metadata_tls(&self) -> Result<(PathBuf, PathBuf, String)> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key)?;
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::V4(self.bridge_ip)));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &rcgen::Issuer::new(ca_params, ca_key))?;
        let (cert_path, key_path) = (
            self.path("snapshot-metadata.crt"),
            self.path("snapshot-metadata.key"),
        );
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path, ca.pem()))
    }

    /// Waits for the node to be Ready and the driver registered, then creates the storage
    /// objects: CSIDriver, StorageClass (default), VolumeSnapshotClass (default),
    /// VolumeGroupSnapshotClass and SnapshotMetadataService.
    async fn wait_ready(&mut self) -> Result<()> {
        let (address, ca) = self.snapshot_metadata.clone();
        let objects = storage_objects(&address, &ca, &self.snapshot_metadata_audience);
        self.api
            .create_yaml(&objects)
            .await
            .context("creating the storage objects")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            self.check_daemons()?;
            let node = self.api.get("v1", "Node", "", &self.node_name).await?;
            let ready = node.as_ref().is_some_and(|n| {
                n["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            });
            let csinode = self
                .api
                .get("storage.k8s.io/v1", "CSINode", "", &self.node_name)
                .await?;
            let registered = csinode.as_ref().is_some_and(|n| {
                n["spec"]["drivers"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|d| d["name"] == DRIVER))
            });
            if ready && registered {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} not ready with the CSI driver registered after 120 s (ready: {ready}, registered: {registered}); kubelet log:\n{}",
                    self.node_name,
                    self.api.log_tail("kubelet")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn check_daemons(&mut self) -> Result<()> {
        for (name, p) in &mut self.daemons {
            if let Some(status) = p.try_wait()? {
                let name = name.clone();
                bail!("{name} exited ({status}):\n{}", self.api.log_tail(&name));
            }
        }
        Ok(())
    }

    /// The file holding a volume of the test driver, by its handle (a PV's
    /// `spec.csi.volumeHandle`).
    pub fn volume_image(&self, handle: &str) -> PathBuf {
        self.path("csi-state")
            .join("volumes")
            .join(format!("{handle}.img"))
    }

    /// The backing file of claim `namespace/name` (its PV's CSI volume, the test driver's file).
    pub async fn claim_image(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let claim = self
            .get("v1", "PersistentVolumeClaim", namespace, name)
            .await?
            .with_context(|| format!("no PVC {namespace}/{name}"))?;
        let volume = claim["spec"]["volumeName"].as_str().unwrap_or("");
        let pv = self
            .get("v1", "PersistentVolume", "", volume)
            .await?
            .with_context(|| format!("PVC {namespace}/{name} has no PV"))?;
        Ok(self.volume_image(pv["spec"]["csi"]["volumeHandle"].as_str().unwrap_or("")))
    }

    /// The last lines of a node daemon's or a control-plane component's log.
    pub fn log(&self, name: &str) -> String {
        self.api.log_tail(name)
    }
}

fn storage_objects(address: &str, ca: &str, audience: &str) -> String {
    use base64::Engine as _;
    format!(
        r#"apiVersion: storage.k8s.io/v1
kind: CSIDriver
metadata:
  name: {DRIVER}
spec:
  attachRequired: false
  podInfoOnMount: true
  volumeLifecycleModes: [Persistent]
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: {STORAGE_CLASS}
  annotations:
    storageclass.kubernetes.io/is-default-class: "true"
provisioner: {DRIVER}
reclaimPolicy: Delete
volumeBindingMode: Immediate
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: {SNAPSHOT_CLASS}
  annotations:
    snapshot.storage.kubernetes.io/is-default-class: "true"
driver: {DRIVER}
deletionPolicy: Delete
---
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshotClass
metadata:
  name: {GROUP_SNAPSHOT_CLASS}
  annotations:
    groupsnapshot.storage.kubernetes.io/is-default-class: "true"
driver: {DRIVER}
deletionPolicy: Delete
---
apiVersion: cbt.storage.k8s.io/v1beta1
kind: SnapshotMetadataService
metadata:
  name: {DRIVER}
spec:
  address: {address}
  audience: {audience}
  caCert: {}
"#,
        base64::engine::general_purpose::STANDARD.encode(ca)
    )
}

/// The node's share of the host: directory, namespace, cgroups, bridge. Dropped after the
/// cluster's processes are stopped.
struct Host {
    id: String,
    node_name: String,
    cgroup: String,
    bridge: String,
    subnet: Ipv4Addr,
    bridge_ip: Ipv4Addr,
    holder: Option<Child>,
    dir: tempfile::TempDir,
}

impl Host {
    fn create() -> Result<Host> {
        let dir = tempfile::Builder::new()
            .prefix("us-node-")
            .tempdir_in("/tmp")?;
        let id = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("us-node-")
            .to_lowercase();
        let id: String = id.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        let (bridge, subnet) = make_bridge()?;
        let o = subnet.octets();
        let mut host = Host {
            node_name: format!("node-{id}"),
            cgroup: format!("understudy-{id}"),
            bridge,
            subnet,
            bridge_ip: Ipv4Addr::new(o[0], o[1], o[2], 1),
            holder: None,
            dir,
            id,
        };
        host.make_cgroups()?;
        host.holder = Some(host.make_namespace()?);
        Ok(host)
    }

    fn ns_pid(&self) -> u32 {
        self.holder.as_ref().expect("namespace holder").id()
    }

    fn daemon_procs(&self) -> PathBuf {
        Path::new("/sys/fs/cgroup/pids")
            .join(&self.cgroup)
            .join("system/cgroup.procs")
    }

    /// `/understudy-<id>` in every cgroup hierarchy (the kubelet checks its root exists in each),
    /// and `system` beneath it in the pids hierarchy for the daemons.
    fn make_cgroups(&self) -> Result<()> {
        for h in hierarchies() {
            let dir = h.join(&self.cgroup);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
            if h.ends_with("cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    std::fs::write(dir.join(f), std::fs::read(h.join(f))?)?;
                }
            }
        }
        std::fs::create_dir_all(
            Path::new("/sys/fs/cgroup/pids")
                .join(&self.cgroup)
                .join("system"),
        )?;
        Ok(())
    }

    /// The mount namespace: a process made by `unshare` that sets up the node's mounts and then
    /// sleeps; the node's processes join it with nsenter.
    fn make_namespace(&self) -> Result<Child> {
        let d = self.dir.path();
        std::fs::write(
            d.join("hosts"),
            format!("127.0.0.1 localhost {}\n::1 localhost\n", self.node_name),
        )?;
        std::fs::create_dir_all(d.join("sysctl"))?;
        for (name, want) in KUBELET_SYSCTLS {
            let have =
                std::fs::read_to_string(Path::new("/proc/sys").join(name)).unwrap_or_default();
            if have.trim() != *want {
                std::fs::write(
                    d.join("sysctl").join(name.replace('/', ".")),
                    format!("{want}\n"),
                )?;
            }
        }
        let script = r#"set -eu
N=$1
mount -t tmpfs -o mode=755 understudy-run /run
for v in lib log; do
  mkdir -p "$N/overlay/$v/upper" "$N/overlay/$v/work"
  mount -t overlay "understudy-$v" -o "lowerdir=/var/$v,upperdir=$N/overlay/$v/upper,workdir=$N/overlay/$v/work" "/var/$v"
done
mount --bind "$N/hosts" /etc/hosts
for f in "$N"/sysctl/*; do
  [ -e "$f" ] || continue
  t=/proc/sys/$(basename "$f" | tr . /)
  mount --bind "$f" "$t"
  mount -o remount,bind,ro "$t"
done
mkdir -p "$N/kubelet"
mount --bind "$N/kubelet" "$N/kubelet"
mount --make-rshared "$N/kubelet"
echo ready
exec sleep infinity
"#;
        let mut child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(d)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running unshare")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "setting up the node's mount namespace failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(child)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        kill_cgroups(&self.cgroup);
        detach_loops_under(self.dir.path());
        if let Some(mut h) = self.holder.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        // The namespace's mounts go with its last process; a loop device under a mount that
        // was still held is detached once it is released (autoclear).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !loops_under(self.dir.path()).is_empty() && Instant::now() < deadline {
            detach_loops_under(self.dir.path());
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("ip")
            .args(["link", "delete", &self.bridge])
            .status();
        remove_cgroups(&self.cgroup);
    }
}

/// Every mounted cgroup hierarchy (v1 controllers, the named systemd one, the unified v2 one).
fn hierarchies() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

/// Every directory of a cgroup tree, deepest first.
fn cgroup_tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        out.push(d);
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// Kills every process in the node's cgroups (thawing frozen ones first, or SIGKILL waits).
fn kill_cgroups(name: &str) {
    for d in cgroup_tree(&Path::new("/sys/fs/cgroup/freezer").join(name)) {
        let _ = std::fs::write(d.join("freezer.state"), "THAWED");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut pids = Vec::new();
        for h in hierarchies() {
            for d in cgroup_tree(&h.join(name)) {
                let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                pids.extend(procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()));
            }
        }
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for p in pids {
            if let Some(pid) = rustix::process::Pid::from_raw(p) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn remove_cgroups(name: &str) {
    for h in hierarchies() {
        for d in cgroup_tree(&h.join(name)) {
            let _ = std::fs::remove_dir(&d);
        }
    }
}

/// Loop devices whose backing file is under `dir` (the driver's images, and the kubelet's own
/// loop devices over published block volumes).
fn loops_under(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let dir = dir.display().to_string();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, back) = (f.next()?, f.next()?);
            back.starts_with(&dir).then(|| name.to_string())
        })
        .collect()
}

/// Unmounts (lazily) everything mounted under `dir` in this mount namespace and detaches the
/// loop devices backed by files under it: the cleanup of a test that ran the CSI driver directly.
pub fn release_under(dir: &Path) {
    let root = dir.display().to_string();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&root))
        .collect();
    mounts.reverse();
    for m in mounts {
        let _ = Command::new("umount").arg("-l").arg(m).status();
    }
    detach_loops_under(dir);
}

fn detach_loops_under(dir: &Path) {
    for dev in loops_under(dir) {
        let _ = Command::new("losetup").arg("-d").arg(&dev).status();
    }
}

/// A bridge of the test bed's own with the first free 10.213.N.0/24; its .1 is the host's.
fn make_bridge() -> Result<(String, Ipv4Addr)> {
    for n in 1..=250u8 {
        let name = format!("usbr{n}");
        let added = Command::new("ip")
            .args(["link", "add", &name, "type", "bridge"])
            .output()?;
        if !added.status.success() {
            continue;
        }
        let subnet = Ipv4Addr::new(10, 213, n, 0);
        for args in [
            vec!["addr", "add", &format!("10.213.{n}.1/24"), "dev", &name],
            vec!["link", "set", &name, "up"],
        ] {
            let out = Command::new("ip").args(&args).output()?;
            if !out.status.success() {
                let _ = Command::new("ip").args(["link", "delete", &name]).status();
                bail!(
                    "ip {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        return Ok((name, subnet));
    }
    bail!("no free bridge name usbr1..usbr250: remove stale ones with `ip link delete usbrN`")
}

fn wait_for_path(path: &Path, what: &str, log: impl Fn() -> String) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if Instant::now() > deadline {
            bail!(
                "{what} did not create {} within 30 s:\n{}",
                path.display(),
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn images_cache() -> PathBuf {
    std::env::var_os("UNDERSTUDY_TESTBED_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/understudy/testbed"))
        })
        .unwrap_or_else(|| PathBuf::from("/tmp/understudy-testbed"))
        .join("images")
}

/// The test bed with its node parts (`build.sh --node`), built on first use.
pub fn node_testbed_dir() -> Option<PathBuf> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        testbed_dir()?;
        crate::built_by("kube-testbed/build.sh", &["--node"], "the node test bed")
    })
    .clone()
}

/// What a command run in a container returned.
pub use understudy_kube::exec::ExecOutput;

impl NodeCluster {
    /// Waits until a pod is in `phase` (`Running`, `Succeeded`), failing early if it fails.
    pub async fn wait_pod(
        &self,
        namespace: &str,
        name: &str,
        phase: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let pod = self.api.get("v1", "Pod", namespace, name).await?;
            let now = pod
                .as_ref()
                .and_then(|p| p["status"]["phase"].as_str().map(str::to_string))
                .unwrap_or_default();
            if now == phase {
                return Ok(pod.expect("a pod in a phase"));
            }
            if now == "Failed" || Instant::now() > deadline {
                let logs = self.pod_logs(namespace, name).await.unwrap_or_default();
                bail!(
                    "pod {namespace}/{name} is {now:?}, not {phase}: {}\nlogs: {logs}\nkubelet:\n{}",
                    pod.map(|p| p["status"].to_string()).unwrap_or_default(),
                    self.api.log_tail("kubelet")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A pod's log (its first container).
    pub async fn pod_logs(&self, namespace: &str, name: &str) -> Result<String> {
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(self.api.client().await?, namespace);
        let pod = pods.get(name).await?;
        let first = pod
            .spec
            .and_then(|s| s.containers.into_iter().next())
            .map(|c| c.name);
        let params = kube::api::LogParams {
            container: first,
            ..Default::default()
        };
        Ok(pods.logs(name, &params).await?)
    }

    /// Deletes every SnapshotMetadataService: the cluster then offers no changed-block
    /// tracking (the agents fall back to hash-diff).
    pub async fn remove_snapshot_metadata_services(&self) -> Result<()> {
        let api: kube::Api<kube::api::DynamicObject> = kube::Api::all_with(
            self.api.client().await?,
            &kube::api::ApiResource {
                group: "cbt.storage.k8s.io".into(),
                version: "v1beta1".into(),
                api_version: "cbt.storage.k8s.io/v1beta1".into(),
                kind: "SnapshotMetadataService".into(),
                plural: "snapshotmetadataservices".into(),
            },
        );
        for s in api.list(&Default::default()).await? {
            api.delete(&kube::ResourceExt::name_any(&s), &Default::default())
                .await?;
        }
        Ok(())
    }

    /// Runs a command in a container through `pods/exec` (the path hooks take: the agent's own
    /// [`understudy_kube::exec::exec`]), within two minutes.
    pub async fn exec(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        command: &[&str],
    ) -> Result<ExecOutput> {
        let command: Vec<String> = command.iter().map(|c| c.to_string()).collect();
        understudy_kube::exec::exec(
            &self.api.client().await?,
            namespace,
            pod,
            Some(container),
            &command,
            Duration::from_secs(120),
        )
        .await
    }
}

impl NodeCluster {
    /// Waits until an object exists and `ready` holds for it; returns it.
    pub async fn wait_for(
        &self,
        (api_version, kind): (&str, &str),
        namespace: &str,
        name: &str,
        timeout: Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let obj = self.api.get(api_version, kind, namespace, name).await?;
            if let Some(o) = obj.as_ref().filter(|o| ready(o)) {
                return Ok(o.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "{kind} {namespace}/{name} not ready after {timeout:?}: {}",
                    obj.map(|o| o.to_string())
                        .unwrap_or_else(|| "not found".into())
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Runs a pod to completion and returns its log; fails if it fails.
    pub async fn run_pod(&self, yaml: &str, namespace: &str, name: &str) -> Result<String> {
        self.api.create_yaml(yaml).await?;
        self.wait_pod(namespace, name, "Succeeded", Duration::from_secs(120))
            .await?;
        self.pod_logs(namespace, name).await
    }
}
