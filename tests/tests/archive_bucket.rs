//! The archive's bucket client (understudy_archive::Bucket) against a real S3 server: versitygw
//! on 127.0.0.1 (understudy_e2e::s3). Objects, conditional creation, listing under a prefix,
//! refused credentials named, and a multipart upload cut by the server's death that a second run
//! continues without sending again the parts the server holds.

use std::time::Duration;
use understudy_archive::{Bucket, Credentials};
use understudy_e2e::s3::{BUCKET, S3Server};

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread")]
async fn objects_are_written_once_when_asked_listed_under_the_prefix_and_deleted() {
    let Some(s3) = S3Server::start().await else {
        return;
    };
    let b = s3.bucket_at("arch");
    b.put("a/1", b"one".to_vec()).await.unwrap();
    assert!(b.put_new("a/2", b"two".to_vec()).await.unwrap());
    assert!(
        !b.put_new("a/2", b"other".to_vec()).await.unwrap(),
        "If-None-Match: * let an object be replaced"
    );
    assert_eq!(b.get("a/2").await.unwrap().as_deref(), Some(&b"two"[..]));
    assert_eq!(b.get("a/none").await.unwrap(), None);
    let names = |l: Vec<understudy_archive::bucket::Object>| {
        l.into_iter().map(|o| (o.name, o.size)).collect::<Vec<_>>()
    };
    assert_eq!(
        names(b.list("a/").await.unwrap()),
        [("a/1".to_string(), 3), ("a/2".to_string(), 3)]
    );
    assert_eq!(
        names(s3.bucket().list("").await.unwrap()),
        [("arch/a/1".to_string(), 3), ("arch/a/2".to_string(), 3)],
        "the prefix is where the objects are"
    );
    b.delete("a/1").await.unwrap();
    assert_eq!(names(b.list("a/").await.unwrap()), [("a/2".to_string(), 3)]);

    let wrong = Bucket::connect(
        &s3.args("arch"),
        BUCKET,
        Credentials::new("understudy-test", "not-the-secret", None, None, "test"),
    );
    let e = format!("{:#}", wrong.get("a/2").await.unwrap_err());
    assert!(e.contains("GET s3://standby/arch/a/2 failed"), "{e}");
    assert!(e.contains("check the credentials"), "{e}");
}

/// `len` bytes that differ from MiB to MiB.
fn data(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(b"archive bucket test")
        .finalize_xof()
        .fill(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_cut_by_the_servers_death_continues_with_the_parts_it_had() {
    let Some(mut s3) = S3Server::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pack");
    let body = data(400 * MIB);
    std::fs::write(&file, &body).unwrap();
    let parts = (body.len() as u64).div_ceil(understudy_archive::bucket::PART_SIZE) as u32;
    let b = s3.bucket();
    // The server dies once it holds two parts of an upload; on loopback an upload can outrun
    // the watch, so a name is tried again until one is cut.
    let mut cut = None;
    for attempt in 0..3 {
        let name = format!("packs/{attempt:08}.pack");
        let (up, f) = (b.clone(), file.clone());
        let n = name.clone();
        let len = body.len() as u64;
        let upload = tokio::spawn(async move { up.upload_file(&n, &f, len).await });
        let held = loop {
            let ups = b.uploads("packs/").await.unwrap_or_default();
            let mut held = 0;
            for (n, id) in ups.iter().filter(|(n, _)| *n == name) {
                held = b.parts_of(n, id).await.map(|p| p.len()).unwrap_or(0);
            }
            if held >= 2 || upload.is_finished() {
                break held;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if held >= 2 {
            s3.stop();
            let r = upload.await.unwrap();
            assert!(r.is_err(), "the upload went on without its server");
            cut = Some(name);
            break;
        }
        upload.await.unwrap().unwrap();
    }
    let name = cut.expect("no upload was cut in three tries");
    s3.restart();
    let r = b
        .upload_file(&name, &file, body.len() as u64)
        .await
        .unwrap();
    eprintln!("resumed: {r:?}");
    assert!(r.parts_resumed >= 2, "{r:?}");
    assert_eq!(r.parts_resumed + r.parts_sent, parts, "{r:?}");
    assert!(
        r.bytes_sent < body.len() as u64,
        "sent in full again: {r:?}"
    );
    let back = dir.path().join("back");
    assert_eq!(
        b.download_file(&name, &back).await.unwrap(),
        body.len() as u64
    );
    assert!(std::fs::read(&back).unwrap() == body, "the object differs");
    assert!(b.uploads("packs/").await.unwrap().is_empty());
}
