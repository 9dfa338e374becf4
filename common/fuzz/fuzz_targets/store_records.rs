//! Records read back from disk: recovery-point records and block-map entries from the catalog,
//! pack headers, and the source's state (the pending cut, the base's info row).
#![no_main]
use libfuzzer_sys::fuzz_target;
use understudy_common::hash::BlockRef;
use understudy_common::cut::{BaseInfo, PendingCut};
use understudy_common::store::PointRecord;
use understudy_common::store::pack::check_header_bytes;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = PointRecord::decode(data) {
        let _ = PointRecord::decode(&p.encode()).expect("a decoded record re-encodes");
    }
    if let Some(r) = BlockRef::from_bytes(data) {
        assert_eq!(BlockRef::from_bytes(&r.to_bytes()), Some(r));
    }
    let _ = check_header_bytes(data, 1);
    let _ = postcard::from_bytes::<PendingCut>(data);
    let _ = postcard::from_bytes::<BaseInfo>(data);
});
