//! Command-line pieces both agents share: identity creation, display and pairing.

use crate::transport::{Fingerprint, Identity, Peers};
use anyhow::Result;
use std::path::PathBuf;

/// `init`: create this agent's identity.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Agent state directory (identity, peers, store or source state).
    #[arg(long, env = "UNDERSTUDY_DIR")]
    pub dir: PathBuf,
    /// Name written into the certificate (for people; peers are pinned by fingerprint).
    #[arg(long, default_value = "understudy-agent")]
    pub name: String,
}

/// `identity`: print this agent's fingerprint.
#[derive(clap::Args, Debug)]
pub struct IdentityArgs {
    /// Agent state directory.
    #[arg(long, env = "UNDERSTUDY_DIR")]
    pub dir: PathBuf,
}

/// `pair`: pin a peer's certificate fingerprint.
#[derive(clap::Args, Debug)]
pub struct PairArgs {
    /// Agent state directory.
    #[arg(long, env = "UNDERSTUDY_DIR")]
    pub dir: PathBuf,
    /// The peer's fingerprint, as its `init` or `identity` printed it (sha256:...).
    #[arg(long)]
    pub peer: Fingerprint,
    /// A name for the peer.
    #[arg(long, default_value = "peer")]
    pub name: String,
}

/// The identity subcommands both agents have.
#[derive(clap::Subcommand, Debug)]
pub enum IdentityCommand {
    /// Create this agent's identity (certificate and key) and print its fingerprint.
    Init(InitArgs),
    /// Print this agent's fingerprint.
    Identity(IdentityArgs),
    /// Pin a peer agent's fingerprint: this agent talks to no other.
    Pair(PairArgs),
}

impl IdentityCommand {
    /// Runs the subcommand.
    pub fn run(&self) -> Result<()> {
        match self {
            IdentityCommand::Init(a) => init(a),
            IdentityCommand::Identity(a) => identity(a),
            IdentityCommand::Pair(a) => pair(a),
        }
    }
}

/// Runs `init`.
pub fn init(a: &InitArgs) -> Result<()> {
    let id = Identity::init(&a.dir, &a.name)?;
    println!("{}", id.fingerprint);
    eprintln!(
        "identity created in {}; give this fingerprint to the peer's `pair --peer`",
        a.dir.join("identity").display()
    );
    Ok(())
}

/// Runs `identity`.
pub fn identity(a: &IdentityArgs) -> Result<()> {
    println!("{}", Identity::load(&a.dir)?.fingerprint);
    Ok(())
}

/// Runs `pair`.
pub fn pair(a: &PairArgs) -> Result<()> {
    let peers = Peers::pair(&a.dir, &a.name, a.peer.clone())?;
    eprintln!(
        "paired with {} ({}); {} peer(s) pinned",
        a.name,
        a.peer,
        peers.peers.len()
    );
    Ok(())
}

/// An agent's identity and its pinned peers: from `identity` when given (a directory holding
/// `cert.pem`, `key.pem` and `peers.json`, such as a mounted Secret), else from the agent
/// directory `dir`; refuses to run with no peer.
pub fn credentials(
    dir: &std::path::Path,
    identity: Option<&std::path::Path>,
) -> Result<(Identity, Vec<Fingerprint>)> {
    match identity {
        None => Ok((Identity::load(dir)?, require_peers(dir)?)),
        Some(d) => {
            let id = Identity::load_mounted(d)?;
            anyhow::ensure!(
                d.join("peers.json").exists(),
                "no peers.json in {}: the identity Secret needs it (the file `pair` writes)",
                d.display()
            );
            Ok((id, require_peers(d)?))
        }
    }
}

/// Loads pinned peers, refusing to run with none.
pub fn require_peers(dir: &std::path::Path) -> Result<Vec<Fingerprint>> {
    let fps = Peers::load(dir)?.fingerprints();
    anyhow::ensure!(
        !fps.is_empty(),
        "no peer is paired in {}: run `pair --dir {} --peer <fingerprint>` first",
        dir.display(),
        dir.display()
    );
    Ok(fps)
}

/// Flags every agent command takes.
#[derive(clap::Args, Debug)]
pub struct GlobalArgs {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "UNDERSTUDY_LOG_FORMAT"
    )]
    pub log_format: crate::telemetry::LogFormat,
}

/// Runs an agent binary: installs the crypto provider, parses the command line, sets up logging,
/// runs the command and turns an error into `error: ...` on stderr and exit code 1.
pub fn run_main<C: clap::Parser>(
    global: fn(&C) -> &GlobalArgs,
    run: fn(C) -> Result<std::process::ExitCode>,
) -> std::process::ExitCode {
    crate::transport::install_crypto_provider();
    let _crash_points = crate::failpoint::setup();
    let cli = C::parse();
    crate::telemetry::init(global(&cli).log_format);
    run(cli).unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        std::process::ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mounted identity (the files of an agent directory side by side, as a Secret holds
    /// them) loads as the directory's own; one without peers.json is refused, naming the key.
    #[test]
    fn a_mounted_identity_is_the_agent_directorys() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::init(dir.path(), "standby").unwrap();
        let peer = Identity::ephemeral("primary").unwrap().0.fingerprint;
        Peers::pair(dir.path(), "primary", peer.clone()).unwrap();
        let mounted = tempfile::tempdir().unwrap();
        for (from, to) in [
            ("identity/cert.pem", "cert.pem"),
            ("identity/key.pem", "key.pem"),
            ("peers.json", "peers.json"),
        ] {
            std::fs::copy(dir.path().join(from), mounted.path().join(to)).unwrap();
        }
        let empty = tempfile::tempdir().unwrap();
        let (loaded, peers) = credentials(empty.path(), Some(mounted.path())).unwrap();
        assert_eq!(loaded.fingerprint, id.fingerprint);
        assert_eq!(peers, [peer]);

        std::fs::remove_file(mounted.path().join("peers.json")).unwrap();
        let Err(e) = credentials(empty.path(), Some(mounted.path())) else {
            panic!("an identity without peers.json was loaded");
        };
        let e = format!("{e:#}");
        assert!(e.contains("no peers.json in"), "{e}");
    }
}
