//! Understudy's Kubernetes side: the manifest bundle a recovery point stores ([`bundle`]),
//! capturing an application from a cluster ([`capture`]), transforming it for the standby
//! ([`transform`]) and applying it there in dependency order ([`apply`]), over one client
//! ([`client`]).
//!
//! The core crate (`understudy-common`) does not depend on this one: a cut takes its manifests
//! through [`understudy_common::cut::ManifestSource`], implemented here by [`DirectoryManifests`]
//! (standalone mode) and [`ClusterManifests`].

pub mod agent_pods;
pub mod apply;
pub mod bundle;
pub mod capture;
pub mod client;
pub mod controller;
pub mod crd;
pub mod exec;
pub mod manifests;
pub mod snapshot_metadata;
pub mod snapshots;
pub mod transform;

pub use client::{Resolver, connect, is_namespaced};
pub use manifests::{ClusterManifests, DirectoryManifests};
