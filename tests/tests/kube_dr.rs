//! Disaster recovery end to end on the two-cluster test bed: the writer application (two Block
//! PVCs and one Filesystem PVC written round-robin with sequence-numbered records) replicated by
//! the source agent's controller on the primary into the target agent on the standby, which runs
//! the populator and the Failover controller. Then the primary site goes down (its API server
//! stopped) and on the standby each retained point is drilled into a namespace of its own, with
//! the storage class mapped: a verifier pod reads the rebuilt PVCs and finds exactly a prefix of
//! the writer's sequence, longer at each point. Last, a real failover of the newest point runs
//! the writer on the standby in its own namespace, on the mapped class. And a planned migration:
//! the primary's source agent stops the writer, sends a final point and pauses its group; the
//! standby runs the writer from that point, which holds the last record written. And failback:
//! after a failover and more writes on the standby, the old primary's PVCs are brought to the
//! standby's state by basis writer pods, only the differing blocks travelling. The CSI driver
//! is the project's test driver (no reference driver is served here); everything else is real.

use serde_json::Value;
use std::time::{Duration, Instant};
use understudy_e2e::node::{AGENTS_IMAGE, DRIVER, NodeCluster, PROGRAMS_IMAGE, STORAGE_CLASS};
use understudy_e2e::replication::{
    Bed, MIN, NS, assert_prefix, group_yaml, record_counts, records_of, start_writer, tail,
};
use understudy_e2e::{basis_difference, json, run, s};

/// The standby's storage class the primary's is mapped to.
const STANDBY_CLASS: &str = "understudy-standby";

fn failover_yaml(name: &str, mode: &str, point: &str, to: &str, scale_up: bool) -> String {
    format!(
        "apiVersion: understudy.io/v1alpha1\nkind: Failover\nmetadata: {{name: {name}, namespace: default}}\nspec: {{group: {NS}.writer, point: \"{point}\", mode: {mode}, namespaceMap: {{{NS}: {to}}}, storageClassMap: {{{STORAGE_CLASS}: {STANDBY_CLASS}}}, scaleUp: {scale_up}, timeout: 4m}}\n"
    )
}

/// The Failover once it has finished, Succeeded (or the test fails with its report).
async fn succeeded(bed: &Bed, name: &str) -> Value {
    let fo = understudy_e2e::standby::finished(&bed.standby, name, 5 * MIN)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\ntarget log:\n{}", tail(&bed.pair.target_log())));
    assert_eq!(fo["status"]["phase"], "Succeeded", "{fo}");
    let volumes = fo["status"]["report"]["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 3, "{fo}");
    assert!(volumes.iter().all(|v| v["verified"] == true), "{fo}");
    fo
}

/// The writer's record counts (data-a, data-b, logs) as a pod on the standby reads them from the
/// rebuilt claims in `ns`.
async fn records_in(c: &NodeCluster, ns: &str) -> Vec<u64> {
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: verify, namespace: {ns}}}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: {PROGRAMS_IMAGE}
    imagePullPolicy: Never
    args: [check-records, /dev/v0, /dev/v1, /data/records]
    volumeDevices: [{{name: a, devicePath: /dev/v0}}, {{name: b, devicePath: /dev/v1}}]
    volumeMounts: [{{name: logs, mountPath: /data}}]
  volumes:
  - {{name: a, persistentVolumeClaim: {{claimName: data-a}}}}
  - {{name: b, persistentVolumeClaim: {{claimName: data-b}}}}
  - {{name: logs, persistentVolumeClaim: {{claimName: logs}}}}
"#
    );
    let out = c
        .run_pod(&yaml, ns, "verify")
        .await
        .unwrap_or_else(|e| panic!("the verifier in {ns}: {e:#}"));
    record_counts(&out)
}

