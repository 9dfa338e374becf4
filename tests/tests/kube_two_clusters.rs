//! Two node clusters at once (primary and standby), the only path between them the test bed's
//! own bridges, and the host left as it was found once both are gone. One test in this binary,
//! so nothing else changes the host while it looks.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;
use understudy_e2e::node::{NodeCluster, PROGRAMS_IMAGE};

/// What a test bed could leave behind on the host.
#[derive(Debug, PartialEq, Eq)]
struct HostState {
    sysctls: Vec<(String, String)>,
    iptables: String,
    mounts: BTreeSet<String>,
    loops: String,
    links: BTreeSet<String>,
    cgroups: BTreeSet<String>,
    paths: Vec<(String, bool)>,
}

fn output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

impl HostState {
    fn read() -> Self {
        let sysctls = [
            "vm/overcommit_memory",
            "vm/panic_on_oom",
            "kernel/panic",
            "kernel/panic_on_oops",
            "kernel/keys/root_maxkeys",
            "kernel/keys/root_maxbytes",
            "net/ipv4/ip_forward",
        ]
        .iter()
        .map(|s| {
            (
                s.to_string(),
                std::fs::read_to_string(format!("/proc/sys/{s}")).unwrap_or_default(),
            )
        })
        .collect();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .collect();
        let links = output("ip", &["-o", "link", "show"])
            .lines()
            .filter_map(|l| {
                l.split(": ")
                    .nth(1)
                    .map(|n| n.split('@').next().unwrap_or(n).to_string())
            })
            .collect();
        let mut cgroups = BTreeSet::new();
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            for e in std::fs::read_dir(h.path()).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    cgroups.insert(e.path().display().to_string());
                }
            }
        }
        let paths = [
            "/var/lib/kubelet",
            "/var/lib/cni",
            "/var/log/containers",
            "/var/log/pods",
            "/run/containerd",
            "/opt/containerd",
            "/var/lib/containerd",
            "/usr/libexec/kubernetes",
            "/etc/cni",
            "/run/netns",
        ]
        .iter()
        .map(|p| (p.to_string(), std::path::Path::new(p).exists()))
        .collect();
        HostState {
            sysctls,
            iptables: output("iptables", &["-S"]),
            mounts,
            loops: output("losetup", &["-a"]),
            links,
            cgroups,
            paths,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_at_once_a_pod_on_one_reaches_a_udp_port_on_the_other_and_the_host_is_left_as_found()
 {
    let before = HostState::read();
    {
        let (primary, standby) = tokio::join!(NodeCluster::start(), NodeCluster::start());
        let (Some(primary), Some(standby)) = (primary.unwrap(), standby.unwrap()) else {
            return;
        };
        assert_ne!(primary.bridge_ip, standby.bridge_ip);
        // The standby's UDP port: a hostNetwork pod on the host's address on the standby's own
        // bridge. The primary's pod reaches it through its bridge; nothing crosses eth0.
        let port = std::net::UdpSocket::bind((standby.bridge_ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target = format!("{}:{port}", standby.bridge_ip);
        standby
            .create_yaml(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: echo, namespace: default}}\nspec:\n  hostNetwork: true\n  terminationGracePeriodSeconds: 0\n  containers:\n  - name: main\n    image: {PROGRAMS_IMAGE}\n    imagePullPolicy: Never\n    args: [udp-echo, --bind, '{target}']\n"
            ))
            .await
            .unwrap();
        standby
            .wait_pod("default", "echo", "Running", Duration::from_secs(60))
            .await
            .unwrap();
        let log = primary
            .run_pod(
                &format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: ping, namespace: default}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {PROGRAMS_IMAGE}\n    imagePullPolicy: Never\n    args: [udp-ping, --to, '{target}', --message, from-the-primary]\n"
                ),
                "default",
                "ping",
            )
            .await
            .unwrap();
        assert_eq!(log.trim(), format!("reply from {target}: from-the-primary"));
        let pod = primary
            .get("v1", "Pod", "default", "ping")
            .await
            .unwrap()
            .unwrap();
        let pod_ip: std::net::Ipv4Addr = pod["status"]["podIP"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            pod_ip.octets()[..3],
            primary.bridge_ip.octets()[..3],
            "the pod is on the primary's own bridge"
        );
        let seen = standby.pod_logs("default", "echo").await.unwrap();
        assert!(
            seen.contains(&format!("from {pod_ip}:")),
            "the standby saw the pod's own address: {seen}"
        );
    }
    let after = HostState::read();
    assert_eq!(before, after, "the test bed left the host changed");
}
