//! The archive tier: a store's recovery points in an S3-compatible bucket, from which a standby
//! can be rebuilt when its own disk is gone (docs/store-format.md, "Archive"). The store knows
//! nothing of it: the archiver copies sealed packs and catalog snapshots behind the commits.

pub mod archiver;
pub mod bucket;
pub mod keys;
pub mod layout;
pub mod restore;
pub mod sealed;
pub mod verify;

pub use archiver::{Archiver, Policy};
pub use aws_sdk_s3::config::Credentials;
pub use bucket::{Bucket, BucketArgs};
pub use keys::KeyArgs;