/// Makes the standby's storage class.
async fn standby_class(bed: &Bed) {
    bed.standby
        .create_yaml(&format!(
            "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {{name: {STANDBY_CLASS}}}\nprovisioner: {DRIVER}\nreclaimPolicy: Delete\nvolumeBindingMode: Immediate\n"
        ))
        .await
        .unwrap();
}

/// The two clusters, the writer on the primary replicated (group consistency) until point `seq`.
async fn replicating_writer(seq: u64) -> Option<Bed> {
    let mut bed = Bed::start_with_standby().await?;
    start_writer(&bed.primary).await;
    let target = bed.pair.addr.clone();
    bed.primary
        .create_yaml(&group_yaml("writer", "group", &target, ""))
        .await
        .unwrap();
    bed.start_controller();
    bed.wait_point("writer", seq, 4 * MIN).await;
    Some(bed)
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_primary_down_every_point_runs_on_the_standby_as_a_prefix_of_the_writer() {
    let Some(mut bed) = replicating_writer(3).await else {
        return;
    };
    bed.kill_controller();
    // The primary site goes down; nothing below may need it.
    bed.primary.stop_api_server();
    standby_class(&bed).await;
    let points = bed.pair.points(&format!("{NS}.writer"));
    assert!(points.len() >= 3, "{points:?}");
    let mut totals = Vec::new();
    for seq in &points {
        let ns = format!("{NS}-p{seq}");
        let name = format!("drill-{seq}");
        bed.standby
            .create_yaml(&failover_yaml(&name, "drill", &seq.to_string(), &ns, false))
            .await
            .unwrap();
        let fo = succeeded(&bed, &name).await;
        assert_eq!(fo["status"]["report"]["point"]["sequence"], *seq);
        let counts = records_in(&bed.standby, &ns).await;
        assert_prefix(&counts, &format!("point {seq} on the standby"));
        totals.push(counts.iter().sum::<u64>());
    }
    assert!(
        totals.windows(2).all(|w| w[0] < w[1]),
        "each point holds more of the writer's records than the one before: {totals:?}"
    );

    // The failover: the writer runs on the standby, in its own namespace, on the mapped class.
    bed.standby
        .create_yaml(&failover_yaml("now", "failover", "latest", NS, true))
        .await
        .unwrap();
    let fo = succeeded(&bed, "now").await;
    let report = &fo["status"]["report"];
    assert_eq!(report["point"]["sequence"], *points.last().unwrap());
    eprintln!(
        "failover of the writer (3 volumes of 32 MiB) with the primary down: RTO {} s, RPO {} s",
        report["rtoSeconds"], report["rpoSeconds"]
    );
    let deployment = bed
        .standby
        .get("apps/v1", "Deployment", NS, "writer")
        .await
        .unwrap()
        .expect("the writer's Deployment on the standby");
    assert_eq!(deployment["status"]["readyReplicas"], 1, "{deployment}");
    for claim in ["data-a", "data-b", "logs"] {
        let pvc = bed
            .standby
            .get("v1", "PersistentVolumeClaim", NS, claim)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pvc["spec"]["storageClassName"], STANDBY_CLASS, "{pvc}");
        assert_eq!(pvc["status"]["phase"], "Bound", "{pvc}");
    }
}

