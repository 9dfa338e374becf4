//! Generated code of the vendored protos (proto/).

#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

/// The CSI spec v1.12.0 (`csi.v1`).
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// The kubelet's plugin registration API (`pluginregistration`, v1).
pub mod registration {
    tonic::include_proto!("pluginregistration");
}
