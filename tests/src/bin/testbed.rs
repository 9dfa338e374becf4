//! `understudy-testbed`: brings up the two-cluster test bed by hand (primary and standby, each a
//! node with storage; see understudy_e2e::node), prints their kubeconfigs and keeps them until
//! SIGTERM or Ctrl-C, then tears both down and leaves the host as it was.
//! tests/kube-testbed/up.sh and down.sh run it in the background.

use anyhow::{Context, Result};
use understudy_e2e::node::NodeCluster;

#[tokio::main]
async fn main() -> Result<()> {
    let state = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .context("usage: understudy-testbed STATE_DIR")?;
    std::fs::create_dir_all(&state)?;
    let t0 = std::time::Instant::now();
    let (primary, standby) = tokio::join!(NodeCluster::start(), NodeCluster::start());
    let (Some(primary), Some(standby)) = (primary?, standby?) else {
        anyhow::bail!(
            "the node test bed is not available on this machine (see the SKIP line above)"
        );
    };
    for (name, c) in [("primary", &primary), ("standby", &standby)] {
        let to = state.join(format!("{name}.kubeconfig"));
        std::fs::copy(&c.kubeconfig, &to)?;
        println!(
            "{name}: node {} at {}, pods on {}/24, kubeconfig {}",
            c.node_name,
            c.url,
            c.bridge_ip,
            to.display()
        );
    }
    println!(
        "both clusters up in {:.1} s; stop with tests/kube-testbed/down.sh (or Ctrl-C)",
        t0.elapsed().as_secs_f64()
    );
    std::fs::write(state.join("ready"), "")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
    println!("tearing down");
    drop((primary, standby));
    let _ = std::fs::remove_file(state.join("ready"));
    Ok(())
}
