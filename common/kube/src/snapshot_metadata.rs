//! A client of the Kubernetes SnapshotMetadata API (changed-block tracking): the allocated
//! blocks of a VolumeSnapshot and the blocks changed between two snapshots of one volume, as the
//! csi-snapshot-metadata sidecar of the snapshots' CSI driver serves them.
//!
//! The path (KEP-3314): read the cluster-scoped `SnapshotMetadataService` named after the driver
//! (its address, the audience it checks and the CA of its certificate), ask the API server for a
//! ServiceAccount token with that audience (TokenRequest), and call the sidecar over TLS with
//! the token in each request. The ServiceAccount needs the client role (get/list/watch
//! VolumeSnapshots and VolumeSnapshotContents, get/list SnapshotMetadataServices, create
//! serviceaccounts/token), or the sidecar answers PermissionDenied.

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The generated gRPC code of the API (`snapshotmetadata` package, external-snapshot-metadata
/// v1.0.0).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("snapshotmetadata");
}

/// A byte range of a volume: `[offset, offset + length)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

impl Extent {
    /// The byte after the range.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// One page of an answer: the volume's size and the ranges in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The volume's size in bytes.
    pub capacity: u64,
    /// Ranges, in order, never overlapping.
    pub extents: Vec<Extent>,
}

/// A connection to one driver's snapshot-metadata sidecar, as one ServiceAccount.
#[derive(Clone, Debug)]
pub struct SnapshotMetadata {
    client: proto::snapshot_metadata_client::SnapshotMetadataClient<Channel>,
    token: String,
}

/// What a client needs to call a driver's snapshot-metadata sidecar: its address, the CA of its
/// certificate and a token with its audience. The source agent finds these and hands them to a
/// mover in its ticket: the token is good for this API only (its audience), for minutes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Access {
    /// `host:port` of the sidecar.
    pub address: String,
    /// CA certificate (PEM) of the sidecar's certificate.
    pub ca_pem: String,
    /// A ServiceAccount token with the service's audience.
    pub token: String,
}

impl Access {
    /// Finds the driver's SnapshotMetadataService and gets a token for `service_account` in
    /// `namespace` with its audience. `Ok(None)` when the driver has no such service (no
    /// changed-block tracking).
    pub async fn discover(
        kube: &kube::Client,
        driver: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Option<Self>> {
        let gvk = GroupVersionKind::gvk("cbt.storage.k8s.io", "v1beta1", "SnapshotMetadataService");
        let services: Api<DynamicObject> =
            Api::all_with(kube.clone(), &ApiResource::from_gvk(&gvk));
        let svc = match services.get_opt(driver).await {
            Ok(Some(svc)) => svc,
            Ok(None) => return Ok(None),
            // The CRD itself is absent: the cluster has no changed-block tracking.
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(None),
            Err(e) => return Err(e).context("reading SnapshotMetadataServices"),
        };
        let spec = &svc.data["spec"];
        let (Some(address), Some(audience), Some(ca)) = (
            spec["address"].as_str(),
            spec["audience"].as_str(),
            spec["caCert"].as_str(),
        ) else {
            bail!("SnapshotMetadataService {driver} lacks address, audience or caCert: {spec}");
        };
        let ca = decode_base64(ca)
            .with_context(|| format!("SnapshotMetadataService {driver}: caCert is not base64"))?;
        let token = request_token(kube, namespace, service_account, audience).await?;
        Ok(Some(Access {
            address: address.to_string(),
            ca_pem: String::from_utf8(ca).context("the caCert is not PEM text")?,
            token,
        }))
    }
}

impl SnapshotMetadata {
    /// Finds the driver's SnapshotMetadataService, gets a token for `service_account` in
    /// `namespace` with its audience, and connects over TLS to its address.
    pub async fn connect(
        kube: &kube::Client,
        driver: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self> {
        let access = Access::discover(kube, driver, namespace, service_account)
            .await?
            .with_context(|| {
                format!("no SnapshotMetadataService named {driver}: the driver does not serve changed-block tracking (or its csi-snapshot-metadata sidecar is not installed)")
            })?;
        Self::with_access(&access).await
    }

    /// Connects with what [`Access::discover`] found.
    pub async fn with_access(access: &Access) -> Result<Self> {
        let address = access.address.as_str();
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(access.ca_pem.as_bytes()))
            .domain_name(host);
        let channel = Endpoint::from_shared(format!("https://{address}"))
            .context("the SnapshotMetadataService address is not a host:port")?
            .tls_config(tls)?
            .connect()
            .await
            .with_context(|| format!("connecting to the snapshot-metadata sidecar at {address}"))?;
        Ok(SnapshotMetadata {
            client: proto::snapshot_metadata_client::SnapshotMetadataClient::new(channel),
            token: access.token.clone(),
        })
    }