/// A `migrate` Failover: at its next cycle the primary's source agent scales the writer to zero,
/// waits until its pod is gone, commits one final point and pauses its group; the standby runs
/// the writer from that point (its replicas as on the primary), and the point holds exactly what
/// the stopped writer's Block volumes hold on the primary: the last record it wrote.
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_stops_the_writer_and_its_final_point_holds_the_last_record() {
    let Some(bed) = replicating_writer(1).await else {
        return;
    };
    standby_class(&bed).await;
    bed.standby
        .create_yaml(&failover_yaml("move", "migrate", "latest", NS, true))
        .await
        .unwrap();
    let fo = succeeded(&bed, "move").await;
    let report = &fo["status"]["report"];
    assert_eq!(report["finalState"], true, "{report}");
    let seq = report["point"]["sequence"].as_u64().unwrap();

    // The primary: group paused at that final point, the writer stopped.
    let g = bed.group("writer").await;
    assert_eq!(g["spec"]["paused"], true, "{g}");
    assert_eq!(g["status"]["migration"]["phase"], "Done", "{g}");
    assert_eq!(g["status"]["migration"]["finalPoint"], seq, "{g}");
    let d = bed
        .primary
        .get("apps/v1", "Deployment", NS, "writer")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d["spec"]["replicas"], 0, "{d}");
    let scratch = bed.pair.path("primary-records");
    std::fs::create_dir_all(&scratch).unwrap();
    let on_primary = records_of(
        [
            &bed.primary.claim_image(NS, "data-a").await.unwrap(),
            &bed.primary.claim_image(NS, "data-b").await.unwrap(),
            &bed.primary.claim_image(NS, "logs").await.unwrap(),
        ],
        &scratch,
    );
    let out = bed.pair.path("final");
    bed.pair
        .failover(&format!("{NS}.writer"), &seq.to_string(), &out, &[]);
    let img = |n: &str| out.join("volumes").join(format!("{NS}.{n}.img"));
    let in_point = records_of([&img("data-a"), &img("data-b"), &img("logs")], &out);
    assert_prefix(&in_point, "the final point");
    assert_eq!(
        in_point[..2],
        on_primary[..2],
        "the final point holds the last record the writer wrote (primary {on_primary:?})"
    );

    // The standby runs the writer as the primary did.
    let d = bed
        .standby
        .get("apps/v1", "Deployment", NS, "writer")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (&d["spec"]["replicas"], &d["status"]["readyReplicas"]),
        (&Value::from(1), &Value::from(1)),
        "{d}"
    );
    eprintln!(
        "migration of the writer (3 volumes of 32 MiB): {} s from the request to the writer ready on the standby",
        report["rtoSeconds"]
    );
}

