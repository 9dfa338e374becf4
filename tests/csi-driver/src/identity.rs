//! The CSI Identity service and the kubelet's plugin registration (what node-driver-registrar
//! would serve: the kubelet finds the socket in `<kubelet root>/plugins_registry/` and learns
//! the driver's name and CSI endpoint from it).

use std::path::PathBuf;

use tonic::{Request, Response, Status};

use crate::Driver;
use crate::proto::csi::{self, plugin_capability};
use crate::proto::registration::{self, registration_server::Registration};

#[tonic::async_trait]
impl csi::identity_server::Identity for Driver {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: self.name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::service::Type;
        let services = [
            Type::ControllerService,
            Type::GroupControllerService,
            Type::SnapshotMetadataService,
        ];
        let capabilities = services
            .into_iter()
            .map(|t| csi::PluginCapability {
                r#type: Some(plugin_capability::Type::Service(
                    plugin_capability::Service { r#type: t as i32 },
                )),
            })
            .collect();
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

/// The registration service: tells the kubelet where the CSI endpoint is.
#[derive(Clone, Debug)]
pub struct Registrar {
    /// The driver name.
    pub name: String,
    /// The CSI socket the kubelet should call.
    pub endpoint: PathBuf,
}

#[tonic::async_trait]
impl Registration for Registrar {
    async fn get_info(
        &self,
        _: Request<registration::InfoRequest>,
    ) -> Result<Response<registration::PluginInfo>, Status> {
        Ok(Response::new(registration::PluginInfo {
            r#type: "CSIPlugin".into(),
            name: self.name.clone(),
            endpoint: self.endpoint.display().to_string(),
            supported_versions: vec!["1.0.0".into()],
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<registration::RegistrationStatus>,
    ) -> Result<Response<registration::RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = %self.name, "registered with the kubelet");
        } else {
            tracing::error!(driver = %self.name, error = %status.error, "the kubelet refused the registration");
        }
        Ok(Response::new(registration::RegistrationStatusResponse {}))
    }
}
