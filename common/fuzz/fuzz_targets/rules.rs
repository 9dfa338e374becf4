//! Transform rules files, then the parsed rules applied to a small bundle.
#![no_main]
use libfuzzer_sys::fuzz_target;
use understudy_kube::bundle::{Bundle, parse_documents};
use understudy_kube::transform::Rules;

const APP: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec:\n  replicas: 3\n  template:\n    spec:\n      containers: [{name: web, image: docker.io/library/nginx:1.27}]\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data, namespace: shop}\nspec: {storageClassName: fast, volumeName: pv-1}\n";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(rules) = Rules::parse(text) {
        let objects = parse_documents(APP.as_bytes()).expect("fixture parses");
        let bundle = Bundle::from_objects(&objects).expect("fixture bundles");
        let _ = rules.transform_bundle(&bundle);
    }
});