/// Scales the writer's Deployment on `c` to zero and waits until its pod is gone (its volumes
/// unmounted).
async fn stop_writer(c: &NodeCluster) {
    let api: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(c.client().await.unwrap(), NS);
    let patch = serde_json::json!({"spec": {"replicas": 0}});
    api.patch(
        "writer",
        &Default::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + MIN;
    loop {
        let pods = c.names("v1", "Pod", NS).await.unwrap();
        if !pods.iter().any(|p| p.starts_with("writer-")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the writer's pod stays: {pods:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The target's points of `group` once it has more than `after` (none yet is fine).
async fn points_after(bed: &Bed, group: &str, after: usize) -> Vec<u64> {
    let deadline = Instant::now() + 4 * MIN;
    loop {
        let o = bed.pair.target_cmd(&["points", "--group", group, "--json"]);
        let points: Vec<u64> = if o.status.success() {
            json(&String::from_utf8_lossy(&o.stdout))
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["seq"].as_u64())
                .collect()
        } else {
            Vec::new()
        };
        if points.len() > after {
            return points;
        }
        assert!(
            Instant::now() < deadline,
            "no point {} of {group}:\nstandby controller:\n{}",
            after + 1,
            tail(
                &std::fs::read_to_string(bed.pair.path("standby-controller.log"))
                    .unwrap_or_default()
            )
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Failback: the primary goes down (its writer stops, its source agent too) and the writer is
/// failed over to the standby, where it writes more. A source agent on the standby replicates
/// it into the same target agent (group `shop.writer-back`); once the writer is stopped there
/// and a point holds its last writes, `target-agent failback` runs basis writer pods on the old
/// primary's PVCs (the Filesystem one through a Block view): only the blocks that differ travel,
/// as many as a count made here from the images, and the old primary's volumes end byte for byte
/// the standby's. Nothing of the failback is left on the primary.
#[tokio::test(flavor = "multi_thread")]
async fn failback_sends_only_the_differing_blocks_and_the_old_primary_ends_bit_exact() {
    let Some(mut bed) = replicating_writer(1).await else {
        return;
    };
    bed.kill_controller();
    stop_writer(&bed.primary).await;
    standby_class(&bed).await;
    bed.standby
        .create_yaml(&failover_yaml("now", "failover", "latest", NS, true))
        .await
        .unwrap();
    succeeded(&bed, "now").await;

    // Where the writer now runs, its volumes are replicated into the standby's target agent.
    let back = format!("{NS}.writer-back");
    bed.start_standby_controller().await;
    bed.standby
        .create_yaml(&group_yaml("writer-back", "group", &bed.pair.addr, ""))
        .await
        .unwrap();
    points_after(&bed, &back, 0).await;
    stop_writer(&bed.standby).await;
    // A point cut after the stop: two more than there were (one may have been under way).
    let now = points_after(&bed, &back, 0).await.len();
    let last = points_after(&bed, &back, now + 1).await;
    bed.kill_standby_controller();

    // What must travel, from the images: the claims' bytes on each side.
    let claims = ["data-a", "data-b", "logs"];
    let mut expected = Vec::new();
    for c in claims {
        let old = bed.primary.claim_image(NS, c).await.unwrap();
        let new = bed.standby.claim_image(NS, c).await.unwrap();
        let diff = basis_difference(&old, &new, 64 << 10);
        expected.push((old, new, diff));
    }

    let o = run(
        "target-agent",
        &[
            "failback",
            "--dir",
            s(&bed.pair.target_dir),
            "--group",
            &back,
            "--point",
            &last.last().unwrap().to_string(),
            "--kubeconfig",
            s(&bed.primary.kubeconfig),
            "--target",
            &bed.pair.addr,
            "--writer-image",
            AGENTS_IMAGE,
            "--timeout",
            "4m",
        ],
    );
    let report = json(&String::from_utf8_lossy(&o.stdout));
    assert!(
        o.status.success(),
        "failback: {report}\n{}\ntarget:\n{}",
        String::from_utf8_lossy(&o.stderr),
        tail(&bed.pair.target_log())
    );
    assert_eq!(report["ok"], true, "{report}");
    let (mut fetched, mut data) = (0, 0);
    for (k, (old, new, (fetch, zero, blocks))) in expected.iter().enumerate() {
        let v = report["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["claim"] == format!("{NS}/{}", claims[k]))
            .unwrap_or_else(|| panic!("no {} in {report}", claims[k]));
        assert_eq!(
            v["blocks"], *fetch,
            "only the blocks that differ travel: {v}"
        );
        assert_eq!(v["blocks_matched"], blocks - fetch, "{v}");
        assert_eq!(v["bytes_zeroed"], *zero, "{v}");
        assert!(
            std::fs::read(old).unwrap() == std::fs::read(new).unwrap(),
            "the old primary's {} holds the standby's bytes",
            claims[k]
        );
        (fetched, data) = (fetched + fetch, data + blocks);
    }
    assert!(
        fetched > 0 && fetched < data,
        "the standby's writes travel, not the whole volumes: {fetched} of {data} blocks"
    );
    eprintln!(
        "failback of the writer (3 volumes of 32 MiB): {fetched} of {data} data blocks fetched"
    );

    // Nothing of the failback is left on the primary.
    for (av, kind, ns) in [
        ("v1", "Pod", NS),
        ("v1", "Secret", NS),
        ("v1", "PersistentVolumeClaim", NS),
        ("v1", "PersistentVolume", ""),
    ] {
        let left: Vec<String> = bed
            .primary
            .names(av, kind, ns)
            .await
            .unwrap()
            .into_iter()
            .filter(|n| n.starts_with("understudy-failback-"))
            .collect();
        assert!(left.is_empty(), "{kind} left behind: {left:?}");
    }
}
