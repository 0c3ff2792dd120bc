//! What every handler may read: the clients, the limits and the switches, shared.

use crate::auth::ApiKeys;
use crate::clients::elastic::ElasticSink;
use crate::clients::mongo::MongoStore;
use crate::http::callbacks::CallbackConfig;
use crate::limits::RecipientCap;
use actors::domain::ValidationLimits;
use actors::health::ProviderHealth;
use actors::ports::Queue;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<MongoStore>,
    pub queue: Arc<dyn Queue>,
    pub search: Arc<ElasticSink>,
    pub prometheus: PrometheusHandle,
    /// Set once shutdown begins: new communications are refused and readiness fails, so
    /// load balancers move on while in-flight work finishes.
    pub shutting_down: Arc<AtomicBool>,
    pub health: Vec<Arc<ProviderHealth>>,
    pub callbacks: Arc<CallbackConfig>,
    pub communications_index: String,
    pub auth: Arc<ApiKeys>,
    pub cap: Arc<RecipientCap>,
    pub validation: ValidationLimits,
    pub metrics_token: Option<String>,
}
