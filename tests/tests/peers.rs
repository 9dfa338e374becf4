//! Authenticated peers only (invariant 6): a source with an unpinned certificate is refused
//! during the handshake and writes nothing; a source pinned to another target refuses it; a peer
//! speaking another protocol version is told so; an expired certificate is refused even when
//! pinned; a certificate of the same CA with another identity is refused; a pinned peer that
//! sends garbage after the handshake is disconnected, and none of them writes to the store.

use understudy_common::protocol::{Control, codec};
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
        let addr = p.addr.parse().unwrap();
        ep.set_default_client_config(quic::client_config(&id, vec![tfp], addr).unwrap());
        let conn = ep.connect(addr, quic::SERVER_NAME).unwrap().await.unwrap();
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

/// Replaces an agent's identity with `cert` and `key` (what an operator does to use a
/// certificate from their own CA), and returns its fingerprint.
fn install_identity(
    dir: &std::path::Path,
    cert: &rcgen::Certificate,
    key: &rcgen::KeyPair,
) -> String {
    let id = dir.join("identity");
    std::fs::write(id.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(id.join("key.pem"), key.serialize_pem()).unwrap();
    ok("source-agent", &["identity", "--dir", s(dir)])
        .trim()
        .to_string()
}

/// Pins `fingerprint` as the target's source.
fn pin_source(p: &Pair, fingerprint: &str) {
    ok(
        "target-agent",
        &[
            "pair",
            "--dir",
            s(&p.target_dir),
            "--peer",
            fingerprint,
            "--name",
            "source",
        ],
    );
}

/// Runs one cycle of `dir`'s source against the pair's target; returns its stderr (it must fail).
fn refused_cycle(p: &Pair, dir: &std::path::Path) -> String {
    let v = p.path("v.img");
    sparse_image(&v, 4 << 20);
    write_random(&v, 0, 1 << 20, 1);
    let o = run(
        "source-agent",
        &[
            "run",
            "--dir",
            s(dir),
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
    assert!(!o.status.success(), "the cycle must be refused");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Nothing reached the store: no point, no pack.
fn nothing_written(p: &mut Pair) {
    p.kill_target();
    assert!(p.points("app").is_empty());
    let packs = std::fs::read_dir(p.target_dir.join("store/packs"))
        .unwrap()
        .count();
    assert_eq!(packs, 0, "a refused peer caused writes");
}

#[test]
fn an_expired_certificate_is_refused_even_when_pinned() {
    let mut p = Pair::new();
    let mut params = rcgen::CertificateParams::new(vec!["source".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2025, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let fp = install_identity(&p.source_dir, &cert, &key);
    pin_source(&p, &fp);
    p.start_target(&[]);
    let err = refused_cycle(&p, &p.source_dir);
    assert!(err.contains("expired") && err.contains("init"), "{err}");
    nothing_written(&mut p);
    let log = p.target_log();
    assert!(
        log.contains("certificate has expired") && log.contains("2025"),
        "{log}"
    );
}

#[test]
fn a_certificate_from_the_same_ca_with_another_identity_is_refused() {
    let mut p = Pair::new();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::Issuer::new(ca, rcgen::KeyPair::generate().unwrap());
    let issue = || {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["source".to_string()]).unwrap();
        (params.signed_by(&key, &ca).unwrap(), key)
    };
    // The pinned source holds one certificate of the CA; an impostor holds another one of the
    // same CA with the same name.
    let (cert, key) = issue();
    let fp = install_identity(&p.source_dir, &cert, &key);
    pin_source(&p, &fp);
    let impostor = p.path("impostor");
    ok("source-agent", &["init", "--dir", s(&impostor)]);
    let (cert2, key2) = issue();
    install_identity(&impostor, &cert2, &key2);
    let tfp = ok("target-agent", &["identity", "--dir", s(&p.target_dir)]);
    ok(
        "source-agent",
        &["pair", "--dir", s(&impostor), "--peer", tfp.trim()],
    );
    p.start_target(&[]);
    let err = refused_cycle(&p, &impostor);
    assert!(err.contains("refused this agent's certificate"), "{err}");
    // The pinned one, from the same CA, is accepted.
    let v = p.path("ok.img");
    sparse_image(&v, 1 << 20);
    p.cycle("other", &[("d", &v)], &[]);
    p.kill_target();
    assert!(p.points("app").is_empty());
    assert!(p.target_log().contains("not pinned"), "{}", p.target_log());
}

/// A pinned peer that completes the handshake and then sends garbage: each variant is refused or
/// disconnected with a logged reason, and nothing is written to the store.
#[test]
fn garbage_after_the_handshake_is_refused_and_writes_nothing() {
    understudy_common::transport::install_crypto_provider();
    let mut p = Pair::new();
    p.start_target(&[]);
    let id = Identity::load(&p.source_dir).unwrap();
    let tfp: understudy_common::transport::Fingerprint =
        ok("target-agent", &["identity", "--dir", s(&p.target_dir)])
            .trim()
            .parse()
            .unwrap();
    let addr: std::net::SocketAddr = p.addr.parse().unwrap();
    let preamble_then = |tail: Vec<u8>| {
        codec::preamble()
            .iter()
            .copied()
            .chain(tail)
            .collect::<Vec<u8>>()
    };
    let variants: Vec<(&str, Vec<u8>)> = vec![
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        (
            "huge length",
            preamble_then(u32::MAX.to_be_bytes().to_vec()),
        ),
        (
            "bad message",
            preamble_then([0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff].to_vec()),
        ),
        (
            "offer before hello",
            preamble_then(codec::encode(&Control::Commit {
                data_streams: 1,
                chunks: 1,
                final_for: None,
            })),
        ),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, bytes) in variants {
        let closed = rt.block_on(async {
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            ep.set_default_client_config(
                quic::client_config(&id, vec![tfp.clone()], addr).unwrap(),
            );
            let conn = ep.connect(addr, quic::SERVER_NAME).unwrap().await.unwrap();
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            send.write_all(&bytes).await.unwrap();
            // A data stream of garbage frames too: it must not be stored either.
            if let Ok(mut d) = conn.open_uni().await {
                let _ = d
                    .write_all(&[understudy_common::protocol::DATA_STREAM_KIND])
                    .await;
                let _ = d.write_all(&[0x55; 4096]).await;
            }
            tokio::time::timeout(std::time::Duration::from_secs(20), conn.closed()).await
        });
        assert!(
            closed.is_ok(),
            "{name}: the target kept the connection open"
        );
    }
    nothing_written(&mut p);
    let log = p.target_log();
    assert!(log.contains("refused session"), "{log}");
    assert!(
        log.matches("session ended with an error").count() >= 3,
        "{log}"
    );
}