    /// The ranges that changed between the base snapshot (its CSI snapshot handle) and the
    /// target VolumeSnapshot, from `starting_offset` on, as a stream of pages.
    pub async fn delta(
        &self,
        namespace: &str,
        base_snapshot_id: &str,
        target_snapshot: &str,
        starting_offset: u64,
        max_results: i32,
    ) -> Result<tonic::Streaming<proto::GetMetadataDeltaResponse>, tonic::Status> {
        let req = proto::GetMetadataDeltaRequest {
            security_token: self.token.clone(),
            namespace: namespace.into(),
            base_snapshot_id: base_snapshot_id.into(),
            target_snapshot_name: target_snapshot.into(),
            starting_offset: starting_offset as i64,
            max_results,
        };
        Ok(self
            .client
            .clone()
            .get_metadata_delta(req)
            .await?
            .into_inner())
    }

    /// The allocated ranges of a VolumeSnapshot, from `starting_offset` on.
    pub async fn allocated(
        &self,
        namespace: &str,
        snapshot: &str,
        starting_offset: u64,
        max_results: i32,
    ) -> Result<tonic::Streaming<proto::GetMetadataAllocatedResponse>, tonic::Status> {
        let req = proto::GetMetadataAllocatedRequest {
            security_token: self.token.clone(),
            namespace: namespace.into(),
            snapshot_name: snapshot.into(),
            starting_offset: starting_offset as i64,
            max_results,
        };
        Ok(self
            .client
            .clone()
            .get_metadata_allocated(req)
            .await?
            .into_inner())
    }

    /// Every changed range between two snapshots. A stream that breaks is called again from
    /// the end of the last range received (up to `retries` times), as the API intends.
    pub async fn changed_extents(
        &self,
        namespace: &str,
        base_snapshot_id: &str,
        target_snapshot: &str,
        retries: u32,
    ) -> Result<Vec<Extent>> {
        let what =
            format!("changed blocks of {namespace}/{target_snapshot} since {base_snapshot_id}");
        resumed(
            &what,
            retries,
            |from| self.delta(namespace, base_snapshot_id, target_snapshot, from, 0),
            |m| &m.block_metadata,
        )
        .await
    }

    /// Every allocated range of a snapshot, resumed as [`SnapshotMetadata::changed_extents`].
    pub async fn allocated_extents(
        &self,
        namespace: &str,
        snapshot: &str,
        retries: u32,
    ) -> Result<Vec<Extent>> {
        let what = format!("allocated blocks of {namespace}/{snapshot}");
        resumed(
            &what,
            retries,
            |from| self.allocated(namespace, snapshot, from, 0),
            |m| &m.block_metadata,
        )
        .await
    }
}

/// The error of a changed-block call that means the driver cannot answer it at all (no
/// tracking for this volume or snapshot pair): the caller falls back to reading and hashing.
pub fn is_unsupported(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<tonic::Status>())
        .any(|s| {
            matches!(
                s.code(),
                tonic::Code::FailedPrecondition | tonic::Code::Unimplemented
            )
        })
}

/// Reads a paged stream to its end, opening it again from the end of the last range after a
/// break (up to `retries` times).
async fn resumed<T, F, Fut>(
    what: &str,
    retries: u32,
    open: F,
    blocks: fn(&T) -> &[proto::BlockMetadata],
) -> Result<Vec<Extent>>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Streaming<T>, tonic::Status>>,
{
    let mut out: Vec<Extent> = Vec::new();
    let mut failures = 0;
    loop {
        let from = out.last().map_or(0, Extent::end);
        let result = async {
            let mut stream = open(from).await?;
            while let Some(msg) = stream.message().await? {
                out.extend(extents(blocks(&msg)).filter(|e| e.end() > from));
            }
            Ok::<(), tonic::Status>(())
        }
        .await;
        match result {
            Ok(()) => return Ok(out),
            Err(s) if failures < retries && retryable(&s) => {
                failures += 1;
                tracing::warn!(
                    from = out.last().map_or(0, Extent::end),
                    "{what}: the stream broke, resuming: {}",
                    s.message()
                );
            }
            Err(s) => {
                let msg = format!("{what}: {} ({:?})", s.message(), s.code());
                return Err(anyhow::Error::new(s).context(msg));
            }
        }
    }
}

/// The ranges of one message.
pub fn extents(blocks: &[proto::BlockMetadata]) -> impl Iterator<Item = Extent> + '_ {
    blocks.iter().map(|b| Extent {
        offset: b.byte_offset.max(0) as u64,
        length: b.size_bytes.max(0) as u64,
    })
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Aborted
    )
}

async fn request_token(
    kube: &kube::Client,
    namespace: &str,
    service_account: &str,
    audience: &str,
) -> Result<String> {
    let sas: Api<ServiceAccount> = Api::namespaced(kube.clone(), namespace);
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.into()]),
            expiration_seconds: Some(600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = sas
        .create_token_request(service_account, &PostParams::default(), &req)
        .await
        .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{service_account} with audience {audience}"))?;
    answer
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .context("the TokenRequest came back without a token")
}

fn decode_base64(s: &str) -> Result<Vec<u8>> {
    // k8s-openapi carries a base64 codec for `[]byte` fields: reuse it.
    let bytes: k8s_openapi::ByteString =
        serde_json::from_value(serde_json::Value::String(s.into()))?;
    Ok(bytes.0)
}
