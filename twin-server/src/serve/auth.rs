//! Bearer-token authentication with two roles, as tonic interceptors.
//!
//! - operator: every `Twins` and `Telemetry` call and any device's `DeviceSync` stream;
//! - device: only the `DeviceSync` stream of its own device (its reported state, acks,
//!   telemetry); `Twins` and `Telemetry` calls are PERMISSION_DENIED.
//!
//! With no token configured, authentication is off and every call is allowed (the server binds
//! 127.0.0.1 by default). With tokens, a call without `authorization: Bearer <token>` or with an
//! unknown token is UNAUTHENTICATED. Health and reflection stay open. Tokens are compared by
//! their SHA-256 digest, so the lookup time does not depend on how much of a token matches.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Tokens and their roles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Tokens with the operator role. Empty, with no device token either: authentication off.
    pub operator_tokens: Vec<String>,
    /// Tokens with the device role, one per device.
    pub devices: Vec<DeviceToken>,
}

/// A device's token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceToken {
    /// The device the token speaks for.
    pub device_id: String,
    /// The bearer token.
    pub token: String,
}

/// Who a call comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Authentication is off.
    Open,
    /// An operator token.
    Operator,
    /// A device token, for this device id.
    Device(Arc<str>),
}

impl Role {
    /// Whether this caller may open the sync stream of `device_id`.
    ///
    /// # Errors
    /// PERMISSION_DENIED for a device token of another device.
    pub fn check_device(&self, device_id: &str) -> Result<(), Status> {
        match self {
            Role::Open | Role::Operator => Ok(()),
            Role::Device(own) if &**own == device_id => Ok(()),
            Role::Device(own) => Err(Status::permission_denied(format!(
                "hello.device_id: the token is for device {own:?}, not {device_id:?}"
            ))),
        }
    }
}

/// Checks bearer tokens; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    roles: Arc<HashMap<[u8; 32], Role>>,
}

impl Authenticator {
    /// The tokens of a config. Should a token be listed twice, the last role wins (the config
    /// validation refuses duplicates).
    pub fn new(config: &AuthConfig) -> Self {
        let mut roles = HashMap::new();
        for token in &config.operator_tokens {
            roles.insert(digest(token), Role::Operator);
        }
        for device in &config.devices {
            roles.insert(
                digest(&device.token),
                Role::Device(Arc::from(device.device_id.as_str())),
            );
        }
        Authenticator { roles: Arc::new(roles) }
    }

    /// Whether any token is configured.
    pub fn enabled(&self) -> bool {
        !self.roles.is_empty()
    }

    /// The caller's role.
    ///
    /// # Errors
    /// UNAUTHENTICATED without a bearer token or with an unknown one.
    pub fn role<T>(&self, request: &Request<T>) -> Result<Role, Status> {
        if !self.enabled() {
            return Ok(Role::Open);
        }
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("authorization: missing (send `authorization: Bearer <token>`)"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization: not `Bearer <token>`"))?;
        self.roles
            .get(&digest(token.trim()))
            .cloned()
            .ok_or_else(|| Status::unauthenticated("authorization: unknown token"))
    }

    /// The interceptor of operator-only services.
    pub fn operator_only(&self) -> OperatorOnly {
        OperatorOnly(self.clone())
    }

    /// The interceptor of services open to devices: it records the caller's [`Role`] in the
    /// request's extensions for the handler to check.
    pub fn any_role(&self) -> AnyRole {
        AnyRole(self.clone())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Lets operators (and everyone when authentication is off) through.
#[derive(Debug, Clone)]
pub struct OperatorOnly(Authenticator);

impl Interceptor for OperatorOnly {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match self.0.role(&request)? {
            Role::Open | Role::Operator => Ok(request),
            Role::Device(device_id) => Err(Status::permission_denied(format!(
                "the token of device {device_id:?} may only open its own DeviceSync stream"
            ))),
        }
    }
}

/// Lets any known token through and records its role.
#[derive(Debug, Clone)]
pub struct AnyRole(Authenticator);

impl Interceptor for AnyRole {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let role = self.0.role(&request)?;
        request.extensions_mut().insert(role);
        Ok(request)
    }
}
