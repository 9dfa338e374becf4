//! Manifests: a stored bundle as read back from the store, and YAML documents from a manifest
//! directory or `apply --bundle` file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use understudy_kube::bundle::{Bundle, parse_documents};

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = Bundle::decode(data) {
        let _ = b.objects();
        let _ = b.digest();
    }
    if let Ok(objects) = parse_documents(data) {
        let _ = Bundle::from_objects(&objects);
    }
});
