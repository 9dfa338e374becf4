//! Authenticated peers only (invariant 6): a source with an unpinned certificate is refused
//! during the handshake and writes nothing; a source pinned to another target refuses it; a peer
//! speaking another protocol version is told so.

use understudy_common::protocol::codec;
use understudy_common::transport::{Identity, quic};
use understudy_e2e::*;

#[test]
fn an_unpinned_source_is_refused_and_writes_nothing() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let stranger = p.path("stranger");
    ok("source-agent", &["init", "--dir", s(&stranger)]);
    let tfp = ok("target-agent", &["identity", "--dir", s(&p.target_dir)]);
    ok(
        "source-agent",
        &["pair", "--dir", s(&stranger), "--peer", tfp.trim()],
    );
    let v = p.path("v.img");
    sparse_image(&v, 4 << 20);
    write_random(&v, 0, 1 << 20, 1);
    let o = run(
        "source-agent",
        &[
            "run",
            "--dir",
            s(&stranger),
            "--group",
            "app",
            "--target",
            &p.addr,
            "--volume",
            &format!("d={}", s(&v)),
            "--once",
            "--max-retries",
            "0",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("refused this agent's certificate") && err.contains("pair --peer"),
        "{err}"
    );
    p.kill_target();
    assert!(
        p.target_log().contains("refused connection"),
        "the refusal is logged: {}",
        p.target_log()
    );
    assert!(p.points("app").is_empty());
    let packs = std::fs::read_dir(p.target_dir.join("store/packs"))
        .unwrap()
        .count();
    assert_eq!(packs, 0, "a refused peer caused writes");
}

#[test]
fn a_source_refuses_a_target_it_did_not_pin() {
    let mut p = Pair::new();
    let other = p.path("other-target");
    let ofp = ok("target-agent", &["init", "--dir", s(&other)]);
    ok(
        "source-agent",
        &[
            "pair",
            "--dir",
            s(&p.source_dir),
            "--peer",
            ofp.trim(),
            "--name",
            "target",
        ],
    );
    p.start_target(&[]);
    let v = p.path("v.img");
    sparse_image(&v, 1 << 20);
    let args = p.source_args("app", &[("d", &v)], &[]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run("source-agent", &refs);
    assert!(
        !o.status.success(),
        "the source talked to a target it had not pinned"
    );
    p.kill_target();
    assert!(p.points("app").is_empty());
}

#[test]
fn another_protocol_version_is_refused_with_both_versions_named() {
    understudy_common::transport::install_crypto_provider();
    let mut p = Pair::new();
    p.start_target(&[]);
    let id = Identity::load(&p.source_dir).unwrap();
    let tfp = ok("target-agent", &["identity", "--dir", s(&p.target_dir)])
        .trim()
        .parse()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reply = rt.block_on(async {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quic::client_config(&id, vec![tfp]).unwrap());
        let conn = ep
            .connect(p.addr.parse().unwrap(), quic::SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"UNDR\x00\x63").await.unwrap(); // version 99
        let mut b = [0u8; 6];
        recv.read_exact(&mut b).await.unwrap();
        b
    });
    let err = codec::check_preamble(&reply).err();
    assert_eq!(err, None, "the target answers with its own preamble");
    let ours = codec::check_preamble(b"UNDR\x00\x63")
        .unwrap_err()
        .to_string();
    assert!(ours.contains("99") && ours.contains("upgrade"), "{ours}");
    p.kill_target();
    assert!(
        p.target_log().contains("protocol version 99"),
        "{}",
        p.target_log()
    );
}
